"""``tureen bench serve`` against a real ``tureen serve`` process on the tiny Llama checkpoint.

The benchmark's own counts must agree with what the server counted in ``/metrics``:
``vllm:request_success_total``, ``vllm:prompt_tokens_total`` and ``vllm:generation_tokens_total``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console

from serve_process import ServerProcess

from tureen.bench.serve import bench_serve
from tureen.bench.serve_config import ServeBenchConfig

KEY = "sk-bench"
NAME = "tiny-llama"


@pytest.fixture(scope="module")
def server(llama_dir, tmp_path_factory):
    s = ServerProcess(llama_dir, tmp_path_factory.mktemp("bench-serve") / "server.log", "--max-num-seqs", "16",
                      name=NAME, key=KEY)
    try:
        yield s.wait_healthy()
    finally:
        s.stop()


def counters(url: str) -> dict[str, float]:
    """The three server counters the benchmark must agree with (summed over labels)."""
    wanted = ("vllm:request_success_total", "vllm:prompt_tokens_total", "vllm:generation_tokens_total")
    out = dict.fromkeys(wanted, 0.0)
    for fam in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=10).text):
        for sample in fam.samples:
            if sample.name in out:
                out[sample.name] += sample.value
    return out


def run(server: ServerProcess, **kw) -> dict:
    cfg = ServeBenchConfig.from_kwargs(base_url=server.url, api_key=KEY, timeout=60.0, **kw)
    code, doc = bench_serve(cfg, Console(file=open(os.devnull, "w"), width=200))
    assert code == 0
    return doc


def assert_matches_server(before: dict[str, float], after: dict[str, float], runs: list[dict]) -> None:
    assert after["vllm:request_success_total"] - before["vllm:request_success_total"] == \
        sum(r["completed"] for r in runs)
    assert after["vllm:prompt_tokens_total"] - before["vllm:prompt_tokens_total"] == \
        sum(r["total_input_tokens"] for r in runs)
    assert after["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"] == \
        sum(r["total_output_tokens"] for r in runs)


def test_sweep_counts_and_tokens_match_the_servers_metrics(server: ServerProcess, tmp_path: Path) -> None:
    save, plot = tmp_path / "sweep.json", tmp_path / "sweep.png"
    before = counters(server.url)
    doc = run(server, dataset="random", input_len=32, output_len=12, num_prompts=8, ignore_eos=True,
              sweep_concurrency="1,2,4", goodput=["ttft:2000", "tpot:500"], percentiles="50,90,99",
              save_result=str(save), plot=str(plot))
    assert_matches_server(before, counters(server.url), doc["sweep"])
    assert doc["model_id"] == NAME  # taken from /v1/models
    for level in doc["sweep"]:
        assert level["completed"] == 8 and level["failed"] == 0
        assert level["total_output_tokens"] == 8 * 12  # ignore_eos: exactly max_tokens each
        # random prompts have exactly --input-len tokens under the server's own tokenizer
        assert level["input_lens"] == [32] * 8
        for metric in ("ttft", "tpot", "itl", "e2el"):
            assert level[f"p50_{metric}_ms"] <= level[f"p90_{metric}_ms"] <= level[f"p99_{metric}_ms"]
        assert 0 <= level["request_goodput"] <= level["request_throughput"]
    saved = json.loads(save.read_text())
    assert [lv["max_concurrency"] for lv in saved["sweep"]] == [1, 2, 4]
    # one gap per content chunk after the first. There can be fewer gaps than tokens: a chunk whose
    # text the server holds back (an incomplete UTF-8 character) has no content, and a stream whose
    # reader lags gets several tokens merged into one chunk (engine/output_stream.py), on a loaded
    # machine possibly all of them. Never more chunks than tokens, and most streams are not merged.
    gaps = [len(rec["itl"]) for lv in saved["sweep"] for rec in lv["requests"]]
    assert all(0 <= n <= 11 for n in gaps) and sum(gaps) > 0
    from PIL import Image

    with Image.open(plot) as img:
        assert img.format == "PNG" and img.size[0] > 800
        assert np.asarray(img.convert("L")).std() > 5


def test_chat_prefix_workload_with_a_local_tokenizer(server: ServerProcess, llama_dir: Path) -> None:
    before = counters(server.url)
    doc = run(server, endpoint="chat", dataset="prefix", tokenizer=str(llama_dir), input_len=16, prefix_len=48,
              output_len=8, num_prompts=6, max_concurrency=3, request_rate=50.0)
    assert doc["completed"] == 6 and doc["failed"] == 0
    assert_matches_server(before, counters(server.url), [doc])
    # chat prompts: 64 tokens of text plus the chat template's own tokens, as the server counts them
    assert all(n > 64 for n in doc["input_lens"])
    assert all(rec["output_len_source"] == "usage" for rec in doc["requests"])


def test_a_short_queue_sheds_503s_counted_as_failures(llama_dir: Path, tmp_path: Path) -> None:
    s = ServerProcess(llama_dir, tmp_path / "small.log", "--max-num-seqs", "1", "--max-queue-len", "1",
                      name=NAME, key=KEY).wait_healthy()
    try:
        before = counters(s.url)
        doc = run(s, dataset="random", input_len=16, output_len=48, ignore_eos=True, num_prompts=8)
        assert_matches_server(before, counters(s.url), [doc])
    finally:
        s.stop()
    assert doc["completed"] + doc["failed"] == 8 and doc["not_sent"] == 0
    assert doc["completed"] >= 1  # a burst of 8 into a queue of 1: the first is admitted, most are shed
    assert doc["failure_reasons"].get("http_503", 0) >= 4
    assert set(doc["failure_reasons"]) == {"http_503"}
    shed = [r for r in doc["requests"] if r["error_reason"] == "http_503"]
    assert all(r["retry_after"] is not None and r["status_code"] == 503 for r in shed)
