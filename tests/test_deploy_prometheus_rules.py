"""deploy/prometheus and deploy/alertmanager: promtool and amtool accept the files, every alert is
unit-tested to fire and to stay quiet, and every runbook link lands on a section of docs/runbook.md."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from deploy_exprs import ALERT_RULES, DEPLOY, RECORDING_RULES

ROOT = DEPLOY.parent
PROMETHEUS = DEPLOY / "prometheus"
ALERTMANAGER = DEPLOY / "alertmanager" / "alertmanager.yml"
RUNBOOK = ROOT / "docs" / "runbook.md"


def _run(tool: str, *args: str) -> subprocess.CompletedProcess:
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed (scripts/ci-system-deps.sh installs it)")
    return subprocess.run([tool, *args], capture_output=True, text=True, timeout=120, cwd=PROMETHEUS)


def _alerts() -> list[dict]:
    return [rule for group in yaml.safe_load(ALERT_RULES.read_text())["groups"] for rule in group["rules"]]


def test_promtool_check_config():
    res = _run("promtool", "check", "config", "prometheus.yml")
    assert res.returncode == 0, res.stdout + res.stderr


def test_promtool_check_rules():
    res = _run("promtool", "check", "rules", str(RECORDING_RULES), str(ALERT_RULES))
    assert res.returncode == 0, res.stdout + res.stderr


def test_promtool_unit_tests_pass():
    res = _run("promtool", "test", "rules", "tests/alerts_test.yml")
    assert res.returncode == 0 and "SUCCESS" in res.stdout, res.stdout + res.stderr


def test_every_alert_has_a_firing_and_a_quiet_unit_test():
    tests = yaml.safe_load((PROMETHEUS / "tests" / "alerts_test.yml").read_text())["tests"]
    fired, quiet = set(), set()
    for case in tests:
        for check in case["alert_rule_test"]:
            (fired if check["exp_alerts"] else quiet).add(check["alertname"])
    names = {a["alert"] for a in _alerts()}
    assert names <= fired
    # a quiet case is either an explicit empty expectation or a healthy series beside the firing one
    healthy_beside = {check["alertname"] for case in tests for check in case["alert_rule_test"]
                      if check["exp_alerts"] and len(case["input_series"]) > len(check["exp_alerts"])}
    assert names <= quiet | healthy_beside


def test_promtool_unit_tests_fail_when_an_alert_is_broken(tmp_path):
    """The unit tests can fail: with one threshold raised, promtool reports the missing alert."""
    (tmp_path / "rules").mkdir()
    (tmp_path / "tests").mkdir()
    shutil.copy(RECORDING_RULES, tmp_path / "rules")
    (tmp_path / "rules" / "alerts.yml").write_text(ALERT_RULES.read_text().replace(
        "max by (model_name, instance) (vllm:kv_cache_usage_perc) > 0.9",
        "max by (model_name, instance) (vllm:kv_cache_usage_perc) > 0.99"))
    shutil.copy(PROMETHEUS / "tests" / "alerts_test.yml", tmp_path / "tests")
    if shutil.which("promtool") is None:
        pytest.skip("promtool is not installed")
    res = subprocess.run(["promtool", "test", "rules", "tests/alerts_test.yml"], capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)
    assert res.returncode != 0 and "TureenKVCacheNearlyFull" in res.stdout + res.stderr


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to dashes."""
    heads = re.findall(r"^#{1,6}\s+(.+?)\s*$", markdown, flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in heads}


def test_every_alert_links_a_runbook_section_with_a_check_and_a_fix():
    anchors = _anchors(RUNBOOK.read_text())
    sections = re.split(r"^## ", RUNBOOK.read_text(), flags=re.M)
    for alert in _alerts():
        assert alert["labels"]["severity"] in ("critical", "warning"), alert["alert"]
        url = alert["annotations"]["runbook_url"]
        assert url.split("#")[0].endswith("docs/runbook.md"), url
        anchor = url.split("#", 1)[1]
        assert anchor in anchors, (alert["alert"], anchor)
        [body] = [s for s in sections if _anchors("## " + s.splitlines()[0]) == {anchor}]
        assert "Check" in body and "Do" in body, anchor


def test_amtool_check_config():
    res = _run("amtool", "check-config", str(ALERTMANAGER))
    assert res.returncode == 0 and "SUCCESS" in res.stdout, res.stdout + res.stderr


@pytest.mark.parametrize("severity, receivers", [("critical", "pager,chat"), ("warning", "chat")])
def test_alertmanager_routes_by_severity(severity, receivers):
    res = _run("amtool", "config", "routes", "test", f"--config.file={ALERTMANAGER}", f"severity={severity}",
               "alertname=TureenQueueBacklog")
    assert res.returncode == 0 and res.stdout.strip() == receivers, res.stdout + res.stderr
