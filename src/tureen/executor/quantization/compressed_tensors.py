"""compressed-tensors (llm-compressor) checkpoints: ``config_groups`` of schemes, each targeting layers.

A layer's scheme is the group whose ``targets`` name it most specifically: its exact module name,
then an ``re:`` pattern, then the class ``Linear``. Layers no group targets, and those in
``ignore``, stay unquantized. Weight-only on this engine: a scheme's ``input_activations`` (W8A8)
are not emulated, activations stay float (logged once).
"""

from __future__ import annotations

import logging
import re
from typing import Any

from tureen.errors import ModelLoadError
from tureen.executor.quantization.base import LinearBackend, LinearMethod
from tureen.executor.quantization.config import QuantizationConfig
from tureen.executor.quantization.formats import CtIntFormat, CtPackedFormat, Fp8Format
from tureen.executor.quantization.methods import CheckpointFormat, QuantizedLinearMethod

logger = logging.getLogger("tureen.executor")


def _scheme_format(scheme: dict[str, Any], fmt: str, group: str) -> CheckpointFormat | None:
    w = scheme.get("weights")
    if not w:
        return None
    bits, kind = int(w.get("num_bits", 8)), str(w.get("type", "int"))
    strategy, group_size = str(w.get("strategy") or "tensor"), w.get("group_size")
    where = f"quantization_config.config_groups.{group}"
    if fmt == "pack-quantized":
        return CtPackedFormat(bits, strategy, group_size, bool(w.get("symmetric", True)))
    if fmt in ("int-quantized", "naive-quantized") and kind == "int":
        if bits != 8:
            raise ModelLoadError(f"{where}.weights.num_bits={bits} is not supported for {fmt} (8 only)")
        return CtIntFormat(strategy, group_size)
    if fmt in ("float-quantized", "naive-quantized") and kind == "float":
        if bits != 8 or strategy not in ("tensor", "channel"):
            raise ModelLoadError(f"{where}: float weights must be 8-bit e4m3 per tensor or channel")
        return Fp8Format("compressed-tensors float-quantized")
    if fmt == "dense":
        return None
    raise ModelLoadError(f"{where}: compressed-tensors format {fmt!r} with {kind} weights is not supported "
                         "(pack-quantized, int-quantized, naive-quantized, float-quantized)")


class CompressedTensorsConfig(QuantizationConfig):
    name = "compressed-tensors"
    quantizes_lm_head = True  # decided by the groups' targets and ``ignore``, as compressed-tensors does

    def __init__(self, qc: dict[str, Any]) -> None:
        groups = qc.get("config_groups")
        if not isinstance(groups, dict) or not groups:
            raise ModelLoadError("quantization_config.config_groups is missing or empty")
        fmt = str(qc.get("format") or "dense")
        self.ignore = list(qc.get("ignore") or [])
        self.groups: list[tuple[list[str], CheckpointFormat | None, str]] = []
        for gname, scheme in groups.items():
            targets = scheme.get("targets") or []
            self.groups.append((list(targets), _scheme_format(scheme, str(scheme.get("format") or fmt), gname),
                                gname))
            if scheme.get("input_activations"):
                logger.info("compressed-tensors group %s quantizes activations too; tureen runs it weight-only "
                            "(activations stay float)", gname)
        self.formats = sorted({f.name for _, f, _ in self.groups if f is not None})

    def scheme_for(self, name: str) -> CheckpointFormat | None:
        ranked = []
        for targets, fmt, _ in self.groups:
            for t in targets:
                if t == name or name.endswith("." + t):
                    ranked.append((0, fmt))
                elif t.startswith("re:") and re.match(t[3:], name):
                    ranked.append((1, fmt))
                elif t == "Linear":
                    ranked.append((2, fmt))
        return min(ranked, key=lambda r: r[0])[1] if ranked else None

    def layer_method(self, name: str, backend: LinearBackend) -> LinearMethod | None:  # type: ignore[override]
        fmt = self.scheme_for(name)
        return None if fmt is None else QuantizedLinearMethod(fmt, backend)

    def describe(self) -> str:
        return f"compressed-tensors ({', '.join(self.formats) or 'dense'})"
