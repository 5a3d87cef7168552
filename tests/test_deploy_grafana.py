"""deploy/grafana: the dashboard has the rows the issue names, a model_name variable that every
engine panel filters on, and only Prometheus targets (checked live in test_deploy_prometheus_live)."""

from __future__ import annotations

import json

from deploy_exprs import DASHBOARD, dashboard_exprs

DASH = json.loads(DASHBOARD.read_text())
ROWS = ["Latency", "Throughput and batch size", "KV cache and preemptions", "Prefix cache", "Gateway",
        "Caches per tier", "Tokens and spend by team"]


def _panels_by_row() -> dict[str, list[dict]]:
    rows, current = {}, None
    for panel in DASH["panels"]:
        if panel["type"] == "row":
            current = panel["title"]
            rows[current] = []
        else:
            rows[current].append(panel)
    return rows


def test_rows_in_order_and_each_has_panels():
    rows = _panels_by_row()
    assert list(rows) == ROWS
    assert all(rows[r] for r in ROWS)


def test_the_panels_the_issue_names():
    titles = {row: " | ".join(p["title"] for p in panels) for row, panels in _panels_by_row().items()}
    for word in ("TTFT", "ITL", "TPOT", "E2E"):
        assert word in titles["Latency"]
    for word in ("429s by limit", "Retries", "Circuit breakers", "overhead", "Requests by status"):
        assert word in titles["Gateway"]
    assert "Preemptions" in titles["KV cache and preemptions"]
    assert "Batch size" in titles["Throughput and batch size"]
    assert "Spend" in titles["Tokens and spend by team"] and "Tokens" in titles["Tokens and spend by team"]


def test_model_name_variable_filters_every_engine_panel():
    variables = {v["name"]: v for v in DASH["templating"]["list"]}
    assert "model_name" in variables and "label_values(" in variables["model_name"]["definition"]
    raw = [t["expr"] for p in DASH["panels"] for t in p.get("targets", [])]
    engine = [e for e in raw if "vllm:" in e or "tureen:" in e]
    assert engine and all('model_name=~"$model_name"' in e for e in engine)


def test_latency_panels_show_p50_p95_p99():
    latency = _panels_by_row()["Latency"][:4]
    for panel in latency:
        quantiles = sorted(t["expr"].split("(", 2)[1].split(",")[0] for t in panel["targets"])
        assert quantiles == ["0.5", "0.95", "0.99"], panel["title"]


def test_unique_panel_ids_and_prometheus_targets():
    ids = [p["id"] for p in DASH["panels"]]
    assert len(ids) == len(set(ids))
    assert all(t["datasource"]["type"] == "prometheus" for p in DASH["panels"] for t in p.get("targets", []))
    assert len(dashboard_exprs()) >= 30
