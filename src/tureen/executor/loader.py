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
from tureen.executor.models.layers import LinearLayer, checkpoint_module_names
from tureen.executor.models.registry import model_module
from tureen.executor.quantization.base import LinearMethodFactory
from tureen.executor.quantization.unquantized import FloatWeightsMethod

logger = logging.getLogger("tureen.executor")

HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model"]
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
# Static KV-cache scales of fp8-KV checkpoints (llm-compressor kv_cache_scheme, vLLM fp8): tureen's
# quantized KV cache sets its own scale per token and head when it writes, so these are unused.
_KV_SCALE_SUFFIXES = (".k_scale", ".v_scale", ".kv_scale", ".q_scale", ".prob_scale")


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


def model_args(hf_config: dict[str, Any]) -> Any:
    """The family's typed args for ``config.json`` (what ``load_model`` builds the model from)."""
    return model_module(hf_config).ModelArgs.from_dict(hf_config)


def load_model(path: Path, hf_config: dict[str, Any], device: torch.device, dtype: torch.dtype,
               linear: LinearMethodFactory | None = None) -> nn.Module:
    """Build the family's model on ``device`` in ``dtype``, give each linear layer its method from
    ``linear`` (default: ``F.linear`` on float weights), fill it from the checkpoint and let every
    method process its weights once."""
    module = model_module(hf_config)
    args = module.ModelArgs.from_dict(hf_config)
    with torch.device(device), _default_dtype(dtype):
        model = module.Model(args)
        if linear is not None:
            model.set_linear_methods(linear)
    load_weights(model, path)
    with torch.device(device):
        model.process_weights_after_loading()
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


def _expected_names(model: nn.Module, mapping: dict[str, tuple[str, Any]]) -> tuple[set[str], set[str]]:
    """(required, optional) checkpoint tensor names: linear layers ask their method (fused layers
    expanded to their shards); every other parameter is required under its own name."""
    required, optional = set(), set()
    linear_names = set()
    for name, layer in model.linear_layers():
        need, may = layer.method.tensor_names(layer)
        for prefix in checkpoint_module_names(name, mapping):
            required.update(f"{prefix}.{t}" for t in need)
            optional.update(f"{prefix}.{t}" for t in may)
        linear_names.update(f"{name}.{p}" for p, _ in layer.named_parameters(recurse=False))
    for pname, _ in model.named_parameters(remove_duplicate=False):
        if pname not in linear_names:
            required.add(pname)
    return required, optional


def _lm_head_is_tied(model: nn.Module, present: set[str]) -> bool:
    """Tied when the config says so (some tied checkpoints still store the matrix) or when the
    checkpoint has no LM head at all. A quantized LM head is never tied."""
    has_head = any(n.startswith("lm_head.") for n in present)
    float_head = isinstance(model.lm_head.method, FloatWeightsMethod)
    if not has_head and not float_head:
        raise ModelLoadError("the checkpoint has no lm_head tensors, but its quantization config quantizes "
                             "the LM head")
    return float_head and (model.args.tie_word_embeddings or not has_head)


def load_weights(model: nn.Module, path: Path) -> None:
    """Copy every tensor of the checkpoint into the model; missing or unknown tensors are errors."""
    files = _weight_files(path)
    mapping = getattr(model, "packed_modules_mapping", {})
    names_by_file, kv_scales = {}, 0
    for f in files:
        with safe_open(f, framework="pt") as sf:
            names = [n for n in sf.keys() if not n.endswith(_IGNORED_SUFFIXES)]
        names_by_file[f] = [n for n in names if not n.endswith(_KV_SCALE_SUFFIXES)]
        kv_scales += len(names) - len(names_by_file[f])
    if kv_scales:
        logger.info("ignoring %d static KV-cache scale tensors of the checkpoint (a quantized KV cache sets its "
                    "own scale per token and head)", kv_scales)
    present = {n for names in names_by_file.values() for n in names}
    tied = _lm_head_is_tied(model, present)
    if tied:
        model.tie_weights()
    required, optional = _expected_names(model, mapping)
    if tied:
        required -= {"lm_head.weight"}
    modules = dict(model.named_modules())
    params = dict(model.named_parameters(remove_duplicate=False))
    for f, names in names_by_file.items():
        with safe_open(f, framework="pt") as sf:
            for name in names:
                if name.startswith("lm_head.") and tied:
                    continue  # some tied checkpoints store the shared matrix twice
                if name not in required and name not in optional:
                    raise ModelLoadError(f"checkpoint tensor {name!r} ({f.name}) does not belong to the model")
                _load_tensor(modules, params, name, sf.get_tensor(name), mapping)
    missing = sorted(required - present)
    if missing:
        raise ModelLoadError(f"checkpoint {path} is missing tensor(s): {', '.join(missing[:8])}"
                             + (f" and {len(missing) - 8} more" if len(missing) > 8 else ""))


def _load_tensor(modules: dict[str, nn.Module], params: dict[str, nn.Parameter], name: str, tensor: torch.Tensor,
                 mapping: dict[str, tuple[str, Any]]) -> None:
    pname, shard_id = _target(name, mapping)
    module_name, _, tensor_name = pname.rpartition(".")
    layer = modules.get(module_name)
    try:
        if isinstance(layer, LinearLayer):
            layer.load_tensor(shard_id, tensor_name, tensor)
        else:
            param = params[pname]
            param.weight_loader(param, tensor, shard_id)
    except ModelLoadError as e:
        raise ModelLoadError(f"tensor {name!r}: {e}") from e
