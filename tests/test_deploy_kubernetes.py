"""deploy/kubernetes: every overlay renders, validates against the Kubernetes schemas (and the CRDs'
fields), and its probes, ports and timeouts are the ones ``tureen serve`` really has."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import httpx
import jsonschema
import pytest
import yaml

from crd_schemas import CRD_SCHEMAS
from serve_process import ServerProcess
from tureen.cli import build_parser
from tureen.server.cli import server_config_from_args

kubernetes_validate = pytest.importorskip("kubernetes_validate")
pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with kustomize) is not installed")

KUSTOMIZE = Path(__file__).resolve().parents[1] / "deploy" / "kubernetes"
OVERLAYS = ["cpu", "gpu", "gpu-hpa"]
K8S_VERSION = "1.30.0"


def render(overlay: str) -> list[dict]:
    out = subprocess.run(["kubectl", "kustomize", str(KUSTOMIZE / "overlays" / overlay)], capture_output=True,
                         text=True, timeout=60, check=True).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request) -> tuple[str, list[dict]]:
    return request.param, render(request.param)


def by_kind(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def engine_container(deployment: dict) -> dict:
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    return container


def serve_args(container: dict, model: str = "/models/x") -> list[str]:
    env = {e["name"]: e.get("value", "") for e in container.get("env", [])}
    env["TUREEN_MODEL"] = model
    return [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in container["args"]]


def test_every_manifest_validates(rendered):
    overlay, docs = rendered
    for doc in docs:
        key = (doc["apiVersion"], doc["kind"])
        if key in CRD_SCHEMAS:
            jsonschema.validate(doc, CRD_SCHEMAS[key])
        else:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_validation_catches_a_misspelt_field():
    deployment = by_kind(render("gpu"), "Deployment")["tureen-engine-blue"]
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGett"] = {"path": "/health"}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)
    scaled = by_kind(render("gpu"), "ScaledObject")["tureen-engine"]
    scaled["spec"]["triggers"][0]["metadata"]["treshold"] = "5"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(scaled, CRD_SCHEMAS[("keda.sh/v1alpha1", "ScaledObject")])


def test_the_stack_is_complete(rendered):
    overlay, docs = rendered
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    expected = {("Deployment", "tureen-engine-blue"), ("Deployment", "tureen-engine-green"),
                ("Service", "tureen-engine"), ("Deployment", "tureen-gateway"), ("Service", "tureen-gateway"),
                ("ConfigMap", "tureen-gateway-config"), ("StatefulSet", "tureen-redis"), ("Service", "tureen-redis"),
                ("PodDisruptionBudget", "tureen-engine"), ("PersistentVolumeClaim", "tureen-model-cache"),
                ("ServiceMonitor", "tureen-engine"), ("ServiceMonitor", "tureen-gateway")}
    assert expected <= kinds
    autoscaler = ("HorizontalPodAutoscaler", "tureen-engine") if overlay == "gpu-hpa" else ("ScaledObject",
                                                                                            "tureen-engine")
    assert autoscaler in kinds
    assert all(d["metadata"].get("namespace") == "tureen" for d in docs if d["kind"] != "Namespace")


def test_gpu_resources_only_in_gpu_overlays(rendered):
    overlay, docs = rendered
    for name in ("tureen-engine-blue", "tureen-engine-green"):
        container = engine_container(by_kind(docs, "Deployment")[name])
        limits = container.get("resources", {}).get("limits", {})
        assert ("nvidia.com/gpu" in limits) == overlay.startswith("gpu")
        args = serve_args(container)
        assert ("--gpu-memory-utilization" in args) == overlay.startswith("gpu")
        assert ("--kv-cache-memory" in args) == (overlay == "cpu")
        assert container["image"].endswith(":cuda" if overlay.startswith("gpu") else ":cpu")
    assert engine_container(by_kind(docs, "Deployment")["tureen-gateway"])["image"].endswith(":cpu")


def test_engine_pods_drain_within_the_grace_period(rendered):
    _, docs = rendered
    for name in ("tureen-engine-blue", "tureen-engine-green"):
        pod = by_kind(docs, "Deployment")[name]["spec"]["template"]["spec"]
        container = engine_container(by_kind(docs, "Deployment")[name])
        cfg = server_config_from_args(build_parser().parse_args(serve_args(container)))
        pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
        assert pre_stop[0] == "sleep"
        assert pod["terminationGracePeriodSeconds"] > cfg.shutdown_timeout + float(pre_stop[1])
        assert container["readinessProbe"]["timeoutSeconds"] > cfg.deep_health_timeout
        assert "initialDelaySeconds" not in container["startupProbe"]
        startup = container["startupProbe"]
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 600  # room to download and load a model
        assert cfg.host == "0.0.0.0"  # the default is loopback: a pod must ask for every interface


def test_hub_token_and_model_cache(rendered):
    _, docs = rendered
    pod = by_kind(docs, "Deployment")["tureen-engine-blue"]["spec"]["template"]["spec"]
    env = {e["name"]: e for e in engine_container(by_kind(docs, "Deployment")["tureen-engine-blue"])["env"]}
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "tureen-hf-token"
    claims = [v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v]
    assert claims == ["tureen-model-cache"]
    mount = {m["name"]: m["mountPath"] for m in engine_container(
        by_kind(docs, "Deployment")["tureen-engine-blue"])["volumeMounts"]}
    assert env["HF_HOME"]["value"].startswith(mount["model-cache"])


def test_service_selects_the_blue_colour_and_both_colours_match_the_pdb(rendered):
    _, docs = rendered
    services, deployments = by_kind(docs, "Service"), by_kind(docs, "Deployment")
    selector = services["tureen-engine"]["spec"]["selector"]
    blue = deployments["tureen-engine-blue"]["spec"]["template"]["metadata"]["labels"]
    green = deployments["tureen-engine-green"]["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= blue.items() and not selector.items() <= green.items()
    pdb = by_kind(docs, "PodDisruptionBudget")["tureen-engine"]["spec"]["selector"]["matchLabels"]
    assert pdb.items() <= blue.items() and pdb.items() <= green.items()
    monitor = by_kind(docs, "ServiceMonitor")["tureen-engine"]["spec"]
    metrics_service = [s for s in services.values()
                       if monitor["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()]
    assert [s["metadata"]["name"] for s in metrics_service] == ["tureen-engine-all"]
    assert metrics_service[0]["spec"]["selector"].items() <= green.items()


def test_autoscaler_scales_the_live_colour_on_queue_depth(rendered):
    overlay, docs = rendered
    if overlay == "gpu-hpa":
        hpa = by_kind(docs, "HorizontalPodAutoscaler")["tureen-engine"]["spec"]
        assert hpa["scaleTargetRef"]["name"] == "tureen-engine-blue"
        assert hpa["metrics"][0]["pods"]["metric"]["name"] == "vllm_num_requests_waiting"
        rules = yaml.safe_load(by_kind(docs, "ConfigMap")["tureen-prometheus-adapter-rules"]["data"]["config.yaml"])
        assert rules["rules"][0]["name"]["as"] == "vllm_num_requests_waiting"
        assert "vllm:num_requests_waiting" in rules["rules"][0]["seriesQuery"]
        return
    spec = by_kind(docs, "ScaledObject")["tureen-engine"]["spec"]
    assert spec["scaleTargetRef"]["name"] == "tureen-engine-blue"
    trigger = spec["triggers"][0]
    assert trigger["type"] == "prometheus" and "vllm:num_requests_waiting" in trigger["metadata"]["query"]
    assert float(trigger["metadata"]["activationThreshold"]) < float(trigger["metadata"]["threshold"])
    assert spec["minReplicaCount"] >= 1 and spec["maxReplicaCount"] > spec["minReplicaCount"]
    assert spec["cooldownPeriod"] >= 60


def test_gateway_config_points_at_the_engine_service(rendered):
    _, docs = rendered
    config = yaml.safe_load(by_kind(docs, "ConfigMap")["tureen-gateway-config"]["data"]["gateway.yaml"])
    engine = by_kind(docs, "Service")["tureen-engine"]
    port = engine["spec"]["ports"][0]["port"]
    assert config["model_list"][0]["litellm_params"]["api_base"] == f"http://tureen-engine:{port}/v1"
    assert config["router_settings"]["redis_host"] == "tureen-redis"
    secrets = [v for v in (config["general_settings"]["master_key"],
                           config["model_list"][0]["litellm_params"]["api_key"])]
    assert all(s.startswith("os.environ/") for s in secrets)  # no secret in the ConfigMap
    gateway = engine_container(by_kind(docs, "Deployment")["tureen-gateway"])
    env = {e["name"] for e in gateway["env"]}
    assert {s.removeprefix("os.environ/") for s in secrets} <= env


def test_probes_answer_on_a_real_server(llama_dir, tmp_path):
    """The probes' paths and port, read from the manifest, against a real ``tureen serve``."""
    docs = render("cpu")
    container = engine_container(by_kind(docs, "Deployment")["tureen-engine-blue"])
    args = serve_args(container, model=str(llama_dir))
    parsed = build_parser().parse_args(args)
    cfg = server_config_from_args(parsed)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    probes = [container[k]["httpGet"] for k in ("startupProbe", "readinessProbe", "livenessProbe")]
    assert all(ports[p["port"]] == cfg.port for p in probes)
    server = ServerProcess(llama_dir, tmp_path / "server.log", "--deep-health-timeout",
                           str(cfg.deep_health_timeout)).wait_healthy()
    try:
        for probe in probes:
            assert httpx.get(server.url + probe["path"], timeout=30).status_code == 200, probe
        assert httpx.get(server.url + "/metrics", timeout=10).status_code == 200  # the scrape annotation's path
    finally:
        server.stop()


GATEWAY_ENV = {"TUREEN_ENGINE_API_KEY": "sk-engine-test", "TUREEN_GATEWAY_MASTER_KEY": "sk-master-test-000000"}


def gateway_check(config_text: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """``tureen gateway --config FILE --check``: the gateway's own loader on a shipped config."""
    import importlib.util
    import os
    import sys

    if importlib.util.find_spec("tureen.gateway") is None:
        pytest.skip("tureen.gateway is not importable: the gateway configs are checked once it is merged")
    path = tmp_path / "gateway.yaml"
    path.write_text(config_text)
    return subprocess.run([sys.executable, "-m", "tureen.cli", "gateway", "--config", str(path), "--check"],
                          capture_output=True, text=True, timeout=60, env={**os.environ, **GATEWAY_ENV})


def test_the_gateway_accepts_the_configmap(tmp_path):
    config = by_kind(render("gpu"), "ConfigMap")["tureen-gateway-config"]["data"]["gateway.yaml"]
    res = gateway_check(config, tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "keys required: True" in res.stdout and "redis: configured" in res.stdout
    assert "warning" not in res.stderr.lower() and "unknown" not in res.stderr.lower(), res.stderr


def test_the_gateway_accepts_the_compose_config(tmp_path):
    res = gateway_check((KUSTOMIZE.parent / "docker" / "gateway.yaml").read_text(), tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "keys required: True" in res.stdout and "redis: configured" in res.stdout
    assert "warning" not in res.stderr.lower() and "unknown" not in res.stderr.lower(), res.stderr
