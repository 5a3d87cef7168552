"""``tureen plan`` through the real command line: tables, JSON, --compare, --help and bad input."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import transformers

from tureen.cli import build_parser, main
from tureen.plan import PlanOptions, estimate

ISSUE_JSON_FIELDS = ("params", "weight_bytes", "kv_bytes_per_token", "kv_bytes_per_sequence", "kv_budget_bytes",
                     "max_concurrent_sequences", "fits", "min_gpus", "decode_tokens_per_s_batch1",
                     "decode_tokens_per_s_batch", "prefill_seconds", "cost_per_1k_output_tokens", "monthly_cost",
                     "breakeven_tokens_per_day")


def _run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tureen.cli", "plan", *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, **(env or {})})


def test_table_output(capsys):
    assert main(["plan", "llama-2-7b", "--gpu", "A100-80GB"]) == 0
    out = capsys.readouterr().out
    e = estimate("llama-2-7b", gpu="A100-80GB")
    assert "llama-2-7b on 1 x A100-80GB" in out
    assert "per GPU" in out and "total" in out
    assert "13.48 GB" in out  # weights
    assert f"{e.num_kv_blocks:,}" in out and "break-even" in out


def test_json_output_matches_the_python_api(capsys):
    argv = ["plan", "qwen3-8b", "--gpu", "h100", "--max-model-len", "8192", "--weight-quant", "fp8",
            "--kv-cache-dtype", "fp8", "--num-gpus", "2", "--params", "8B", "--json"]
    assert main(argv) == 0
    data = json.loads(capsys.readouterr().out)
    expected = estimate("qwen3-8b", gpu="h100", max_model_len=8192, weight_quant="fp8", kv_cache_dtype="fp8",
                        num_gpus=2, params="8B").to_dict()
    assert data == json.loads(json.dumps(expected))
    for name in ISSUE_JSON_FIELDS:
        assert data[name] is not None, name
    assert data["params"] == 8 * 10**9 and data["num_gpus"] == 2


def test_tensor_parallel_size_is_an_alias_of_num_gpus(capsys):
    assert main(["plan", "llama-3-70b", "--tensor-parallel-size", "4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["num_gpus"] == 4


def test_compare_puts_gpus_side_by_side(capsys):
    assert main(["plan", "llama-3.1-8b", "--compare", "A10,L4,H100-SXM", "--max-model-len", "4096"]) == 0
    out = capsys.readouterr().out
    for label in ("1 x A10", "1 x L4", "1 x H100-SXM"):
        assert label in out
    assert main(["plan", "llama-3.1-8b", "--compare", "A10, l4 ,H100-SXM", "--max-model-len", "4096",
                 "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [d["gpu"] for d in data] == ["A10", "L4", "H100-SXM"]
    assert data[2]["decode_tokens_per_s_batch1"] > data[0]["decode_tokens_per_s_batch1"]


def test_cpu_mode_flags(capsys, tmp_path):
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=300)
    config.save_pretrained(tmp_path)
    assert main(["plan", str(tmp_path), "--kv-cache-memory", "1MiB", "--block-size", "8", "--max-model-len", "100",
                 "--dtype", "float32", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    per_token = 2 * 2 * 2 * 16 * 4
    assert data["device"] == "cpu" and data["kv_bytes_per_token"] == per_token
    assert data["num_kv_blocks"] == 2**20 // (8 * per_token)
    assert data["max_concurrent_sequences"] == data["num_kv_blocks"] // 13  # ceil(100 / 8) blocks each


def test_help_documents_every_flag():
    sub = build_parser()._subparsers._group_actions[0].choices["plan"]
    help_text = sub.format_help()
    flags = ["--compare", "--json", "--tensor-parallel-size"]
    flags += ["--" + f.name.replace("_", "-") for f in dataclasses.fields(PlanOptions)]
    for flag in flags:
        assert flag in help_text, flag
    for action in sub._actions:  # and each has a help text of its own
        assert action.help, action.option_strings
    result = _run_cli("--help")
    assert result.returncode == 0 and "--api-input-price" in result.stdout and "llama-3.1-405b" in result.stdout


@pytest.mark.parametrize("args, message", [
    (["llama-2-7b", "--gpu", "TPUv9"], "unknown GPU 'TPUv9'"),
    (["llama-2-7b", "--compare", "A100-80GB,B300"], "unknown GPU 'B300'"),
    (["llama-9-7b"], "unknown model 'llama-9-7b'"),
    (["./no/such/checkpoint"], "no such checkpoint"),
    (["llama-2-7b", "--avg-prompt-len", "-5"], "avg_prompt_len must be >= 1"),
    (["llama-2-7b", "--max-model-len", "-1"], "max_model_len must be >= 1"),
    (["llama-2-7b", "--params", "lots"], "cannot parse parameter count"),
    (["llama-2-7b", "--num-gpus", "3"], "tensor-parallel size 3"),
])
def test_bad_input_gives_a_clear_error_without_traceback(args, message):
    result = _run_cli(*args)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_missing_config_in_a_directory(tmp_path):
    result = _run_cli(str(tmp_path))
    assert result.returncode != 0 and "no config.json" in result.stderr and "Traceback" not in result.stderr


def test_argparse_type_errors_exit_cleanly():
    result = _run_cli("llama-2-7b", "--block-size", "sixteen")
    assert result.returncode == 2 and "invalid int value" in result.stderr and "Traceback" not in result.stderr


def test_unreachable_hub_id_is_a_clear_error():
    result = _run_cli("some-org/some-model", env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode != 0
    assert "cannot fetch config.json of 'some-org/some-model'" in result.stderr
    assert "llama-2-7b" in result.stderr and "Traceback" not in result.stderr


def test_hub_id_is_read_through_hf_hub_download(monkeypatch, tmp_path, capsys):
    import huggingface_hub

    transformers.MistralConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=1, vocab_size=500).save_pretrained(tmp_path)
    calls = []

    def fake_download(repo_id, filename, **kwargs):
        calls.append((repo_id, filename))
        return str(tmp_path / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    assert main(["plan", "acme/tiny-mistral", "--gpu", "L4", "--json"]) == 0
    assert calls == [("acme/tiny-mistral", "config.json")]
    data = json.loads(capsys.readouterr().out)
    assert data["model"] == "acme/tiny-mistral" and data["kv_bytes_per_token"] == 2 * 2 * 1 * 32 * 2
    assert data["dtype"] == "bfloat16"  # the config names no dtype: the GPU default
