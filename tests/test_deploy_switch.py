"""``tureen deploy switch`` against a fake kubectl on PATH that records its calls."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

FAKE = Path(__file__).with_name("fake_kubectl.py")
NS = "tureen"
DEEP = "/api/v1/namespaces/tureen/pods/{pod}:8000/proxy/health?deep=1"


def deployment(color: str, replicas: int = 2, ready: int = 2) -> dict:
    labels = {"app.kubernetes.io/name": "tureen-engine", "tureen.dev/color": color}
    return {"metadata": {"name": f"tureen-engine-{color}"},
            "spec": {"replicas": replicas, "selector": {"matchLabels": labels}},
            "status": {"readyReplicas": ready, "updatedReplicas": ready, "availableReplicas": ready}}


def pod(color: str, i: int, ready: bool = True) -> dict:
    return {"metadata": {"name": f"tureen-engine-{color}-{i}",
                         "labels": {"app.kubernetes.io/name": "tureen-engine", "tureen.dev/color": color}},
            "status": {"conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}}


def healthy(pod_name: str) -> tuple[str, dict]:
    return DEEP.format(pod=pod_name), {"status": 200, "body": '{"status": "ok", "generated_tokens": 2}'}


@pytest.fixture
def cluster(tmp_path):
    """A blue-live cluster with a ready, healthy green; tests break it as they need."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "kubectl").write_text(f"#!{sys.executable}\n" + FAKE.read_text().split("\n", 1)[1])
    (bin_dir / "kubectl").chmod(0o755)
    state = {
        "objects": {
            "service/tureen-engine": {"spec": {"selector": {"app.kubernetes.io/name": "tureen-engine",
                                                            "tureen.dev/color": "blue"}}},
            "deployment/tureen-engine-blue": deployment("blue"),
            "deployment/tureen-engine-green": deployment("green"),
            "scaledobject/tureen-engine": {"spec": {"scaleTargetRef": {"name": "tureen-engine-blue"}}},
        },
        "pods": [pod("blue", 0), pod("blue", 1), pod("green", 0), pod("green", 1)],
        "raw": dict(healthy(f"tureen-engine-{c}-{i}") for c in ("blue", "green") for i in (0, 1)),
    }

    class Cluster:
        state_path = tmp_path / "state.json"
        calls_path = tmp_path / "calls.jsonl"

        def save(self):
            self.state_path.write_text(json.dumps(self.state))

        def load(self) -> dict:
            return json.loads(self.state_path.read_text())

        def calls(self) -> list[list[str]]:
            if not self.calls_path.exists():
                return []
            return [json.loads(line) for line in self.calls_path.read_text().splitlines()]

        def patches(self) -> list[list[str]]:
            return [c for c in self.calls() if "patch" in c]

        def run(self, *args: str) -> subprocess.CompletedProcess:
            if not self.state_path.exists():
                self.save()
            env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_KUBE_STATE": str(self.state_path),
                   "FAKE_KUBE_CALLS": str(self.calls_path)}
            return subprocess.run([sys.executable, "-m", "tureen.cli", "deploy", "switch", *args], env=env,
                                  capture_output=True, text=True, timeout=60)

    c = Cluster()
    c.state = state
    return c


def test_switches_service_and_autoscaler_when_green_is_ready(cluster):
    res = cluster.run("--to", "green")
    assert res.returncode == 0, res.stdout + res.stderr
    after = cluster.load()["objects"]
    assert after["service/tureen-engine"]["spec"]["selector"]["tureen.dev/color"] == "green"
    assert after["service/tureen-engine"]["spec"]["selector"]["app.kubernetes.io/name"] == "tureen-engine"
    assert after["scaledobject/tureen-engine"]["spec"]["scaleTargetRef"]["name"] == "tureen-engine-green"
    calls = cluster.calls()
    assert all(c[:2] == ["--namespace", NS] for c in calls)
    deep_checks = [c for c in calls if "--raw" in c]
    assert {c[-1] for c in deep_checks} == {DEEP.format(pod=f"tureen-engine-green-{i}") for i in (0, 1)}
    # the guard ran before the first change
    first_patch = next(i for i, c in enumerate(calls) if "patch" in c)
    assert all(i < first_patch for i, c in enumerate(calls) if "--raw" in c)
    assert "roll back with: tureen deploy switch --to blue" in res.stdout


def test_rollback_is_the_same_command(cluster):
    assert cluster.run("--to", "green").returncode == 0
    res = cluster.run("--to", "blue")
    assert res.returncode == 0, res.stdout + res.stderr
    after = cluster.load()["objects"]
    assert after["service/tureen-engine"]["spec"]["selector"]["tureen.dev/color"] == "blue"
    assert after["scaledobject/tureen-engine"]["spec"]["scaleTargetRef"]["name"] == "tureen-engine-blue"


@pytest.mark.parametrize("breakage, message", [
    (lambda s: s["objects"].__setitem__("deployment/tureen-engine-green", deployment("green", ready=1)),
     "readyReplicas is 1 of 2"),
    (lambda s: s["objects"].__setitem__("deployment/tureen-engine-green", deployment("green", replicas=0, ready=0)),
     "0 replicas"),
    (lambda s: s["pods"].__setitem__(3, pod("green", 1, ready=False)), "pods not Ready: tureen-engine-green-1"),
    (lambda s: s["raw"].__setitem__(DEEP.format(pod="tureen-engine-green-0"), {"status": 503, "body": "x"}),
     "tureen-engine-green-0: deep health check failed"),
    (lambda s: s["raw"].__setitem__(DEEP.format(pod="tureen-engine-green-1"),
                                    {"status": 200, "body": '{"status": "unhealthy"}'}),
     "tureen-engine-green-1: deep health check answered"),
    (lambda s: s["objects"].pop("deployment/tureen-engine-green"), "does not exist"),
])
def test_refuses_when_the_target_is_not_ready(cluster, breakage, message):
    breakage(cluster.state)
    cluster.save()
    res = cluster.run("--to", "green")
    assert res.returncode == 1, res.stdout + res.stderr
    assert "refused" in res.stdout and message in res.stdout
    assert cluster.patches() == []
    assert cluster.load()["objects"]["service/tureen-engine"]["spec"]["selector"]["tureen.dev/color"] == "blue"


def test_already_live_changes_nothing(cluster):
    res = cluster.run("--to", "blue")
    assert res.returncode == 0 and "already on blue" in res.stdout
    assert cluster.patches() == []


def test_dry_run_checks_but_changes_nothing(cluster):
    res = cluster.run("--to", "green", "--dry-run")
    assert res.returncode == 0 and "would move" in res.stdout
    assert cluster.patches() == [] and any("--raw" in c for c in cluster.calls())


def test_an_hpa_is_retargeted_when_there_is_no_scaledobject(cluster):
    objects = cluster.state["objects"]
    objects["hpa/tureen-engine"] = objects.pop("scaledobject/tureen-engine")
    cluster.save()
    assert cluster.run("--to", "green").returncode == 0
    assert cluster.load()["objects"]["hpa/tureen-engine"]["spec"]["scaleTargetRef"]["name"] == "tureen-engine-green"


def test_kubectl_failure_is_a_clear_error(cluster):
    cluster.state["objects"].pop("service/tureen-engine")
    cluster.save()
    res = cluster.run("--to", "green", "--namespace", NS)
    assert res.returncode == 2 and "tureen deploy switch: error" in res.stderr and "not found" in res.stderr
    assert "Traceback" not in res.stderr
