"""deploy/docker: the Dockerfile and compose.yaml, checked for structure (no Docker daemon here, so
the images are not built in CI)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from tureen.cli import build_parser

DOCKER = Path(__file__).resolve().parents[1] / "deploy" / "docker"
ROOT = DOCKER.parents[1]
COMPOSE = yaml.safe_load((DOCKER / "compose.yaml").read_text())
SERVICES = COMPOSE["services"]


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", (DOCKER / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def test_dockerfile_has_a_cpu_and_a_cuda_variant_a_non_root_user_and_the_model_volume():
    ins = dockerfile_instructions()
    args = [v for k, v in ins if k == "ARG"]
    assert "TORCH_VARIANT=cpu" in args  # --build-arg TORCH_VARIANT=cu124 for CUDA
    assert any("download.pytorch.org/whl/${TORCH_VARIANT}" in v for k, v in ins if k == "RUN")
    users = [v for k, v in ins if k == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert any("/models" in v for k, v in ins if k == "VOLUME")
    env = " ".join(v for k, v in ins if k == "ENV")
    assert "HF_HOME=/models/huggingface" in env and "TUREEN_CACHE_DIR=/models" in env
    assert dict(ins)["ENTRYPOINT"] == '["tureen"]'
    cmd = yaml.safe_load(dict(ins)["CMD"])
    assert cmd[:1] == ["serve"] and cmd[cmd.index("--host") + 1] == "0.0.0.0"
    build_parser().parse_args(cmd)  # the default command is a valid `tureen serve` line
    copies = [v.split()[0] for k, v in ins if k == "COPY" and not v.startswith("--from")]
    assert all((ROOT / c).exists() for c in copies)


def test_compose_has_the_whole_stack():
    assert set(SERVICES) == {"engine-1", "engine-2", "gateway", "redis", "prometheus", "grafana", "alertmanager"}
    for name in ("engine-1", "engine-2"):
        engine = SERVICES[name]
        script = engine["entrypoint"][-1]
        argv = script.replace("exec tureen ", "").replace("$${MODEL} ", "").split()
        args = build_parser().parse_args(argv)
        assert args.command == "serve" and args.host == "0.0.0.0" and args.port == 8000
        assert "model-cache:/models" in engine["volumes"]
        assert "deep=1" in " ".join(engine["healthcheck"]["test"])
        assert engine["ulimits"]["nofile"]["soft"] >= 65535
    gateway = SERVICES["gateway"]
    assert gateway["command"][:3] == ["gateway", "--config", "/etc/tureen/gateway.yaml"]
    assert set(gateway["depends_on"]) == {"engine-1", "engine-2", "redis"}


def test_every_bind_mount_exists_and_every_dependency_is_a_service():
    for name, service in SERVICES.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                if source.endswith("alertmanager-secrets"):  # created by the operator (docs/deploy.md)
                    continue
                assert (DOCKER / source).exists(), (name, source)
            else:
                assert source in COMPOSE["volumes"], (name, source)
        assert set(service.get("depends_on", [])) <= set(SERVICES)


def test_prometheus_scrapes_the_compose_services_and_the_gateway_config_names_them():
    prometheus = yaml.safe_load((DOCKER.parent / "prometheus" / "prometheus.yml").read_text())
    targets = {t for job in prometheus["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    assert targets == {"engine-1:8000", "engine-2:8000", "gateway:4000"}
    assert {t.split(":")[0] for t in targets} <= set(SERVICES)
    gateway = yaml.safe_load((DOCKER / "gateway.yaml").read_text())
    bases = {m["litellm_params"]["api_base"] for m in gateway["model_list"]}
    assert bases == {"http://engine-1:8000/v1", "http://engine-2:8000/v1"}
    assert gateway["router_settings"]["redis_host"] == "redis"


def test_grafana_is_provisioned_with_the_dashboard():
    mounts = {v.split(":")[1]: v.split(":")[0] for v in SERVICES["grafana"]["volumes"] if v.startswith(".")}
    provider = yaml.safe_load((DOCKER / mounts["/etc/grafana/provisioning/dashboards/tureen.yaml"]).read_text())
    dashboards_dir = provider["providers"][0]["options"]["path"]
    assert any(target.startswith(dashboards_dir) and source.endswith("tureen-dashboard.json")
               for target, source in mounts.items())
    datasource = yaml.safe_load((DOCKER / mounts["/etc/grafana/provisioning/datasources/tureen.yaml"]).read_text())
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"


def test_no_secret_is_committed():
    text = (DOCKER / "compose.yaml").read_text() + (DOCKER / "gateway.yaml").read_text()
    assert "sk-" not in text and "change-me" not in text
    assert "${TUREEN_ENGINE_API_KEY:?" in text  # compose refuses to start without the key
