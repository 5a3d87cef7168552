"""The planner's parameter count against transformers' own count, presets, and config reading."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from tureen.errors import ModelLoadError, UnsupportedArchitectureError
from tureen.plan import arch_from_config, count_params, estimate
from tureen.plan.presets import _ROWS, _key, find_preset, preset_names
from tureen.plan.source import load_arch

_TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=211, max_position_embeddings=256)

# (config class, extra config fields): every family and option that changes the shapes.
_CASES = {
    "llama-untied": (transformers.LlamaConfig, {"tie_word_embeddings": False}),
    "llama-tied": (transformers.LlamaConfig, {"tie_word_embeddings": True}),
    "llama-biases": (transformers.LlamaConfig, {"attention_bias": True, "mlp_bias": True}),
    "llama-head-dim": (transformers.LlamaConfig, {"head_dim": 24}),
    "llama-mha": (transformers.LlamaConfig, {"num_key_value_heads": 4}),
    "mistral": (transformers.MistralConfig, {"tie_word_embeddings": False}),
    "mistral-tied": (transformers.MistralConfig, {"tie_word_embeddings": True}),
    "qwen2-untied": (transformers.Qwen2Config, {"tie_word_embeddings": False}),
    "qwen2-tied": (transformers.Qwen2Config, {"tie_word_embeddings": True}),
    "qwen3-untied": (transformers.Qwen3Config, {"tie_word_embeddings": False, "head_dim": 32}),
    "qwen3-tied": (transformers.Qwen3Config, {"tie_word_embeddings": True, "head_dim": 32}),
    "qwen3-bias": (transformers.Qwen3Config, {"attention_bias": True, "head_dim": 16}),
}


def _transformers_count(config) -> int:
    with torch.device("meta"):  # shapes only, no memory
        model = transformers.AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())  # tied weights are yielded once


@pytest.mark.parametrize("case", list(_CASES))
def test_param_count_matches_transformers(case):
    config_cls, extra = _CASES[case]
    config = config_cls(**{**_TINY, **extra})
    arch = arch_from_config(config.to_dict(), case)
    assert count_params(arch).total == _transformers_count(config)


def test_param_count_from_saved_checkpoint_config(tmp_path):
    """A config.json written by save_pretrained (transformers 5 writes 'dtype') reads back."""
    config = transformers.Qwen3Config(**_TINY, head_dim=32, tie_word_embeddings=False, dtype="bfloat16")
    config.save_pretrained(tmp_path)
    arch = load_arch(str(tmp_path))
    assert arch.model_type == "qwen3" and arch.qk_norm and arch.head_dim == 32
    assert arch.torch_dtype == "bfloat16"
    assert count_params(arch).total == _transformers_count(config)
    assert estimate(tmp_path / "config.json", gpu="L4").params == count_params(arch).total


def test_components_add_up_and_linear_weights_exclude_embeddings():
    arch = arch_from_config(transformers.LlamaConfig(**_TINY).to_dict(), "tiny")
    c = count_params(arch)
    hidden, inter, layers = 64, 96, 3
    assert c.embedding == 211 * hidden and c.lm_head == 211 * hidden
    assert c.mlp == layers * 3 * hidden * inter
    assert c.norms == (2 * layers + 1) * hidden
    assert c.linear_weights == c.attention + c.mlp  # no biases or q/k norms in plain llama


# Published totals (model cards / safetensors metadata) the presets must reproduce.
_PUBLISHED = {
    "llama-2-7b": 6_738_415_616,
    "llama-3-8b": 8_030_261_248,
    "mistral-7b": 7_241_732_096,
}
_PUBLISHED_APPROX = {  # model-card figures, given to 3 significant digits
    "llama-2-13b": 13.0e9, "llama-2-70b": 69.0e9, "llama-3-70b": 70.6e9, "llama-3.1-405b": 406e9,
    "llama-3.2-1b": 1.24e9, "llama-3.2-3b": 3.21e9, "qwen2.5-7b": 7.61e9, "qwen2.5-72b": 72.7e9,
    "qwen2.5-0.5b": 0.494e9, "qwen3-8b": 8.19e9, "qwen3-32b": 32.8e9, "qwen3-0.6b": 0.596e9,
    "tinyllama-1.1b": 1.10e9, "mistral-nemo-12b": 12.2e9,
}


@pytest.mark.parametrize("name", list(_PUBLISHED))
def test_presets_reproduce_published_counts_exactly(name):
    assert estimate(name).params == _PUBLISHED[name]


@pytest.mark.parametrize("name", list(_PUBLISHED_APPROX))
def test_presets_reproduce_published_counts(name):
    assert estimate(name).params == pytest.approx(_PUBLISHED_APPROX[name], rel=0.005)


@pytest.mark.parametrize("spelling, preset", [
    ("llama-2-7b", "llama-2-7b"), ("Llama-2-7B", "llama-2-7b"), ("llama_3.1_8b", "llama-3.1-8b"),
    ("Qwen3 8B", "qwen3-8b"), ("MISTRAL-7B", "mistral-7b"),
    ("meta-llama/Llama-2-7b-hf", "llama-2-7b"), ("meta-llama/Meta-Llama-3.1-8B-Instruct", "llama-3.1-8b"),
    ("Qwen/Qwen2.5-7B-Instruct", "qwen2.5-7b"), ("qwen/qwen3-0.6b", "qwen3-0.6b"),
    ("mistralai/Mistral-7B-Instruct-v0.2", "mistral-7b"),
])
def test_preset_names_and_hub_aliases(spelling, preset):
    hit = find_preset(spelling)
    assert hit is not None and hit[0] == preset


def test_hub_alias_overrides_differ_from_preset():
    _, base = find_preset("Qwen/Qwen2.5-7B")
    _, instruct = find_preset("Qwen/Qwen2.5-7B-Instruct")
    assert base["max_position_embeddings"] == 131072 and instruct["max_position_embeddings"] == 32768


def test_preset_keys_are_unique_and_cover_the_issue_list():
    assert len({_key(name) for name in _ROWS}) == len(_ROWS)
    for required in ("llama-2-7b", "llama-2-13b", "llama-2-70b", "llama-3-8b", "llama-3-70b", "llama-3.1-8b",
                     "llama-3.1-70b", "llama-3.1-405b", "mistral-7b", "qwen2.5-7b", "qwen2.5-72b",
                     "qwen3-0.6b", "qwen3-8b", "qwen3-32b"):
        assert required in preset_names()


def test_bad_configs_raise_typed_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="lacks hidden_size"):
        arch_from_config({"model_type": "llama", "num_hidden_layers": 2}, "broken")
    with pytest.raises(UnsupportedArchitectureError, match="mixture-of-experts"):
        arch_from_config({**_TINY, "model_type": "mixtral", "num_local_experts": 8}, "moe")
    with pytest.raises(UnsupportedArchitectureError, match="--params"):
        arch_from_config({**_TINY, "model_type": "gpt_neox"}, "neox")
    assert arch_from_config({**_TINY, "model_type": "gpt_neox"}, "neox", allow_unknown=True).num_hidden_layers == 3
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="cannot read"):
        load_arch(str(tmp_path))


def test_unknown_model_type_with_params_override_still_plans(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**_TINY, "model_type": "gpt_neox"}))
    e = estimate(str(tmp_path), params="1B", gpu="L4")
    assert e.params == 10**9 and any("llama-style" in note for note in e.notes)
