"""GET /health: liveness from the engine's published heartbeat; ``?deep=1``: a real generation.

The plain check reads two fields of the engine's stats snapshot (published by the engine thread
after every loop iteration): no lock, no tokenizer, no engine call, so it answers in well under
100 ms however busy the engine is. The deep check, meant for a readiness probe, runs a two-token
greedy generation through the real queue under ``--deep-health-timeout``.
"""

from __future__ import annotations

import asyncio
import time
import uuid

from fastapi.responses import JSONResponse

from tureen.sampling_params import RequestOutputKind, SamplingParams
from tureen.server.lifecycle import ServerState

DEEP_CHECK_TOKENS = 2


def health(state: ServerState) -> JSONResponse:
    ok, reason = state.health()
    return JSONResponse({"status": "ok" if ok else "unhealthy", "reason": reason}, status_code=200 if ok else 503)


async def deep_health(state: ServerState) -> JSONResponse:
    ok, reason = state.health()
    if not ok:
        return JSONResponse({"status": "unhealthy", "reason": reason}, status_code=503)
    assert state.engine is not None
    engine = state.engine
    params = SamplingParams(max_tokens=DEEP_CHECK_TOKENS, temperature=0.0, ignore_eos=True,
                            output_kind=RequestOutputKind.DELTA)
    prompt = engine.tokenizer.encode("ping", add_special_tokens=False) or [0]
    start = time.monotonic()
    generated = 0
    try:
        async with asyncio.timeout(state.config.deep_health_timeout):
            async for out in engine.generate(prompt, params, f"health-{uuid.uuid4().hex}"):
                generated += sum(len(c.token_ids) for c in out.outputs)
    except TimeoutError:
        return JSONResponse({"status": "unhealthy", "reason": "deep_check_timeout",
                             "timeout_s": state.config.deep_health_timeout}, status_code=503)
    except Exception as exc:  # whatever broke, the probe must say so, not crash
        return JSONResponse({"status": "unhealthy", "reason": "deep_check_failed", "detail": repr(exc)},
                            status_code=503)
    if generated < 1:
        return JSONResponse({"status": "unhealthy", "reason": "deep_check_generated_nothing"}, status_code=503)
    return JSONResponse({"status": "ok", "reason": "ok", "generated_tokens": generated,
                         "latency_s": round(time.monotonic() - start, 4)})
