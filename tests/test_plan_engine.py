"""The planner and the engine agree on the KV cache: same blocks, same maximum concurrency.

Builds a tiny float32 llama checkpoint (random weights, a byte-level BPE tokenizer trained on
local text), starts ``tureen.LLM`` on CPU with a KV budget and block size, and compares the
engine's numbers with ``tureen.plan.estimate`` in CPU mode for the same inputs.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

import pytest
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

import tureen
from tureen.config import parse_size
from tureen.plan import estimate

_SPECIAL = ["<unk>", "<s>", "</s>"]


def _local_text_lines(limit: int = 400) -> list[str]:
    """A few hundred lines of local text: tureen's own source."""
    lines: list[str] = []
    for path in sorted(Path(tureen.__file__).parent.rglob("*.py")):
        lines += [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return lines[:limit]


def _write_tokenizer(path: Path) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=_SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(_local_text_lines(), trainer=trainer)
    tokenizer.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "<unk>", "bos_token": "<s>",
        "eos_token": "</s>", "model_max_length": 256}))
    return tokenizer


def _write_tiny_llama(path: Path) -> None:
    tokenizer = _write_tokenizer(path)
    config = transformers.LlamaConfig(
        vocab_size=tokenizer.get_vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=tokenizer.token_to_id("<s>"), eos_token_id=tokenizer.token_to_id("</s>"),
        tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(path)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny_llama")
    _write_tiny_llama(path)
    return path


# (kv_cache_memory, block_size, max_model_len)
_CASES = [(2**20, 16, 128), ("3MiB", 8, 100), ("700KiB", 32, 256)]


@pytest.mark.parametrize("kv_cache_memory, block_size, max_model_len", _CASES)
def test_planner_matches_engine_kv_blocks_and_concurrency(tiny_llama, kv_cache_memory, block_size, max_model_len):
    llm = tureen.LLM(str(tiny_llama), kv_cache_memory=kv_cache_memory, block_size=block_size,
                     max_model_len=max_model_len, dtype="float32", device="cpu")
    plan = estimate(tiny_llama, kv_cache_memory=kv_cache_memory, block_size=block_size,
                    max_model_len=max_model_len, dtype="float32")
    assert plan.device == "cpu"
    # the brief's engine formula, computed independently of both
    per_token = 2 * 2 * 2 * 16 * 4  # K and V x layers x kv_heads x head_dim x float32
    blocks = parse_size(kv_cache_memory) // (block_size * per_token)
    assert plan.kv_bytes_per_token == per_token and plan.num_kv_blocks == blocks
    assert plan.max_concurrent_sequences == blocks // math.ceil(max_model_len / block_size)
    assert llm.llm_engine.num_kv_blocks == plan.num_kv_blocks
    assert llm.llm_engine.max_concurrency == plan.max_concurrent_sequences


def test_planner_matches_the_engine_startup_log(tiny_llama, caplog):
    caplog.set_level(logging.INFO, logger="tureen.engine")
    tureen.LLM(str(tiny_llama), kv_cache_memory="2MiB", block_size=16, max_model_len=200, dtype="float32",
               device="cpu")
    plan = estimate(tiny_llama, kv_cache_memory="2MiB", block_size=16, max_model_len=200, dtype="float32")
    pattern = r"KV cache: (\d+) blocks x 16 tokens .* max concurrency at max_model_len=200: (\d+) sequences"
    found = [re.search(pattern, record.getMessage()) for record in caplog.records]
    match = next(m for m in found if m)
    assert int(match.group(1)) == plan.num_kv_blocks
    assert int(match.group(2)) == plan.max_concurrent_sequences
