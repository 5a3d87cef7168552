"""The engine core process: ``python -m tureen.engine.core`` (started by ``EngineCoreClient``).

It owns the ``LLMEngine``: scheduler, KV blocks, model runner, sampler and detokenizer. One Unix
socket (``engine/core_channel.py``, inherited from the parent as a file descriptor) connects it to
the API process: requests and aborts come in, and every iteration sends exactly one
``StepOutputs`` (all requests' new outputs, plus the stats snapshot), written by this thread
itself. An idle engine still sends an empty ``StepOutputs`` every ``HEARTBEAT_S``: that is the
heartbeat the API side's watchdog reads.

Commands are applied between steps, so an abort reaches the engine within one step. The process
never outlives its parent: the channel's end of file (the parent is gone) ends the loop, a thread
polls the parent's pid and exits when the parent is gone (also when the server was SIGKILLed in
the middle of a long step), and SIGINT from a terminal is ignored (the parent decides when the
engine stops, with a ``Shutdown`` message).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time

import msgspec

from tureen.config import EngineConfig
from tureen.engine.core_channel import ChannelClosed, EngineChannel
from tureen.engine.core_messages import (
    AbortRequests,
    EngineCoreRequest,
    EngineFailed,
    EngineInfo,
    EngineReady,
    Shutdown,
    StepOutputs,
)
from tureen.engine.faults import FaultInjectingExecutor, FaultPlan
from tureen.engine.llm_engine import LLMEngine
from tureen.engine.protocol import EngineStats
from tureen.outputs import RequestOutput

logger = logging.getLogger("tureen.engine.core")

HEARTBEAT_S = 0.25
PARENT_POLL_S = 0.25


class EngineCore:
    """The busy loop: apply commands, step, send one batched message per iteration."""

    def __init__(self, engine: LLMEngine, channel: EngineChannel) -> None:
        self.engine, self.channel = engine, channel

    def run(self) -> None:
        """Step until Shutdown (then abort what is left and report it) or until the parent is gone."""
        engine = self.engine
        try:
            while True:
                idle = not engine.has_unfinished_requests()
                if not self._apply_commands(timeout_s=HEARTBEAT_S if idle else 0.0):
                    break
                outs = engine.step() if engine.has_unfinished_requests() else []
                self._send(outs)
            engine.abort_all()
            self._send(engine.step())
        except ChannelClosed:
            logger.info("the API process closed the channel; stopping")

    def _apply_commands(self, timeout_s: float) -> bool:
        """Apply every command that has arrived; returns False on Shutdown."""
        for message in self.channel.receive(timeout_s):
            if isinstance(message, Shutdown):
                return False
            self._apply(message)
        return True

    def _apply(self, message: EngineCoreRequest | AbortRequests) -> None:
        if isinstance(message, AbortRequests):
            for request_id in message.request_ids:
                self.engine.abort_request(request_id)
            return
        try:
            self.engine.add_core_request(message)
        except Exception as exc:  # validated on the API side; anything left fails this request only
            self._send([RequestOutput(message.request_id, message.prompt, message.prompt_token_ids, [], True,
                                      error=f"the engine could not add this request: {exc}")])

    def _send(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:  # the client has the prompt already: don't ship it back on every token
            out.prompt, out.prompt_token_ids = None, []
        self.channel.send(StepOutputs(outputs, self._stats()))

    def _stats(self) -> EngineStats:
        engine = self.engine
        s = engine.stats()
        return EngineStats(
            num_running=s.num_running, num_waiting=s.num_waiting, kv_cache_usage=s.kv_cache_usage,
            num_blocks=s.num_blocks, block_size=engine.block_size, prefix_cache_queries=s.prefix_cache_queries,
            prefix_cache_hits=s.prefix_cache_hits, num_preemptions=s.num_preemptions,
            prompt_tokens=engine.prompt_tokens_total, generation_tokens=engine.generation_tokens_total,
            heartbeat=time.monotonic(), spec_decoding=s.spec_decoding)


def engine_info(engine: LLMEngine) -> EngineInfo:
    return EngineInfo(model_name=engine.model_name, checkpoint_dir=str(engine.checkpoint_dir),
                      is_demo_model=engine.is_demo_model, max_model_len=engine.max_model_len,
                      vocab_size=engine.processor.limits.vocab_size, num_kv_blocks=engine.num_kv_blocks,
                      block_size=engine.block_size, pid=os.getpid(),
                      logits_size=engine.runner.vocab_size)


def watch_parent(parent_pid: int) -> None:
    """Exit at once when the parent process is gone (reparented: our ppid changes)."""
    def poll() -> None:
        while True:
            if os.getppid() != parent_pid:
                os._exit(0)
            time.sleep(PARENT_POLL_S)
    threading.Thread(target=poll, name="tureen-parent-watch", daemon=True).start()


def build_engine(config: EngineConfig, faults: FaultPlan | None) -> LLMEngine:
    engine = LLMEngine(config)
    engine.structured.warm_up()  # build the grammar backend now, in the background
    if faults is not None and faults.active:
        logger.warning("TEST-ONLY fault injection is on: %s", faults.describe())
        engine.runner = FaultInjectingExecutor(engine.runner, faults)
    return engine


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="tureen engine core process (started by tureen serve)")
    parser.add_argument("--config-json", required=True)
    parser.add_argument("--channel-fd", type=int, required=True, help="this process's end of the socket pair")
    parser.add_argument("--parent-pid", type=int, required=True)
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    watch_parent(args.parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=getattr(logging, args.log_level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s[engine]: %(message)s", force=True)
    channel = EngineChannel.from_fd(args.channel_fd)
    try:
        config = msgspec.json.decode(args.config_json.encode(), type=EngineConfig)
        engine = build_engine(config, FaultPlan.from_env(os.environ))  # the one place the env var is read
    except Exception as exc:
        logger.error("the engine could not start: %s", exc, exc_info=not _expected(exc))
        channel.send(EngineFailed(str(exc), type(exc).__name__))
        channel.close()
        return 1
    try:
        channel.send(EngineReady(engine_info(engine)))
    except ChannelClosed:
        return 0
    EngineCore(engine, channel).run()
    channel.close()
    return 0


def _expected(exc: BaseException) -> bool:
    from tureen.errors import TureenError

    return isinstance(exc, TureenError)


if __name__ == "__main__":
    sys.exit(main())
