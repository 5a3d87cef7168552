"""What identifies a cached response: the tenant, the model, the request in canonical form.

The canonical body is the request with every sampling default filled in, equivalent spellings made
one (``max_completion_tokens`` -> ``max_tokens``, a ``stop`` string -> a list, ``1`` -> ``1.0``), and
the fields that do not change the answer left out (``user``, ``stream``, ``stream_options``, the
``cache`` controls, ``model``, which is keyed separately). Two requests that the upstream must answer
alike hash alike; two that it may answer differently never do.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

NON_SEMANTIC = frozenset({"user", "stream", "stream_options", "cache", "model"})
FLOAT_PARAMS = ("temperature", "top_p", "presence_penalty", "frequency_penalty", "repetition_penalty", "min_p")
COMMON_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "n": 1, "presence_penalty": 0.0, "frequency_penalty": 0.0,
                   "stop": None, "seed": None, "max_tokens": None, "logit_bias": None}
DEFAULTS = {
    "chat": {**COMMON_DEFAULTS, "logprobs": False, "top_logprobs": None, "response_format": None, "tools": None,
             "tool_choice": None},
    "completions": {**COMMON_DEFAULTS, "logprobs": None, "echo": False, "suffix": None, "best_of": None},
}


def canonical_body(body: dict, endpoint: str) -> dict:
    """The request as the cache sees it; see the module docstring."""
    out = {k: v for k, v in body.items() if k not in NON_SEMANTIC}
    if "max_completion_tokens" in out:
        out.setdefault("max_tokens", out.pop("max_completion_tokens"))
        out.pop("max_completion_tokens", None)
    for name, default in DEFAULTS[endpoint].items():
        if out.get(name) is None:
            out[name] = default
    if isinstance(out["stop"], str):
        out["stop"] = [out["stop"]]
    if out["stop"] == []:
        out["stop"] = None
    for name in FLOAT_PARAMS:
        if isinstance(out.get(name), (int, float)) and not isinstance(out.get(name), bool):
            out[name] = float(out[name])
    return out


def is_deterministic(canonical: dict) -> bool:
    """Temperature 0, or an explicit seed with one choice: the upstream answers such a request alike."""
    return canonical["temperature"] == 0.0 or (canonical["seed"] is not None and canonical["n"] == 1)


def digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                                     default=str).encode()).hexdigest()


def tenant_of(principal) -> str:
    """The isolation unit: the team, else the key (by hash), else everyone (a gateway without keys)."""
    if principal is None:
        return "public"
    if principal.team_id:
        return "team:" + principal.team_id
    if principal.key_hash:
        return "key:" + principal.key_hash
    return "public"


@dataclass(frozen=True)
class Controls:
    """Per-request cache controls: LiteLLM's ``cache`` field and ``Cache-Control``."""

    no_cache: bool = False  # skip the lookup
    no_store: bool = False  # skip storing
    ttl: float | None = None  # this entry's TTL
    s_maxage: float | None = None  # accept only entries younger than this

    @classmethod
    def parse(cls, field_value, header: str | None) -> Controls:
        options = field_value if isinstance(field_value, dict) else {}
        directives = {d.strip().lower() for d in (header or "").split(",") if d.strip()}
        return cls(no_cache=bool(options.get("no-cache")) or "no-cache" in directives,
                   no_store=bool(options.get("no-store")) or "no-store" in directives,
                   ttl=_positive(options.get("ttl")), s_maxage=_positive(options.get("s-maxage")))


def _positive(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        return None
    return float(value)


@dataclass
class CacheRequest:
    """One request's view for the cache tiers, made once by the step."""

    endpoint: str
    tenant: str
    model: str  # public model name
    identity: list[str]  # the deployments' upstream model names (and revisions)
    prompt_version: str | None  # "name@version" of a registered prompt
    canonical: dict
    controls: Controls
    stream: bool
    include_usage: bool
    label: str = ""  # the model's metric label (bounded: a configured name, or "*" under a wildcard)
    key: str = ""  # sha256 of everything above that identifies the answer
    scratch: dict = field(default_factory=dict)  # tier-private state between lookup and store (an embedding)

    def __post_init__(self) -> None:
        self.label = self.label or self.model
        if not self.key:
            self.key = digest({"tenant": self.tenant, "model": self.model, "identity": self.identity,
                               "prompt": self.prompt_version, "endpoint": self.endpoint, "body": self.canonical})
