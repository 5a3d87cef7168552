"""``tureen doctor``: a low fd limit, a fake nvidia-smi on PATH, the fit check and Redis, each outcome."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from tureen.doctor.checks import (FAIL, OK, SKIP, WARN, CudaAvailable, DiskSpace, DriverMatchesTorch,
                                  RedisReachable)
from tureen.doctor.cli import catalogue_gpu
from tureen.doctor.host import Gpu, HostFacts

H100 = "0, NVIDIA H100 80GB HBM3, 81559, {persistence}, {app}, 1980"
SMI_HEADER = "| NVIDIA-SMI 550.54.15   Driver Version: 550.54.15   CUDA Version: 12.4 |"


def fake_nvidia_smi(bin_dir, persistence="Enabled", app_clock=1980):
    """An nvidia-smi that answers doctor's query and prints a header with driver and CUDA versions."""
    script = bin_dir / "nvidia-smi"
    row = H100.format(persistence=persistence, app=app_clock)
    script.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        case "$1" in
          --query-gpu=*) echo "{row}" ;;
          *) echo "{SMI_HEADER}" ;;
        esac
        """))
    script.chmod(0o755)


def doctor(*args: str, ulimit: int | None = None, path_prefix=None) -> tuple[int, dict[str, dict]]:
    cmd = shlex.join([sys.executable, "-m", "tureen.cli", "doctor", "--json", *args])
    if ulimit is not None:
        cmd = f"ulimit -n {ulimit} && {cmd}"
    env = dict(os.environ)
    if path_prefix is not None:
        env["PATH"] = f"{path_prefix}:{env['PATH']}"
    res = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode in (0, 1), res.stderr
    return res.returncode, {f["check"]: f for f in json.loads(res.stdout)}


def test_low_open_file_limit_fails_with_a_fix():
    code, found = doctor(ulimit=1024)
    assert code == 1
    fd = found["open-file limit"]
    assert fd["status"] == FAIL and "1,024" in fd["detail"] and "LimitNOFILE=65535" in fd["fix"]


def test_enough_open_files_passes():
    code, found = doctor("--min-open-files", "1000", ulimit=1024)
    assert found["open-file limit"]["status"] == OK and code == 0
    assert found["CUDA"]["status"] == SKIP  # no nvidia-smi: a CPU host, GPU checks skipped


def test_fake_gpu_with_a_cpu_torch_fails_cuda(tmp_path):
    fake_nvidia_smi(tmp_path)
    code, found = doctor("--min-open-files", "1000", ulimit=1024, path_prefix=tmp_path)
    assert code == 1
    assert found["CUDA"]["status"] == FAIL and "CPU build" in found["CUDA"]["detail"]
    assert found["GPU persistence mode"]["status"] == OK
    assert found["GPU clocks"]["status"] == OK


def test_fake_gpu_without_persistence_and_with_boosting_clocks_warns(tmp_path):
    fake_nvidia_smi(tmp_path, persistence="Disabled", app_clock=1410)
    _, found = doctor("--min-open-files", "1000", ulimit=1024, path_prefix=tmp_path)
    assert found["GPU persistence mode"]["status"] == WARN and "nvidia-smi -pm 1" in found["GPU persistence mode"]["fix"]
    assert found["GPU clocks"]["status"] == WARN and "-lgc 1980" in found["GPU clocks"]["fix"]


def test_fit_uses_the_gpu_nvidia_smi_reports(tmp_path):
    fake_nvidia_smi(tmp_path)
    _, found = doctor("llama-3.1-70b", "--max-model-len", "8192", path_prefix=tmp_path)
    fit = found["model fits"]
    assert fit["status"] == FAIL and "1 x H100-SXM" in fit["detail"] and "--num-gpus 2" in fit["fix"]
    _, found = doctor("llama-3.1-70b", "--max-model-len", "8192", "--num-gpus", "2", path_prefix=tmp_path)
    assert found["model fits"]["status"] == OK and "2 x H100-SXM" in found["model fits"]["detail"]


def test_fit_on_cpu_and_disk_need_for_a_hub_model():
    _, found = doctor("qwen2.5-0.5b", "--gpu", "cpu", "--max-model-len", "2048")
    assert found["model fits"]["status"] == OK and "CPU" in found["model fits"]["detail"]
    assert found["disk space"]["status"] in (OK, FAIL) and "GB" in found["disk space"]["detail"]


def test_cpu_fit_follows_the_kv_budget():
    _, small = doctor("llama-3.1-8b", "--gpu", "cpu", "--max-model-len", "32768", "--kv-cache-memory", "1GiB")
    assert small["model fits"]["status"] == FAIL and "--kv-cache-memory" in small["model fits"]["fix"]
    _, large = doctor("llama-3.1-8b", "--gpu", "cpu", "--max-model-len", "32768", "--kv-cache-memory", "8GiB")
    assert large["model fits"]["status"] == OK


def test_unknown_model_is_a_failed_check_not_a_crash(tmp_path):
    code, found = doctor(str(tmp_path / "nope" / "config.json"), "--gpu", "H100")
    assert code == 1 and found["model fits"]["status"] == FAIL


@pytest.mark.parametrize("name, ours", [("NVIDIA H100 80GB HBM3", "H100-SXM"), ("NVIDIA H100 PCIe", "H100-PCIe"),
                                        ("NVIDIA H200", "H200"), ("NVIDIA A100-SXM4-80GB", "A100-80GB"),
                                        ("NVIDIA A100-PCIE-40GB", "A100-40GB"), ("NVIDIA A10G", "A10"),
                                        ("NVIDIA L4", "L4"), ("NVIDIA L40S", "L40S"),
                                        ("NVIDIA GeForce RTX 4090", "RTX-4090"), ("Tesla T4", None)])
def test_nvidia_smi_names_map_to_the_catalogue(name, ours):
    assert catalogue_gpu(name) == ours


def _gpu_host(**kw) -> HostFacts:
    gpu = Gpu("0", "NVIDIA H100 80GB HBM3", 81559, "Enabled", 1980, 1980)
    return HostFacts(nofile=(65535, 65535), gpus=[gpu], driver_version="550.54.15", driver_cuda="12.4", **kw)


@pytest.mark.parametrize("torch_cuda, status", [("12.1", OK), ("12.4", OK), ("12.6", FAIL), (None, SKIP)])
def test_driver_and_torch_cuda_versions(torch_cuda, status):
    assert DriverMatchesTorch().run(_gpu_host(torch_cuda=torch_cuda)).status == status


def test_cuda_available_on_a_working_gpu_host():
    f = CudaAvailable().run(_gpu_host(torch_version="2.13.0", torch_cuda="12.4", torch_cuda_available=True,
                                      torch_cuda_devices=1))
    assert f.status == OK and "1 CUDA device" in f.detail


def test_disk_space_fails_when_the_model_is_larger_than_the_free_space(tmp_path):
    free = HostFacts.free_bytes(str(tmp_path))
    host = HostFacts(nofile=(65535, 65535))
    assert DiskSpace(required_bytes=free * 2, path=str(tmp_path)).run(host).status == FAIL
    assert DiskSpace(required_bytes=1000, path=str(tmp_path / "not-yet" / "hub")).run(host).status == OK


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")
def test_redis_from_the_gateway_config(tmp_path):
    port = _free_port()
    redis = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                              "--appendonly", "no", "--dir", str(tmp_path)], stdout=subprocess.DEVNULL)
    try:
        deadline = time.time() + 20
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                time.sleep(0.1)
        config = tmp_path / "gateway.yaml"
        config.write_text(f"router_settings:\n  redis_host: 127.0.0.1\n  redis_port: {port}\n")
        _, found = doctor("--gateway-config", str(config))
        assert found["Redis"]["status"] == OK and "PING" in found["Redis"]["detail"]
    finally:
        redis.terminate()
        redis.wait(10)
    code, found = doctor("--gateway-config", str(config), "--min-open-files", "1")
    assert code == 1 and found["Redis"]["status"] == FAIL and "redis_host" in found["Redis"]["fix"]


def test_redis_check_unit():
    host = HostFacts(nofile=(1, 1))
    assert RedisReachable(address=None).run(host).status == SKIP
    assert RedisReachable(address=("127.0.0.1", _free_port()), timeout_s=1).run(host).status == FAIL
