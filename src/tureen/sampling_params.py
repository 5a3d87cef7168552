"""Per-request sampling parameters, in the shape vLLM users know."""

from __future__ import annotations

import enum
import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from tureen.errors import InvalidSamplingParamsError

_GREEDY_EPS = 1e-5


class RequestOutputKind(enum.Enum):
    CUMULATIVE = 0  # every output carries the whole text and token ids so far
    DELTA = 1  # every output carries only what is new since the previous one
    FINAL_ONLY = 2  # one output, when the request finishes


_CONSTRAINT_KINDS = ("json", "regex", "choice", "grammar", "json_object")


@dataclass
class StructuredOutputsParams:
    """A constraint on the output, as vLLM spells it: set exactly one of the first five fields.

    ``json`` is a JSON schema (a dict or its JSON text), ``regex`` a regular expression the whole
    output must match, ``choice`` a list of allowed outputs, ``grammar`` an EBNF (GBNF, with
    ``::=``) or Lark grammar, ``json_object`` any JSON object. Only plain data lives here, so the
    params cross process boundaries as they are; the engine compiles them (cached by ``key()``).
    """

    json: str | dict[str, Any] | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False  # JSON: no whitespace between tokens (compact output)
    disable_additional_properties: bool = False  # JSON schema: objects take only the listed properties
    whitespace_pattern: str | None = None  # accepted for vLLM compatibility; not supported by xgrammar

    def __post_init__(self) -> None:
        if self.json_object is False:
            self.json_object = None
        kinds = [k for k in _CONSTRAINT_KINDS if getattr(self, k) is not None]
        if len(kinds) != 1:
            found = ", ".join(kinds) or "none"
            raise InvalidSamplingParamsError(
                f"structured_outputs must set exactly one of {', '.join(_CONSTRAINT_KINDS)}; got {found}",
                param="structured_outputs")
        if self.choice is not None and (not self.choice or not all(isinstance(c, str) and c for c in self.choice)):
            raise InvalidSamplingParamsError("structured_outputs.choice must be a non-empty list of non-empty strings",
                                             param="structured_outputs.choice")
        if self.whitespace_pattern is not None:
            raise InvalidSamplingParamsError("structured_outputs.whitespace_pattern is not supported",
                                             param="structured_outputs.whitespace_pattern")

    @property
    def kind(self) -> str:
        return next(k for k in _CONSTRAINT_KINDS if getattr(self, k) is not None)

    def key(self) -> str:
        """A stable hash of the constraint: equal constraints share one compiled grammar."""
        canonical = json.dumps(asdict(self), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    max_tokens: int | None = 16  # None: up to max_model_len
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None  # number of top alternatives besides the chosen token
    skip_special_tokens: bool = True
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    structured_outputs: StructuredOutputsParams | None = None  # constrain the output (JSON, regex, ...)
    # Mixed into the prefix cache's first block hash: requests with different salts never share cached
    # blocks (vLLM's cache_salt; tureen.engine.block_hash).
    cache_salt: str | None = None
    # Filled by the engine from generation_config.json (not by users).
    eos_token_ids: list[int] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        if 0.0 <= self.temperature < _GREEDY_EPS:
            self.temperature = 0.0
        self._validate()

    def _validate(self) -> None:
        checks = [
            ("n", self.n >= 1, "must be >= 1"),
            ("temperature", 0.0 <= self.temperature <= 100.0, "must be in [0, 100]"),
            ("top_p", 0.0 < self.top_p <= 1.0, "must be in (0, 1]"),
            ("top_k", self.top_k >= 0, "must be -1 (disabled), 0 (disabled) or a positive integer"),
            ("min_p", 0.0 <= self.min_p <= 1.0, "must be in [0, 1]"),
            ("presence_penalty", -2.0 <= self.presence_penalty <= 2.0, "must be in [-2, 2]"),
            ("frequency_penalty", -2.0 <= self.frequency_penalty <= 2.0, "must be in [-2, 2]"),
            ("repetition_penalty", 0.0 < self.repetition_penalty <= 10.0, "must be in (0, 10]"),
            ("max_tokens", self.max_tokens is None or self.max_tokens >= 1, "must be >= 1"),
            ("min_tokens", self.min_tokens >= 0, "must be >= 0"),
            ("logprobs", self.logprobs is None or 0 <= self.logprobs <= 20, "must be in [0, 20]"),
            ("stop", all(isinstance(s, str) and s for s in self.stop), "must be non-empty strings"),
            ("stop_token_ids", all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
             "must be non-negative token ids"),
        ]
        for name, ok, rule in checks:
            if not ok:
                raise InvalidSamplingParamsError(f"{name} {rule}, got {getattr(self, name)!r}", param=name)
        if self.structured_outputs is not None and self.min_tokens > 0:
            # A finished grammar allows only EOS, which min_tokens would ban: nothing could be sampled.
            raise InvalidSamplingParamsError("min_tokens cannot be combined with structured outputs",
                                             param="min_tokens")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise InvalidSamplingParamsError(
                f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})", param="min_tokens")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def needs_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0
