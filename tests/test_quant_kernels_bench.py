"""``tureen bench quant``: one run over several variants of a tiny checkpoint writes a coherent report.

Timings are not asserted (shared machine); what is checked is that every variant was really built
as asked (its weight bytes and linear kernels), that the fidelity numbers behave like fidelity
numbers (the reference against itself is exact, a quantized variant is close but not identical),
and that the JSON and the PNG are written.
"""

from __future__ import annotations

import json

import pytest

from tureen.bench.quant import Variant
from tureen.cli import main

SMALL = ["--num-prompts", "2", "--input-len", "4", "8", "--output-len", "2", "4", "--decode-tokens", "4",
         "--repeats", "1", "--fidelity-tokens", "48", "--kv-cache-memory", "8MiB", "--threads", "1"]


def test_bench_quant_reports_every_variant(llama_dir, tmp_path, capsys):
    import torch

    threads = torch.get_num_threads()
    text = tmp_path / "held_out.txt"
    text.write_text("the scheduler batches requests continuously while paged attention keeps blocks busy " * 8)
    rc = main(["bench", "quant", str(llama_dir), "--variants", "none,int8,int4:32", "--text-file", str(text),
               "--output-dir", str(tmp_path), *SMALL])
    assert rc == 0 and torch.get_num_threads() == threads  # --threads 1 applied to the bench only
    doc = json.loads((tmp_path / "bench-quant.json").read_text())
    assert not doc["demo_model"] and doc["perplexity_note"] is None and doc["settings"]["threads"] == 1
    ref, int8, int4 = doc["results"]
    assert [r["variant"] for r in doc["results"]] == ["unquantized", "int8", "int4 (group 32)"]
    assert ref["fidelity"]["mean_kl"] == 0.0 and ref["fidelity"]["top1_agreement"] == 1.0
    assert ref["fidelity"]["perplexity"] == ref["fidelity"]["reference_perplexity"]
    for r in (int8, int4):
        f = r["fidelity"]
        assert 0.0 < f["mean_kl"] < 0.5 and f["positions"] == ref["fidelity"]["positions"] > 0
        assert f["reference_perplexity"] == ref["fidelity"]["perplexity"]
        assert r["kv_bytes_per_token"] == ref["kv_bytes_per_token"]  # weights only: the cache is unchanged
        assert r["offline_output_tokens_per_s"] > 0 and r["batch1_decode_tokens_per_s"] > 0
        assert set(r["linear_pass_us"]) == {"1", "32"} and min(r["linear_pass_us"].values()) > 0
    assert ref["weight_bytes"] > int8["weight_bytes"] > int4["weight_bytes"]
    assert any("int8" in k for k in int8["linear_kernels"]) and any("int4" in k for k in int4["linear_kernels"])
    assert int8["ratios"]["weight_memory"] == pytest.approx(int8["weight_bytes"] / ref["weight_bytes"])
    assert (tmp_path / "bench-quant.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "unquantized" in out and "linear kernels of int4 (group 32)" in out


def test_bench_quant_rejects_bad_variants(llama_dir, tmp_path, capsys):
    assert main(["bench", "quant", str(llama_dir), "--variants", "int8:64", "--output-dir", str(tmp_path)]) == 2
    assert "only int4 takes a group size" in capsys.readouterr().err
    assert main(["bench", "quant", str(llama_dir), "--quantization", "int8", "--output-dir", str(tmp_path)]) == 2
    assert not (tmp_path / "bench-quant.json").exists()


@pytest.mark.parametrize("spec,name,quantization,group", [
    ("none", "unquantized", None, None), ("int8", "int8", "int8", None), ("int4", "int4 (group 128)", "int4", 128),
    ("int4:-1", "int4 (per row)", "int4", -1), ("FP8", "fp8", "fp8", None), ("gptq", "gptq", "gptq", None),
])
def test_variant_names(spec, name, quantization, group):
    v = Variant.parse(spec)
    assert (v.name, v.quantization, v.group_size) == (name, quantization, group)


@pytest.mark.parametrize("spec,name,group", [("int8-a8", "int8 W8A8", None), ("int4:64-a8", "int4 (group 64) W8A8", 64)])
def test_a8_variants_ask_for_int8_activations(spec, name, group):
    v = Variant.parse(spec)
    assert (v.name, v.group_size, v.activation) == (name, group, "int8")
    assert v.engine_kwargs()["quantization_activation"] == "int8"
    assert "quantization_activation" not in Variant.parse(spec[:-3]).engine_kwargs()
    with pytest.raises(ValueError, match="need a quantized variant"):
        Variant.parse("none-a8")


def test_top1_agreement_comes_with_its_95_percent_interval():
    """A 99% target cannot be judged on a few hundred positions: the report says how sure it is."""
    from tureen.bench.quant import Fidelity

    assert Fidelity(1024, 1e-5, 0.99, 10.0, 10.0).top1_margin() == pytest.approx(0.0061, abs=1e-4)
    assert Fidelity(4096, 1e-5, 0.99, 10.0, 10.0).top1_margin() == pytest.approx(0.00305, abs=1e-4)
    assert Fidelity(4096, 0.0, 1.0, 10.0, 10.0).top1_margin() < 1e-4
