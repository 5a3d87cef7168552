"""Find a checkpoint (local directory or hub id), read its config and load its safetensors weights.

Model parameters keep their Hugging Face names. The exceptions are declared, not coded per model:
``model.packed_modules_mapping`` maps a checkpoint name fragment (``q_proj``) to the fused
parameter (``qkv_proj``) and the shard it fills; each parameter's ``weight_loader(param, loaded,
shard_id)`` copies the shard into place. Tied embeddings share one parameter.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from tureen.errors import ModelLoadError
from tureen.executor.models.registry import model_module

logger = logging.getLogger("tureen.executor")

HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model"]
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def resolve_checkpoint(model: str, revision: str | None = None) -> Path:
    """A local directory (or a path to its config.json) as is; otherwise download a hub id."""
    path = Path(model).expanduser()
    if path.is_file() and path.name == "config.json":
        return path.parent
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"checkpoint directory {path} has no config.json")
        return path
    if model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise ModelLoadError(f"checkpoint directory {model!r} does not exist")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=model, revision=revision, allow_patterns=HUB_PATTERNS))
    except Exception as e:  # hub errors come in many types; all mean "cannot get it"
        raise ModelLoadError(
            f"{model!r} is not a local checkpoint directory and could not be downloaded from the Hugging Face "
            f"hub ({type(e).__name__}: {e}). Without network access (or with HF_HUB_OFFLINE=1) only local "
            f"directories and already-cached hub snapshots can be loaded.") from e


def load_hf_config(path: Path | str) -> dict[str, Any]:
    config_file = Path(path) / "config.json"
    try:
        return json.loads(config_file.read_text())
    except FileNotFoundError as e:
        raise ModelLoadError(f"no config.json in {path}") from e
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"cannot read {config_file}: {e}") from e


def resolve_dtype(requested: str, hf_config: dict[str, Any], device: torch.device) -> torch.dtype:
    """``auto`` = the checkpoint's dtype, except float16 becomes float32 on CPU."""
    if requested != "auto":
        return _DTYPES[requested]
    name = hf_config.get("torch_dtype") or hf_config.get("dtype") or "float32"
    dtype = _DTYPES.get(str(name).removeprefix("torch."), torch.float32)
    if dtype == torch.float16 and device.type == "cpu":
        return torch.float32  # half matmuls on CPU are slow or missing; bfloat16 is fine
    return dtype


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def load_model(path: Path, hf_config: dict[str, Any], device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Build the family's model on ``device`` in ``dtype`` and fill it from the checkpoint."""
    module = model_module(hf_config)
    args = module.ModelArgs.from_dict(hf_config)
    with torch.device(device), _default_dtype(dtype):
        model = module.Model(args)
    load_weights(model, path)
    return model.eval()


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError) as e:
            raise ModelLoadError(f"cannot read {index}: {e}") from e
        files = [path / name for name in dict.fromkeys(weight_map.values())]
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"no *.safetensors weights in {path}")
    for f in files:
        if not f.is_file():
            raise ModelLoadError(f"weight file {f.name} listed in the index is missing from {path}")
    return files


def _target(name: str, mapping: dict[str, tuple[str, Any]]) -> tuple[str, Any]:
    """Checkpoint tensor name -> (model parameter name, shard id or None)."""
    for fragment, (fused, shard_id) in mapping.items():
        if f".{fragment}." in name:
            return name.replace(f".{fragment}.", f".{fused}."), shard_id
    return name, None


def _expected_names(model: nn.Module, mapping: dict[str, tuple[str, Any]]) -> set[str]:
    """Every checkpoint tensor name the model needs (fused parameters expanded to their shards)."""
    fused = {}
    for fragment, (target, _) in mapping.items():
        fused.setdefault(target, []).append(fragment)
    expected = set()
    for pname, _ in model.named_parameters(remove_duplicate=False):
        hit = next((t for t in fused if f".{t}." in pname), None)
        expected.update([pname.replace(f".{hit}.", f".{f}.") for f in fused[hit]] if hit else [pname])
    return expected


def load_weights(model: nn.Module, path: Path) -> None:
    """Copy every tensor of the checkpoint into the model; missing or unknown tensors are errors."""
    files = _weight_files(path)
    mapping = getattr(model, "packed_modules_mapping", {})
    names_by_file = {}
    for f in files:
        with safe_open(f, framework="pt") as sf:
            names_by_file[f] = [n for n in sf.keys() if not n.endswith(_IGNORED_SUFFIXES)]
    present = {n for names in names_by_file.values() for n in names}
    tied = model.args.tie_word_embeddings or "lm_head.weight" not in present
    if tied:
        model.tie_weights()
    params = dict(model.named_parameters(remove_duplicate=False))
    expected = _expected_names(model, mapping) - ({"lm_head.weight"} if tied else set())
    for f, names in names_by_file.items():
        with safe_open(f, framework="pt") as sf:
            for name in names:
                if name == "lm_head.weight" and tied:
                    continue  # some tied checkpoints store the shared matrix twice
                if name not in expected:
                    raise ModelLoadError(f"checkpoint tensor {name!r} ({f.name}) does not belong to the model")
                _load_tensor(params, name, sf.get_tensor(name), mapping)
    missing = sorted(expected - present)
    if missing:
        raise ModelLoadError(f"checkpoint {path} is missing tensor(s): {', '.join(missing[:8])}"
                             + (f" and {len(missing) - 8} more" if len(missing) > 8 else ""))


def _load_tensor(params: dict[str, nn.Parameter], name: str, tensor: torch.Tensor,
                 mapping: dict[str, tuple[str, Any]]) -> None:
    pname, shard_id = _target(name, mapping)
    param = params[pname]
    try:
        param.weight_loader(param, tensor, shard_id)
    except ModelLoadError as e:
        raise ModelLoadError(f"tensor {name!r}: {e}") from e
