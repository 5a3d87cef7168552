"""A tiny random checkpoint whose tokenizer was trained on JSON, for structured-output tests.

Its vocabulary is mostly JSON pieces (quotes, braces, digits, keys), the way a real model's
vocabulary is full of the pieces of its training text. The weights are random, the hardest case
for a constraint: every step the model proposes junk, and only the grammar keeps the output
valid. With this vocabulary a random walk through the grammar also closes strings and objects
within a few dozen tokens, so outputs end by themselves instead of at max_tokens.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from checkpoints import CHAT_TEMPLATE, SPECIAL, tiny_config

_KEYS = ["name", "age", "city", "tags", "id", "score", "items", "ok", "kind", "value", "user", "list"]
_WORDS = ["a", "b", "x", "yes", "no", "red", "blue", "tokyo", "cat", "dog", "42", "-7", "3.5"]


def _value(rng: random.Random, depth: int):
    roll = rng.random()
    if depth > 2 or roll < 0.3:
        return rng.choice(_WORDS)
    if roll < 0.5:
        return rng.randint(-100, 100)
    if roll < 0.6:
        return rng.choice([True, False, None, 1.25])
    if roll < 0.8:
        return [_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {rng.choice(_KEYS): _value(rng, depth + 1) for _ in range(rng.randint(0, 3))}


def json_corpus(lines: int = 600) -> list[str]:
    rng = random.Random(0)
    docs = [json.dumps({rng.choice(_KEYS): _value(rng, 0) for _ in range(rng.randint(1, 4))},
                       separators=rng.choice([(",", ":"), (", ", ": ")])) for _ in range(lines)]
    return docs + ["yes no maybe (1+2)*3 abc-12 " * 2 for _ in range(20)]


def build_json_checkpoint(out_dir: Path, vocab_size: int = 320, seed: int = 0) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    out_dir.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(json_corpus(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token=None, unk_token=None)
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)
    eos_id = fast.convert_tokens_to_ids("<|im_end|>")
    torch.manual_seed(seed)
    config = tiny_config("llama", len(fast), eos_id)
    config.max_position_embeddings = 2048  # room for tool definitions in the prompt
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.eos_token_id = eos_id
    model.save_pretrained(out_dir)
    return out_dir
