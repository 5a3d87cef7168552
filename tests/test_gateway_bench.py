"""``tureen bench gateway`` runs end to end on a tiny load (a smoke test; the figures live in README)."""

from __future__ import annotations

import json
import subprocess
import sys


def test_bench_gateway_small_run_writes_results_and_plot(tmp_path):
    out, plot = tmp_path / "gw.json", tmp_path / "gw.png"
    res = subprocess.run([sys.executable, "-m", "tureen.cli", "bench", "gateway", "--streams", "1,4", "--requests",
                          "6", "--tokens", "3", "--ttft-ms", "2", "--itl-ms", "1", "--warmup", "2",
                          "--save-result", str(out), "--plot", str(plot)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    levels = json.loads(out.read_text())["levels"]
    assert [level["streams"] for level in levels] == [1, 4]
    for level in levels:
        for side in ("direct", "gateway"):
            assert level[side]["requests"] == 6 and level[side]["errors"] == 0
            assert level[side]["tokens_per_s"] > 0
        assert level["gateway"]["cpu_ms_per_request"] > 0 and level["throughput_ratio"] > 0
    assert plot.stat().st_size > 1000
