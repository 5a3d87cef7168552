"""Find the model file for a checkpoint by its ``architectures`` (or, failing that, ``model_type``).

Each family module exports one fixed pair: ``Model`` (the nn.Module) and ``ModelArgs`` (the
config dataclass that drops unknown keys).
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

from tureen.errors import UnsupportedArchitectureError

# architecture class name -> module under tureen.executor.models
ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
MODEL_TYPES: dict[str, str] = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3"}


def supported_architectures() -> list[str]:
    return sorted(ARCHITECTURES)


def model_module(hf_config: dict[str, Any]) -> ModuleType:
    """The family module for this config.json, or UnsupportedArchitectureError."""
    archs = hf_config.get("architectures") or []
    name = next((ARCHITECTURES[a] for a in archs if a in ARCHITECTURES), None)
    if name is None and not archs:
        name = MODEL_TYPES.get(hf_config.get("model_type", ""))
    if name is None:
        found = ", ".join(archs) or f"model_type={hf_config.get('model_type')!r}"
        raise UnsupportedArchitectureError(
            f"unsupported architecture {found}; tureen supports: {', '.join(supported_architectures())}")
    return importlib.import_module(f"tureen.executor.models.{name}")
