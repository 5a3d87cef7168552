"""Find a model's ``config.json``: a local checkpoint or file, a preset, or the Hugging Face hub."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tureen.errors import ModelLoadError
from tureen.plan import presets
from tureen.plan.arch import ModelArch, arch_from_config


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} does not hold a JSON object")
    return data


def _local_config(path: Path) -> dict[str, Any]:
    config = path / "config.json" if path.is_dir() else path
    if not config.is_file():
        raise ModelLoadError(f"no config.json in {path}; the planner needs the checkpoint's config")
    return _read_json(config)


def _looks_like_path(model: str) -> bool:
    return model.startswith((".", "/", "~")) or model.endswith(".json") or model.count("/") > 1


def _hub_config(repo_id: str) -> dict[str, Any]:
    from huggingface_hub import hf_hub_download

    try:
        return _read_json(Path(hf_hub_download(repo_id, "config.json")))
    except ModelLoadError:
        raise
    except Exception as exc:  # offline, unknown repo, gated repo, bad id: all mean "no config"
        raise ModelLoadError(
            f"cannot fetch config.json of {repo_id!r} from the Hugging Face hub "
            f"({type(exc).__name__}). Without network access, use a local checkpoint or a preset: "
            f"{', '.join(presets.preset_names())}") from None


def _unknown(model: str) -> ModelLoadError:
    close = presets.suggest(model)
    hint = f" Did you mean {' or '.join(close)}?" if close else ""
    return ModelLoadError(
        f"unknown model {model!r}: not a local path, preset or hub id (owner/name).{hint} "
        f"Presets: {', '.join(presets.preset_names())}")


def load_config(model: str) -> tuple[str, dict[str, Any]]:
    """``(display name, config dict)``; local paths win over presets, presets over the hub."""
    path = Path(model).expanduser()
    if path.exists():
        name = (path if path.is_dir() else path.parent).resolve().name
        return name, _local_config(path)
    if _looks_like_path(model):
        raise ModelLoadError(f"no such checkpoint or config file: {model}")
    hit = presets.find_preset(model)
    if hit is not None:
        return hit
    if model.count("/") == 1:
        return model, _hub_config(model)
    raise _unknown(model)


def load_arch(model: str, *, allow_unknown: bool = False) -> ModelArch:
    name, config = load_config(model)
    return arch_from_config(config, name, allow_unknown=allow_unknown)
