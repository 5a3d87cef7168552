"""Public architecture numbers of common checkpoints, so the planner works without a download.

Each preset holds the fields of the model's published ``config.json`` that size it; the
parameter count is computed from them (``arch.count_params``), never stored. Names are matched
case-insensitively, ignoring dashes, underscores and spaces; the Hugging Face hub ids of the
base and instruct checkpoints are accepted as aliases.
"""

from __future__ import annotations

import difflib
import re
from typing import Any

# Columns: model_type, hidden, layers, heads, kv_heads, head_dim, intermediate, vocab, tied, max_positions
_ROWS: dict[str, tuple] = {
    "llama-2-7b": ("llama", 4096, 32, 32, 32, 128, 11008, 32000, False, 4096),
    "llama-2-13b": ("llama", 5120, 40, 40, 40, 128, 13824, 32000, False, 4096),
    "llama-2-70b": ("llama", 8192, 80, 64, 8, 128, 28672, 32000, False, 4096),
    "llama-3-8b": ("llama", 4096, 32, 32, 8, 128, 14336, 128256, False, 8192),
    "llama-3-70b": ("llama", 8192, 80, 64, 8, 128, 28672, 128256, False, 8192),
    "llama-3.1-8b": ("llama", 4096, 32, 32, 8, 128, 14336, 128256, False, 131072),
    "llama-3.1-70b": ("llama", 8192, 80, 64, 8, 128, 28672, 128256, False, 131072),
    "llama-3.1-405b": ("llama", 16384, 126, 128, 8, 128, 53248, 128256, False, 131072),
    "llama-3.2-1b": ("llama", 2048, 16, 32, 8, 64, 8192, 128256, True, 131072),
    "llama-3.2-3b": ("llama", 3072, 28, 24, 8, 128, 8192, 128256, True, 131072),
    "tinyllama-1.1b": ("llama", 2048, 22, 32, 4, 64, 5632, 32000, False, 2048),
    "mistral-7b": ("mistral", 4096, 32, 32, 8, 128, 14336, 32000, False, 32768),
    "mistral-7b-v0.3": ("mistral", 4096, 32, 32, 8, 128, 14336, 32768, False, 32768),
    "mistral-nemo-12b": ("mistral", 5120, 40, 32, 8, 128, 14336, 131072, False, 1024000),
    "qwen2.5-0.5b": ("qwen2", 896, 24, 14, 2, 64, 4864, 151936, True, 32768),
    "qwen2.5-1.5b": ("qwen2", 1536, 28, 12, 2, 128, 8960, 151936, True, 32768),
    "qwen2.5-3b": ("qwen2", 2048, 36, 16, 2, 128, 11008, 151936, True, 32768),
    "qwen2.5-7b": ("qwen2", 3584, 28, 28, 4, 128, 18944, 152064, False, 32768),
    "qwen2.5-14b": ("qwen2", 5120, 48, 40, 8, 128, 13824, 152064, False, 32768),
    "qwen2.5-32b": ("qwen2", 5120, 64, 40, 8, 128, 27648, 152064, False, 32768),
    "qwen2.5-72b": ("qwen2", 8192, 80, 64, 8, 128, 29568, 152064, False, 32768),
    "qwen3-0.6b": ("qwen3", 1024, 28, 16, 8, 128, 3072, 151936, True, 40960),
    "qwen3-1.7b": ("qwen3", 2048, 28, 16, 8, 128, 6144, 151936, True, 40960),
    "qwen3-4b": ("qwen3", 2560, 36, 32, 8, 128, 9728, 151936, True, 40960),
    "qwen3-8b": ("qwen3", 4096, 36, 32, 8, 128, 12288, 151936, False, 40960),
    "qwen3-14b": ("qwen3", 5120, 40, 40, 8, 128, 17408, 151936, False, 40960),
    "qwen3-32b": ("qwen3", 5120, 64, 64, 8, 128, 25600, 151936, False, 40960),
}

# Hub ids accepted as aliases: id -> (preset, config fields that differ from the preset).
# Qwen2.5 base configs list 131,072 positions; the instruct configs (the preset) list 32,768.
_QWEN25_BASE = {"max_position_embeddings": 131072}
_HUB_IDS: dict[str, tuple[str, dict[str, Any]]] = {
    "meta-llama/Llama-2-7b-hf": ("llama-2-7b", {}),
    "meta-llama/Llama-2-7b-chat-hf": ("llama-2-7b", {}),
    "meta-llama/Llama-2-13b-hf": ("llama-2-13b", {}),
    "meta-llama/Llama-2-13b-chat-hf": ("llama-2-13b", {}),
    "meta-llama/Llama-2-70b-hf": ("llama-2-70b", {}),
    "meta-llama/Llama-2-70b-chat-hf": ("llama-2-70b", {}),
    "meta-llama/Meta-Llama-3-8B": ("llama-3-8b", {}),
    "meta-llama/Meta-Llama-3-8B-Instruct": ("llama-3-8b", {}),
    "meta-llama/Meta-Llama-3-70B": ("llama-3-70b", {}),
    "meta-llama/Meta-Llama-3-70B-Instruct": ("llama-3-70b", {}),
    "meta-llama/Llama-3.1-8B": ("llama-3.1-8b", {}),
    "meta-llama/Llama-3.1-8B-Instruct": ("llama-3.1-8b", {}),
    "meta-llama/Meta-Llama-3.1-8B": ("llama-3.1-8b", {}),
    "meta-llama/Meta-Llama-3.1-8B-Instruct": ("llama-3.1-8b", {}),
    "meta-llama/Llama-3.1-70B": ("llama-3.1-70b", {}),
    "meta-llama/Llama-3.1-70B-Instruct": ("llama-3.1-70b", {}),
    "meta-llama/Meta-Llama-3.1-70B": ("llama-3.1-70b", {}),
    "meta-llama/Meta-Llama-3.1-70B-Instruct": ("llama-3.1-70b", {}),
    "meta-llama/Llama-3.1-405B": ("llama-3.1-405b", {}),
    "meta-llama/Llama-3.1-405B-Instruct": ("llama-3.1-405b", {}),
    "meta-llama/Llama-3.2-1B": ("llama-3.2-1b", {}),
    "meta-llama/Llama-3.2-1B-Instruct": ("llama-3.2-1b", {}),
    "meta-llama/Llama-3.2-3B": ("llama-3.2-3b", {}),
    "meta-llama/Llama-3.2-3B-Instruct": ("llama-3.2-3b", {}),
    "TinyLlama/TinyLlama-1.1B-Chat-v1.0": ("tinyllama-1.1b", {}),
    "mistralai/Mistral-7B-v0.1": ("mistral-7b", {}),
    "mistralai/Mistral-7B-Instruct-v0.1": ("mistral-7b", {}),
    "mistralai/Mistral-7B-Instruct-v0.2": ("mistral-7b", {}),
    "mistralai/Mistral-7B-v0.3": ("mistral-7b-v0.3", {}),
    "mistralai/Mistral-7B-Instruct-v0.3": ("mistral-7b-v0.3", {}),
    "mistralai/Mistral-Nemo-Base-2407": ("mistral-nemo-12b", {}),
    "mistralai/Mistral-Nemo-Instruct-2407": ("mistral-nemo-12b", {}),
    **{f"Qwen/Qwen2.5-{size}-Instruct": (f"qwen2.5-{size.lower()}", {})
       for size in ("0.5B", "1.5B", "3B", "7B", "14B", "32B", "72B")},
    **{f"Qwen/Qwen2.5-{size}": (f"qwen2.5-{size.lower()}", _QWEN25_BASE) for size in ("7B", "14B", "32B", "72B")},
    **{f"Qwen/Qwen3-{size}{suffix}": (f"qwen3-{size.lower()}", {})
       for size in ("0.6B", "1.7B", "4B", "8B", "14B", "32B") for suffix in ("", "-Base")},
}


def _key(name: str) -> str:
    """Matching key: lower case, without dashes, underscores or spaces (so 'Llama 3.1 8B' matches)."""
    return re.sub(r"[\s_\-]", "", name.strip().lower())


# Checkpoints published in float16; the others are bfloat16.
_FLOAT16 = {"llama-2-7b", "llama-2-13b", "llama-2-70b"}


def _row_to_config(name: str) -> dict[str, Any]:
    model_type, hidden, layers, heads, kv_heads, head_dim, inter, vocab, tied, max_pos = _ROWS[name]
    return {
        "model_type": model_type, "hidden_size": hidden, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": head_dim,
        "intermediate_size": inter, "vocab_size": vocab, "tie_word_embeddings": tied,
        "max_position_embeddings": max_pos,
        "torch_dtype": "float16" if name in _FLOAT16 else "bfloat16",
    }


_BY_KEY: dict[str, tuple[str, dict[str, Any]]] = {
    **{_key(hub_id): (preset, extra) for hub_id, (preset, extra) in _HUB_IDS.items()},
    **{_key(name): (name, {}) for name in _ROWS},
}


def preset_names() -> list[str]:
    return list(_ROWS)


def find_preset(name: str) -> tuple[str, dict[str, Any]] | None:
    """``(preset name, config dict)`` for a preset name or known hub id, else ``None``."""
    hit = _BY_KEY.get(_key(name))
    if hit is None:
        return None
    preset, extra = hit
    return preset, {**_row_to_config(preset), **extra}


def suggest(name: str) -> list[str]:
    """Preset names close to a mistyped one."""
    keys = {_key(p): p for p in _ROWS}
    return [keys[k] for k in difflib.get_close_matches(_key(name), list(keys), n=3, cutoff=0.6)]
