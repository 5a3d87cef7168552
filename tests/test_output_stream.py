"""Per-request output streams: outputs waiting for a lagging consumer are merged, never lost or reordered."""

from __future__ import annotations

import asyncio

import pytest
from fake_runner import FakeExecutor

from tureen.config import EngineConfig
from tureen.engine.llm_engine import LLMEngine
from tureen.engine.output_stream import OutputStream, merge_delta
from tureen.errors import EngineStepError
from tureen.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from tureen.sampling_params import RequestOutputKind, SamplingParams


def out(step: int, *completions: CompletionOutput, finished: bool = False) -> RequestOutput:
    return RequestOutput("r", None, [], list(completions), finished, metrics=RequestMetrics(0.0, last_token_time=step))


def comp(index: int, text: str, ids: list[int], finish: str | None = None, lp: bool = False) -> CompletionOutput:
    logprobs = [{i: Logprob(-1.0, 1, str(i))} for i in ids] if lp else None
    return CompletionOutput(index, text, ids, cumulative_logprob=-float(len(ids)) if lp else None, logprobs=logprobs,
                            finish_reason=finish, stop_reason="x" if finish == "stop" else None)


def test_merge_concatenates_per_completion_and_keeps_the_later_state():
    a = out(1, comp(0, "he", [1, 2], lp=True), comp(1, "x", [9], finish="stop", lp=True))
    b = out(2, comp(0, "llo", [3], finish="length", lp=True), finished=True)
    m = merge_delta(a, b)
    assert [c.index for c in m.outputs] == [0, 1]
    c0, c1 = m.outputs
    assert (c0.text, c0.token_ids, c0.finish_reason) == ("hello", [1, 2, 3], "length")
    assert [list(d) for d in c0.logprobs] == [[1], [2], [3]] and c0.cumulative_logprob == -1.0
    assert (c1.text, c1.token_ids, c1.finish_reason, c1.stop_reason) == ("x", [9], "stop", "x")  # only in the first
    assert m.finished and m.metrics.last_token_time == 2


def test_a_lagging_consumer_gets_one_merged_output_and_an_error_only_after_it():
    async def run():
        s = OutputStream(coalesce=True)
        s.put_nowait(out(1, comp(0, "a", [1])))
        s.put_nowait(out(2, comp(0, "b", [2])))
        s.put_nowait(EngineStepError("boom"))
        s.put_nowait(out(3, comp(0, "c", [3])))
        first = await s.get()
        with pytest.raises(EngineStepError):
            await s.get()
        return first, await s.get()
    first, after = asyncio.run(run())
    assert (first.outputs[0].text, first.outputs[0].token_ids) == ("ab", [1, 2])
    assert after.outputs[0].text == "c"


def test_nothing_is_merged_past_the_final_output_or_for_non_delta_kinds():
    async def run(coalesce: bool, *items):
        s = OutputStream(coalesce=coalesce)
        for item in items:
            s.put_nowait(item)
        return [await s.get() for _ in range(len(items) if not coalesce else 2)]
    final = asyncio.run(run(True, out(1, comp(0, "a", [1]), finished=True), out(2, comp(0, "b", [2]))))
    assert [o.outputs[0].text for o in final] == ["a", "b"]
    cumulative = asyncio.run(run(False, out(1, comp(0, "a", [1])), out(2, comp(0, "ab", [1, 2]))))
    assert [o.outputs[0].text for o in cumulative] == ["a", "ab"]


def test_a_consumer_waiting_for_every_token_looks_its_event_loop_up_once(monkeypatch):
    """On Python 3.11 each asyncio.get_running_loop() is a getpid() system call: not one per token."""
    lookups = []
    real = asyncio.get_running_loop

    def counting():
        lookups.append(1)
        return real()

    async def run():
        s, loop, got = OutputStream(coalesce=True), real(), []
        monkeypatch.setattr(asyncio, "get_running_loop", counting)
        for step in range(1, 6):  # each output arrives while the consumer waits for it
            loop.call_soon(s.put_nowait, out(step, comp(0, str(step), [step]), finished=step == 5))
            got.append((await s.get()).outputs[0].text)
        monkeypatch.setattr(asyncio, "get_running_loop", real)
        return got
    assert asyncio.run(run()) == ["1", "2", "3", "4", "5"]
    assert len(lookups) == 1


def test_a_slow_consumer_of_the_real_engine_gets_every_token_in_fewer_chunks(llama_dir):
    from tureen.engine.async_llm import AsyncLLM

    config = EngineConfig.from_kwargs(str(llama_dir), max_model_len=256)
    runner = FakeExecutor(num_blocks=64, vocab_size=1000)
    client = AsyncLLM(LLMEngine(config, runner=runner))
    params = dict(temperature=0.0, max_tokens=24, ignore_eos=True)

    async def run():
        whole = [o async for o in client.generate([5, 6, 7], SamplingParams(**params), "whole")][-1].outputs[0]
        chunks = []
        steps = len(runner.steps)
        async for o in client.generate([5, 6, 7], SamplingParams(**params, output_kind=RequestOutputKind.DELTA),
                                       "slow"):
            chunks.append(o.outputs[0])
            for _ in range(6000):  # lag behind: let the engine run every step first (a hang guard, no timing)
                if len(runner.steps) >= steps + 24:
                    break
                await asyncio.sleep(0.01)
        return whole, chunks
    try:
        whole, chunks = asyncio.run(run())
    finally:
        client.shutdown()
    assert [t for c in chunks for t in c.token_ids] == whole.token_ids
    assert "".join(c.text for c in chunks) == whole.text
    assert chunks[-1].finish_reason == "length" and all(c.finish_reason is None for c in chunks[:-1])
    assert len(chunks) <= 3  # the first token, the merged rest (and the final one if it came late)
