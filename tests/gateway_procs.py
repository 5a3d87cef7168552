"""Processes for gateway tests: fake upstreams (``tureen.bench.fake_upstream``) and ``tureen gateway``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import yaml

from serve_process import _free_port

FAST_HEALTH = {"interval_s": 0.2, "timeout_s": 1.0, "metrics_scrape_interval_s": 0.2}


def _wait(url: str, proc: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, f"process exited early:\n{log.read_text()}"
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"{url} not up in {timeout} s:\n{log.read_text()}")


class FakeProc:
    """A fake OpenAI-compatible upstream in its own process; ``behaviour`` as in ``fake_upstream.Behaviour``."""

    def __init__(self, log_dir: Path, **behaviour) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"fake-{self.port}.log"
        behaviour.setdefault("ttft_s", 0.005)
        behaviour.setdefault("itl_s", 0.002)
        behaviour.setdefault("tokens", 4)
        ttft, itl, tokens = behaviour.pop("ttft_s"), behaviour.pop("itl_s"), behaviour.pop("tokens")
        cmd = [sys.executable, "-m", "tureen.bench.fake_upstream", "--port", str(self.port), "--ttft-ms",
               str(ttft * 1000), "--itl-ms", str(itl * 1000), "--tokens", str(tokens), "--behaviour",
               json.dumps(behaviour)]
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        _wait(self.url + "/health", self.proc, self.log_path)

    def control(self, **changes) -> dict:
        return httpx.post(self.url + "/control", json=changes, timeout=5).json()

    def stats(self) -> dict:
        return httpx.get(self.url + "/stats", timeout=5).json()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        self.kill()
        self.log.close()


def deployment(name: str, fake: FakeProc, **params) -> dict:
    tureen = {k: params.pop(k) for k in ("tier",) if k in params}
    entry = {"model_name": name, "litellm_params": {"model": "hosted_vllm/fake", "api_base": fake.url, **params}}
    if tureen:
        entry["tureen_params"] = tureen
    return entry


class GatewayProc:
    """``tureen gateway --config FILE`` on a free port."""

    def __init__(self, tmp: Path, config: dict, env: dict | None = None, wait: bool = True) -> None:
        config = dict(config)
        settings = config.setdefault("tureen_settings", {})
        settings.setdefault("health_check", FAST_HEALTH)
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config_path = tmp / f"gateway-{self.port}.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = tmp / f"gateway-{self.port}.log"
        self.log = open(self.log_path, "w")
        cmd = [sys.executable, "-m", "tureen.cli", "gateway", "--config", str(self.config_path), "--host",
               "127.0.0.1", "--port", str(self.port)]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        if wait:
            _wait(self.url + "/health", self.proc, self.log_path)

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30, **kwargs)

    def metrics(self) -> str:
        return httpx.get(self.url + "/metrics", timeout=5).text

    def log_text(self) -> str:
        self.log.flush()
        return self.log_path.read_text()

    def terminate(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def metric(text: str, name: str, **labels) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def wait_until(predicate, timeout: float = 20, interval: float = 0.05):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("condition not met in time")
