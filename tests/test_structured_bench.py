"""``tureen bench structured``: one small run writes a coherent report.

Timings are not asserted (shared machine). What is checked: both batches ran on the same prompts,
the unconstrained one produced every requested token, only the constrained one filled bitmasks,
the per-phase breakdown and the CPU-time figures are there, and the JSON is written.
"""

from __future__ import annotations

import json

from tureen.cli import main


def test_bench_structured_reports_both_batches(llama_dir, tmp_path, capsys):
    out = tmp_path / "structured.json"
    rc = main(["bench", "structured", str(llama_dir), "--batch-size", "4", "--constrained-fraction", "0.5",
               "--input-len", "4", "--output-len", "6", "--repeats", "1", "--kv-cache-memory", "8MiB",
               "--step-timing", "--save-result", str(out)])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert doc["constrained"] == 2 and doc["batch_size"] == 4
    plain = [r for r in doc["runs"] if r["label"] == "unconstrained"]
    mixed = [r for r in doc["runs"] if r["label"] == "2/4 JSON schema"]
    assert len(plain) == len(mixed) == 1
    assert all(r["output_tokens"] == 4 * 6 for r in plain)  # ignore_eos: every request reaches max_tokens
    assert all(2 * 6 < r["output_tokens"] <= 4 * 6 for r in mixed)  # a finished JSON may stop early
    assert all(r["bitmask_fill_seconds"] == 0.0 for r in plain)
    assert all(r["bitmask_fill_seconds"] > 0.0 for r in mixed)
    for r in doc["runs"]:
        assert r["cpu_seconds"] > 0 and r["cpu_ms_per_token"] > 0
        assert {"schedule", "forward", "sampling", "update"} <= set(r["phases"])
    assert doc["compile"]["cache_hit_ms"] < doc["compile"]["first_ms"]
    assert set(doc["median_cpu_ms_per_token"]) == {"unconstrained", "2/4 JSON schema"}
    captured = capsys.readouterr()
    assert "throughput loss with constraints" in captured.err and "by process CPU time" in captured.err
    assert "Per step, by phase" in captured.out


def test_bench_structured_parts_times_every_piece(llama_dir, tmp_path):
    out = tmp_path / "parts.json"
    rc = main(["bench", "structured", str(llama_dir), "--parts", "--batch-size", "4", "--constrained-fraction",
               "0.5", "--repeats", "1", "--kv-cache-memory", "8MiB", "--save-result", str(out)])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert doc["constrained"] == 2 and doc["vocab_size"] > 0
    names = set(doc["parts"])
    assert {"fill: one by one (used)", "apply: numpy, branch-free (used)", "apply: xgrammar CPU kernel",
            "unconstrained sampler call (scale)"} <= names
    assert all(0 < t["min_us"] <= t["median_us"] for t in doc["parts"].values())
