"""Typed messages between the API server and the engine core (``engine/core.py``).

Every message is a dataclass; ``encode``/``decode`` turn it into msgpack with msgspec, which
serialises dataclasses field by field (nested dataclasses, enums and unions included). So a
field added to ``SamplingParams`` or ``RequestOutput`` rides along without touching the channel.
The wire form is ``[kind, payload]``; ``kind`` names the message type from ``MESSAGES`` (a type
tag, never a method name), and the payload is decoded straight into that type.

One engine step yields exactly one ``StepOutputs`` for all requests.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgspec

from tureen.engine.protocol import EngineStats
from tureen.outputs import RequestOutput
from tureen.sampling_params import SamplingParams


@dataclass
class EngineCoreRequest:
    """A request after the input processor: token ids checked, ``params`` resolved (max_tokens, EOS)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int = 0
    arrival_time: float = 0.0


@dataclass
class AbortRequests:
    request_ids: list[str]


@dataclass
class Shutdown:
    """Abort everything, report it, and exit."""


@dataclass
class EngineInfo:
    """What the engine core reports once loaded; the API side builds its input processor from it."""

    model_name: str
    checkpoint_dir: str
    is_demo_model: bool
    max_model_len: int
    vocab_size: int
    num_kv_blocks: int
    block_size: int
    pid: int
    logits_size: int = 0  # the model's output width (structured-output bitmasks span it)


@dataclass
class EngineReady:
    info: EngineInfo


@dataclass
class EngineFailed:
    """The engine core could not start (bad checkpoint, bad config); ``message`` says why."""

    message: str
    kind: str = "error"


@dataclass
class StepOutputs:
    """One engine iteration: every request's new output (empty when idle: a heartbeat)."""

    outputs: list[RequestOutput] = field(default_factory=list)
    stats: EngineStats = field(default_factory=EngineStats)


MESSAGES: dict[str, type] = {cls.__name__: cls for cls in (
    EngineCoreRequest, AbortRequests, Shutdown, EngineReady, EngineFailed, StepOutputs)}

_encoder = msgspec.msgpack.Encoder()
_envelope = msgspec.msgpack.Decoder(tuple[str, msgspec.Raw])
_decoders = {name: msgspec.msgpack.Decoder(cls) for name, cls in MESSAGES.items()}


def encode(message: Any) -> bytes:
    name = type(message).__name__
    if name not in MESSAGES:
        raise TypeError(f"{name} is not an engine-core message")
    return _encoder.encode((name, message))


def decode(data: bytes) -> Any:
    name, raw = _envelope.decode(data)
    decoder = _decoders.get(name)
    if decoder is None:
        raise ValueError(f"unknown engine-core message kind {name!r}")
    return decoder.decode(raw)
