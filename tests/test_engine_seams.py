"""The engine's seams: a pluggable executor, one input processor, typed core messages, step faults.

The real ``LLMEngine`` runs here on ``FakeExecutor`` (tests/fake_runner.py), which checks the paged
KV cache slot by slot, so a failed or aborted step that left blocks behind fails loudly.
"""

from __future__ import annotations

import dataclasses

import pytest
from fake_runner import FakeExecutor

from tureen.config import EngineConfig
from tureen.engine.core_messages import AbortRequests, EngineCoreRequest, StepOutputs, decode, encode
from tureen.engine.llm_engine import LLMEngine
from tureen.engine.protocol import EngineStats
from tureen.errors import InvalidRequestError
from tureen.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from tureen.sampling_params import RequestOutputKind, SamplingParams

TRIGGER = 77  # a prompt holding this token makes the fake model step raise


def make_engine(llama_dir, **kw) -> tuple[LLMEngine, FakeExecutor]:
    runner = FakeExecutor(num_blocks=kw.pop("num_blocks", 64), vocab_size=kw.pop("vocab_size", 1000))
    config = EngineConfig.from_kwargs(str(llama_dir), max_model_len=256, **kw)
    return LLMEngine(config, runner=runner), runner


def run_all(engine: LLMEngine) -> dict[str, RequestOutput]:
    done = {}
    for _ in range(500):
        if not engine.has_unfinished_requests():
            break
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    return done


def params(n: int = 6) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, output_kind=RequestOutputKind.FINAL_ONLY)


def test_engine_drives_an_injected_executor(llama_dir):
    engine, runner = make_engine(llama_dir)
    engine.add_request("a", [5, 6, 7], params())
    engine.add_request("b", [9, 10], params(3))
    done = run_all(engine)
    assert [len(done[r].outputs[0].token_ids) for r in ("a", "b")] == [6, 3]
    assert runner.steps and engine.stats().kv_cache_usage == 0.0


def test_a_step_that_raises_fails_only_its_requests_and_the_next_request_succeeds(llama_dir):
    engine, runner = make_engine(llama_dir)

    def explode(sched):
        if any(TRIGGER in sr.prompt_token_ids for sr in sched.requests):
            raise RuntimeError("injected model fault")
    runner.on_execute = explode
    engine.add_request("ok-before", [5, 6], params(2))
    assert run_all(engine)["ok-before"].error is None
    engine.add_request("bad", [5, TRIGGER, 6], params())
    failed = run_all(engine)["bad"]
    assert failed.finished and "injected model fault" in failed.error
    assert failed.outputs[0].finish_reason == "abort"
    assert engine.stats().kv_cache_usage == 0.0 and not engine.has_unfinished_requests()
    engine.add_request("ok-after", [5, 6, 8], params(4))
    after = run_all(engine)["ok-after"]
    assert after.error is None and len(after.outputs[0].token_ids) == 4


def test_an_abort_during_a_step_frees_the_requests_blocks(llama_dir):
    engine, runner = make_engine(llama_dir)
    engine.add_request("stay", [5, 6, 7], params(8))
    engine.add_request("leave", list(range(3, 40)), params(50))
    engine.step()
    used_by_both = engine.scheduler.kv.usage
    runner.on_execute = lambda sched: engine.abort_request("leave")  # arrives while the step computes
    engine.step()
    runner.on_execute = None
    # Its blocks are free as soon as that step is over; its final output comes with the next step.
    assert engine.scheduler.kv.usage < used_by_both and engine.scheduler.requests.keys() == {"stay"}
    outs = {o.request_id: o for o in engine.step()}
    assert outs["leave"].finished and outs["leave"].outputs[0].finish_reason == "abort"
    assert run_all(engine)["stay"].error is None
    assert engine.stats().kv_cache_usage == 0.0


def test_the_vocabulary_is_the_smaller_of_tokenizer_and_model(llama_dir):
    engine, _ = make_engine(llama_dir, vocab_size=100)  # a model table smaller than the tokenizer
    assert engine.processor.limits.vocab_size == 100
    with pytest.raises(InvalidRequestError, match=r"outside the vocabulary \[0, 100\)") as err:
        engine.add_request("x", [5, 100], params())
    assert err.value.param == "prompt" and not engine.has_unfinished_requests()
    engine.add_request("y", [5, 99], params(2))
    assert run_all(engine)["y"].error is None


def test_validation_runs_once_before_the_engine(llama_dir, monkeypatch):
    engine, _ = make_engine(llama_dir)
    calls = []
    real = engine.processor.validate
    monkeypatch.setattr(engine.processor, "validate", lambda ids, sp: calls.append(1) or real(ids, sp))
    engine.add_request("x", [5, 6], params(2))
    run_all(engine)
    assert len(calls) == 1


def _non_default(f: dataclasses.Field):
    values = {"int": 3, "float": 0.5, "bool": True, "str | list[str] | None": ["halt"], "list[int] | None": [4, 5],
              "int | None": 2, "list[int]": [7], "RequestOutputKind": RequestOutputKind.DELTA}
    return values.get(str(f.type))


def test_core_messages_carry_every_sampling_field_and_nested_outputs():
    changes = {f.name: v for f in dataclasses.fields(SamplingParams) if (v := _non_default(f)) is not None}
    changes["top_p"], changes["min_p"], changes["max_tokens"] = 0.9, 0.1, 8
    sp = SamplingParams(**changes)
    req = EngineCoreRequest("r1", "text", [1, 2, 3], sp, priority=-1, arrival_time=12.5)
    back = decode(encode(req))
    assert back == req and isinstance(back.params, SamplingParams)
    out = RequestOutput("r1", None, [1], [CompletionOutput(0, "hé", [4], -0.5, [{4: Logprob(-0.5, 1, "h")}],
                                                           "stop", "x")], True, 1, RequestMetrics(1.0, 2.0),
                        error=None)
    step = StepOutputs([out], EngineStats(num_running=1, heartbeat=3.0))
    assert decode(encode(step)) == step
    assert decode(encode(AbortRequests(["a", "b"]))) == AbortRequests(["a", "b"])
    with pytest.raises(TypeError):
        encode({"method": "add_request"})  # no untyped messages on the channel


def test_the_in_process_async_client_streams_and_reports_a_failed_step(llama_dir):
    import asyncio

    from tureen.engine.async_llm import AsyncLLM
    from tureen.engine.protocol import EngineClient
    from tureen.errors import EngineStepError

    engine, runner = make_engine(llama_dir)
    runner.on_execute = lambda sched: (_ for _ in ()).throw(RuntimeError("boom")) if any(
        TRIGGER in sr.prompt_token_ids for sr in sched.requests) else None
    client = AsyncLLM(engine)
    assert isinstance(client, EngineClient)
    delta = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True, output_kind=RequestOutputKind.DELTA)

    async def run():
        tokens = [t async for out in client.generate([5, 6], delta, "ok") for t in out.outputs[0].token_ids]
        with pytest.raises(EngineStepError, match="boom"):
            async for _ in client.generate([TRIGGER, 6], delta, "bad"):
                pass
        return tokens
    try:
        assert len(asyncio.run(run())) == 3 and client.is_alive
    finally:
        client.shutdown()
