"""The built-in demo checkpoint: real Hugging Face format, cached, built atomically, said to be random."""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

import pytest

from tureen import demo
from tureen.demo import DEMO_MODEL_DIRNAME, DEMO_MODEL_NOTICE, demo_model_path
from tureen.tokenizer import Tokenizer

CHATS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "Réponds en français."}, {"role": "user", "content": "東京は? 🙂"},
     {"role": "assistant", "content": "def f(x):\n    return x"}, {"role": "user", "content": "again"}],
]
TEXTS = ["Hello, world!", "def add(a, b):\n    return a + b\n", "Café déjà vu", "東京 🙂 👩‍👩‍👧", ""]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The demo checkpoint built once in a private cache dir, with its build time."""
    cache = tmp_path_factory.mktemp("cache")
    start = time.perf_counter()
    path = demo_model_path(cache)
    return path, time.perf_counter() - start


@pytest.fixture(scope="module")
def checkpoint(built) -> Path:
    return built[0]


def test_build_is_fast_and_in_the_cache_folder(built):
    path, seconds = built
    assert path.name == DEMO_MODEL_DIRNAME
    assert seconds < 60
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no staging folders left


def test_config_describes_the_requested_llama(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    expected = {"hidden_size": 384, "intermediate_size": 1024, "num_hidden_layers": 8, "num_attention_heads": 6,
                "num_key_value_heads": 2, "head_dim": 64, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
                "rope_theta": 10000.0, "tie_word_embeddings": True, "torch_dtype": "float32"}
    assert {k: config[k] for k in expected} == expected
    tokenizer = Tokenizer.from_pretrained(checkpoint)
    assert config["vocab_size"] == tokenizer.vocab_size == demo.VOCAB_SIZE
    assert config["bos_token_id"] == tokenizer.bos_token_id
    assert tokenizer.eos_token_ids == [config["eos_token_id"], tokenizer.token_to_id("<|endoftext|>")]
    assert tokenizer.id_to_token(config["eos_token_id"]) == "<|im_end|>"


def test_weights_have_hf_names_random_values_and_unit_norms(checkpoint):
    from safetensors.torch import load_file

    tensors = load_file(checkpoint / "model.safetensors")
    assert "lm_head.weight" not in tensors  # tied to the embedding
    assert "model.layers.7.self_attn.k_proj.weight" in tensors
    assert tensors["model.layers.0.self_attn.k_proj.weight"].shape == (128, 384)
    assert tensors["model.layers.0.mlp.down_proj.weight"].shape == (384, 1024)
    assert bool((tensors["model.norm.weight"] == 1).all())
    assert bool((tensors["model.layers.3.post_attention_layernorm.weight"] == 1).all())
    std = float(tensors["model.embed_tokens.weight"].std())
    assert abs(std - 0.02) < 0.001
    assert 10_000_000 <= sum(t.numel() for t in tensors.values()) <= 30_000_000


def test_transformers_loads_the_model(checkpoint):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert 10_000_000 <= sum(p.numel() for p in model.parameters()) <= 30_000_000
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        logits = model(torch.tensor([[0, 5, 6]])).logits
    assert logits.shape == (1, 3, demo.VOCAB_SIZE) and bool(torch.isfinite(logits).all())


def test_tokenizer_and_chat_template_match_transformers(checkpoint):
    from transformers import AutoTokenizer

    hf, ours = AutoTokenizer.from_pretrained(checkpoint), Tokenizer.from_pretrained(checkpoint)
    assert len(hf) == ours.vocab_size
    for text in TEXTS:
        assert ours.encode(text) == hf.encode(text)
        assert ours.decode(ours.encode(text)) == text == hf.decode(hf.encode(text), skip_special_tokens=True)
    for chat in CHATS:
        for gen in (True, False):
            expected = hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen)
            assert ours.apply_chat_template(chat, add_generation_prompt=gen) == expected
    rendered = ours.apply_chat_template(CHATS[0])
    assert rendered == "<|begin_of_text|><|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n"
    ids = ours.encode(rendered, add_special_tokens=False)
    assert ids[0] == ours.bos_token_id and ids.count(ours.bos_token_id) == 1
    assert ours.token_to_id("<|im_start|>") in ids  # special tokens in the template are single ids


def test_readme_and_notice_say_random(checkpoint):
    readme = (checkpoint / "README.md").read_text()
    assert "RANDOM" in readme and "meaningless" in readme
    assert "RANDOM weights" in DEMO_MODEL_NOTICE


def test_second_call_uses_the_cache(checkpoint, monkeypatch):
    def fail(_directory):
        raise AssertionError("the demo model was rebuilt")

    before = (checkpoint / "model.safetensors").stat().st_mtime_ns
    monkeypatch.setattr(demo, "write_demo_checkpoint", fail)
    assert demo_model_path(checkpoint.parent) == checkpoint
    assert (checkpoint / "model.safetensors").stat().st_mtime_ns == before


def test_tokenizer_training_is_deterministic():
    assert demo.train_demo_tokenizer().to_str() == demo.train_demo_tokenizer().to_str()


def test_cache_dir_defaults_to_env_then_home(monkeypatch, tmp_path):
    monkeypatch.setenv("TUREEN_CACHE_DIR", str(tmp_path))
    assert demo.default_cache_dir() == tmp_path
    monkeypatch.delenv("TUREEN_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert demo.default_cache_dir() == tmp_path / "home" / ".cache" / "tureen"


def _fake_writer(calls: list[int]):
    """A stand-in for the slow build that writes the five files slowly, tagged by writer."""
    lock = threading.Lock()

    def write(directory: Path) -> None:
        with lock:
            calls.append(len(calls))
            tag = calls[-1]
        for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
            (directory / name).write_text(json.dumps({"writer": tag}))
            time.sleep(0.01)
        (directory / "model.safetensors").write_bytes(b"x" * 1000)
    return write


def test_racing_creators_end_with_one_complete_copy(monkeypatch, tmp_path, caplog):
    calls: list[int] = []
    monkeypatch.setattr(demo, "write_demo_checkpoint", _fake_writer(calls))
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(demo_model_path(tmp_path))) for _ in range(4)]
    with caplog.at_level(logging.WARNING, logger="tureen.demo"):
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    target = tmp_path / DEMO_MODEL_DIRNAME
    assert results == [target] * 4
    writers = {json.loads((target / name).read_text())["writer"]
               for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json")}
    assert len(writers) == 1  # every file from the same build, never a mix
    assert [p.name for p in tmp_path.iterdir()] == [DEMO_MODEL_DIRNAME]  # staging folders cleaned up
    assert "RANDOM weights" in caplog.text  # creation says plainly that the weights are random


def test_damaged_cache_is_rebuilt(monkeypatch, tmp_path):
    calls: list[int] = []
    monkeypatch.setattr(demo, "write_demo_checkpoint", _fake_writer(calls))
    target = demo_model_path(tmp_path)
    (target / "model.safetensors").unlink()
    assert demo_model_path(tmp_path) == target
    assert (target / "model.safetensors").is_file() and len(calls) == 2
    assert [p.name for p in tmp_path.iterdir()] == [DEMO_MODEL_DIRNAME]
