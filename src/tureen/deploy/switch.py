"""Blue-green switching: move the engine Service (and its autoscaler) to the other colour, guarded.

The guard refuses unless the target colour's Deployment has all its replicas updated and ready,
every one of its pods is Ready, and each passes the deep health check (``GET /health?deep=1``, a
real generation) through the API server proxy. Only then is the Service's selector patched, and
the KEDA ScaledObject or HPA retargeted, so that scaling follows the traffic. Rolling back is the
same command with the other colour.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from tureen.deploy.kubectl import Kubectl, KubectlError

DEEP_HEALTH_PATH = "/health?deep=1"


@dataclass(frozen=True)
class SwitchPlan:
    """What to switch: names as deploy/kubernetes creates them; every one overridable by a flag."""

    to: str
    service: str = "tureen-engine"
    deployment_prefix: str = "tureen-engine-"
    color_label: str = "tureen.dev/color"
    scaled_object: str = "tureen-engine"
    hpa: str = "tureen-engine"
    port: int = 8000

    @property
    def deployment(self) -> str:
        return self.deployment_prefix + self.to


@dataclass
class SwitchResult:
    switched: bool
    previous: str | None
    problems: list[str] = field(default_factory=list)
    actions: list[str] = field(default_factory=list)


def _ready(pod: dict[str, Any]) -> bool:
    conditions = pod.get("status", {}).get("conditions", [])
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def _deployment_problems(deployment: dict[str, Any]) -> list[str]:
    spec, status = deployment.get("spec", {}), deployment.get("status", {})
    wanted = spec.get("replicas", 1)
    if wanted < 1:
        return [f"deployment {deployment['metadata']['name']} has 0 replicas: scale it up and wait for it to be ready"]
    problems = []
    for key in ("readyReplicas", "updatedReplicas", "availableReplicas"):
        if status.get(key, 0) < wanted:
            problems.append(f"{key} is {status.get(key, 0)} of {wanted}")
    return problems


def _deep_health_problem(kubectl: Kubectl, pod: str, port: int) -> str | None:
    try:
        body = kubectl.pod_get(pod, port, DEEP_HEALTH_PATH)
    except KubectlError as exc:
        return f"pod {pod}: deep health check failed ({exc})"
    try:
        status = json.loads(body).get("status")
    except (ValueError, AttributeError):
        status = None
    return None if status == "ok" else f"pod {pod}: deep health check answered {body.strip()[:200]!r}"


def check_target(kubectl: Kubectl, plan: SwitchPlan) -> list[str]:
    """Everything that stops the switch; empty when the target colour may take traffic."""
    if not kubectl.exists("deployment", plan.deployment):
        return [f"deployment {plan.deployment} does not exist"]
    deployment = kubectl.get("deployment", plan.deployment)
    problems = _deployment_problems(deployment)
    if problems:
        return [f"{plan.deployment} is not ready: " + "; ".join(problems)]
    selector = deployment["spec"]["selector"]["matchLabels"]
    pods = [p for p in kubectl.pods(selector) if not p["metadata"].get("deletionTimestamp")]
    if not pods:
        return [f"no pods match {plan.deployment}'s selector"]
    not_ready = [p["metadata"]["name"] for p in pods if not _ready(p)]
    if not_ready:
        return [f"pods not Ready: {', '.join(not_ready)}"]
    return [p for p in (_deep_health_problem(kubectl, pod["metadata"]["name"], plan.port) for pod in pods) if p]


def _retarget_autoscalers(kubectl: Kubectl, plan: SwitchPlan, result: SwitchResult) -> None:
    target = {"spec": {"scaleTargetRef": {"name": plan.deployment}}}
    for kind, name in (("scaledobject", plan.scaled_object), ("hpa", plan.hpa)):
        if kubectl.exists(kind, name):
            kubectl.patch(kind, name, target)
            result.actions.append(f"{kind}/{name} now scales {plan.deployment}")


def switch(kubectl: Kubectl, plan: SwitchPlan, dry_run: bool = False) -> SwitchResult:
    service = kubectl.get("service", plan.service)
    previous = service["spec"].get("selector", {}).get(plan.color_label)
    if previous == plan.to:
        return SwitchResult(switched=False, previous=previous, actions=[f"service/{plan.service} already on {plan.to}"])
    problems = check_target(kubectl, plan)
    if problems:
        return SwitchResult(switched=False, previous=previous, problems=problems)
    result = SwitchResult(switched=not dry_run, previous=previous)
    if dry_run:
        result.actions.append(f"would move service/{plan.service} from {previous} to {plan.to}")
        return result
    kubectl.patch("service", plan.service, {"spec": {"selector": {plan.color_label: plan.to}}})
    result.actions.append(f"service/{plan.service}: {previous} -> {plan.to}")
    _retarget_autoscalers(kubectl, plan, result)
    return result
