"""`tureen generate` and the README/CI contract, run the way a user runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from checkpoints import hf_greedy

ROOT = Path(__file__).resolve().parents[1]


def tureen(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tureen.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def test_generate_prints_the_greedy_continuation(llama_dir):
    from tureen.tokenizer import Tokenizer

    res = tureen("generate", str(llama_dir), "--prompt", "the quick brown fox", "--max-tokens", "12",
                 "--ignore-eos", "--json", "--dtype", "float32", "--kv-cache-memory", "8MiB", "--device", "cpu")
    assert res.returncode == 0, res.stderr
    (line,) = res.stdout.strip().splitlines()
    out = json.loads(line)
    ids = Tokenizer.from_pretrained(llama_dir).encode("the quick brown fox")
    assert out["outputs"][0]["token_ids"] == hf_greedy(llama_dir, ids, 12)
    assert out["outputs"][0]["finish_reason"] == "length"
    assert "KV cache:" in res.stderr and "max concurrency" in res.stderr


def test_generate_reports_bad_input_without_a_traceback(llama_dir):
    res = tureen("generate", str(llama_dir), "--prompt", "hi", "--max-tokens", "9999", "--max-model-len", "64",
                 "--kv-cache-memory", "8MiB", "--device", "cpu")
    assert res.returncode == 2
    assert "maximum context length is 64" in res.stderr and "Traceback" not in res.stderr


def test_generate_defaults_to_the_demo_model_and_says_it_is_random(tmp_path):
    res = tureen("generate", "--max-tokens", "4", "--kv-cache-memory", "16MiB", "--device", "cpu",
                 env={"TUREEN_CACHE_DIR": str(tmp_path)})
    assert res.returncode == 0, res.stderr
    assert "RANDOM weights" in res.stderr
    assert (tmp_path / "demo-llama-v1" / "model.safetensors").exists()


def test_help_lists_every_room():
    res = tureen("--help")
    assert res.returncode == 0
    for cmd in ("generate", "serve", "bench", "plan"):
        assert cmd in res.stdout


def test_ci_runs_exactly_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci_lines = [ln for ln in (ROOT / ".ci" / "run").read_text().splitlines() if ln and not ln.startswith("#")]
    test_cmd = ci_lines[-1]
    assert "pytest" in test_cmd
    assert f"\n{test_cmd}\n" in readme, "README's test command and .ci/run must be the same line"
