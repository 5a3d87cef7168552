"""Tiny real Hugging Face checkpoints for tests, built locally (no network).

Weights come from transformers' own random init (``save_pretrained`` writes the real format);
the tokenizer is a byte-level BPE trained here with ``tokenizers`` on local text, with a
ChatML chat template. ``initializer_range`` is raised so greedy logits are well separated and
float32 reduction-order differences cannot flip an argmax.
"""

from __future__ import annotations

import json
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

_WORDS = ("the quick brown fox jumps over a lazy dog while paged attention keeps every block of the "
          "cache busy and the scheduler batches requests continuously so that throughput grows "
          "latency stays low prefix caching reuses shared prompts chunked prefill splits long inputs "
          "café naïve déjà vu 東京 北京 数据 模型 🙂 🚀 αβγ δ ε").split()


def corpus(lines: int = 400) -> list[str]:
    out = []
    for i in range(lines):
        words = [_WORDS[(i * 7 + j * 13 + (i * j) % 5) % len(_WORDS)] for j in range(8 + i % 9)]
        out.append(" ".join(words) + f" {i}.")
    return out


def build_tokenizer(out_dir: Path, vocab_size: int = 512) -> int:
    """Train a byte-level BPE and save it in the real HF format. Returns its vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token=None, unk_token=None)
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)
    return len(fast)


def tiny_config(arch: str, vocab_size: int, eos_id: int):
    """A tiny random config of each supported family (float32)."""
    from transformers import AutoConfig

    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  initializer_range=0.2, eos_token_id=eos_id, bos_token_id=None, pad_token_id=0,
                  tie_word_embeddings=False)
    variants = {
        "llama": ("llama", {}),
        "llama3": ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                              "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
                             "rope_theta": 500000.0}),
        "llama-mqa": ("llama", {"num_key_value_heads": 1}),
        "mistral": ("mistral", {"sliding_window": 24}),
        "qwen2": ("qwen2", {"tie_word_embeddings": True}),
        "qwen3": ("qwen3", {"head_dim": 32, "tie_word_embeddings": True}),
    }
    model_type, extra = variants[arch]
    return AutoConfig.for_model(model_type, **{**common, **extra})


ARCHS = ["llama", "llama3", "llama-mqa", "mistral", "qwen2", "qwen3"]


def build_checkpoint(arch: str, out_dir: Path, seed: int = 0) -> Path:
    """Write a tiny random checkpoint of ``arch`` with a trained tokenizer into ``out_dir``."""
    import torch
    from transformers import AutoModelForCausalLM

    out_dir.mkdir(parents=True, exist_ok=True)
    vocab = build_tokenizer(out_dir)
    eos_id = json.loads((out_dir / "tokenizer.json").read_text())["added_tokens"][2]["id"]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, vocab, eos_id), dtype=torch.float32)
    model.generation_config.eos_token_id = eos_id
    model.save_pretrained(out_dir)
    return out_dir


def hf_greedy(model_dir: Path, prompt_ids: list[int], max_new_tokens: int, _cache: dict = {}) -> list[int]:
    """transformers' own greedy ``generate`` (float32, CPU, batch of one), never stopping at EOS."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    key = str(model_dir)
    if key not in _cache:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        model.generation_config.eos_token_id = None  # generate() merges this in; we want no EOS stop
        _cache[key] = model
    model = _cache[key]
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, min_new_tokens=0, do_sample=False,
                           eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                             generation_config=cfg)
    return out[0, len(prompt_ids):].tolist()
