"""Every PromQL expression shipped in deploy/: the dashboard's targets and the rules' expressions,
each tagged with the process whose metrics it reads (the engine, the gateway, the gateway caches)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
DASHBOARD = DEPLOY / "grafana" / "tureen-dashboard.json"
RECORDING_RULES = DEPLOY / "prometheus" / "rules" / "recording.yml"
ALERT_RULES = DEPLOY / "prometheus" / "rules" / "alerts.yml"

# Grafana's variables, as the test's Prometheus sees them: every model, a window of a few scrapes.
GRAFANA_VARIABLES = {"$model_name": ".*", "$__rate_interval": "1m"}

_METRIC = re.compile(r"(?<![\w:])((?:vllm|tureen|tureen_gateway)[\w:]*)")


@dataclass(frozen=True)
class Expr:
    where: str  # e.g. "dashboard: Time to first token (TTFT) [A]"
    promql: str

    @property
    def metrics(self) -> set[str]:
        return set(_METRIC.findall(self.promql))

    @property
    def source(self) -> str:
        """Which process exports what the expression reads: engine, gateway or cache."""
        names = self.metrics
        if any(n.startswith("tureen_gateway_cache_") for n in names):
            return "cache"
        if any(n.startswith("tureen_gateway_") for n in names):
            return "gateway"
        return "engine"


def _substitute(promql: str) -> str:
    for name, value in GRAFANA_VARIABLES.items():
        promql = promql.replace(name, value)
    return promql


def dashboard_exprs(path: Path = DASHBOARD) -> list[Expr]:
    dash = json.loads(path.read_text())
    out = []
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            out.append(Expr(f"dashboard: {panel['title']} [{target['refId']}]", _substitute(target["expr"])))
    return out


def rule_exprs(path: Path, kind: str) -> list[Expr]:
    doc = yaml.safe_load(path.read_text())
    return [Expr(f"{kind}: {rule.get('record') or rule.get('alert')}", rule["expr"].strip())
            for group in doc["groups"] for rule in group["rules"]]


def live_checked_exprs() -> list[Expr]:
    """What must return data against a live Prometheus: the dashboard and the recording rules."""
    return dashboard_exprs() + rule_exprs(RECORDING_RULES, "recording rule")
