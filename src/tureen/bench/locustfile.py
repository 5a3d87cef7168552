"""Locust load test for an OpenAI-compatible server, with ``tureen bench serve``'s workloads.

For production-style load tests (many users, ramp-up, the Locust web UI, distributed workers).
Each simulated user streams one request after another; besides Locust's own row for the HTTP
request it reports two custom request types per endpoint:

* ``TTFT``: send -> first streamed chunk with content (ms), and
* ``E2E``: send -> last chunk (ms); its "response length" is the output token count from
  the server's ``usage`` (``stream_options.include_usage``).

A request that fails (HTTP status, timeout, connection error, error event mid-stream) is
reported as a failure of ``E2E`` with its reason.

How to run (Locust is an optional extra: ``pip install locust``)::

    # headless, 32 users started 4 per second, for 5 minutes, CSV files out_stats.csv etc.
    locust -f src/tureen/bench/locustfile.py --host http://127.0.0.1:8000 \\
        --headless -u 32 -r 4 --run-time 5m --csv out \\
        --dataset random --input-len 256 --output-len 128

    # the same with the web UI: drop --headless/-u/-r/--run-time, open http://localhost:8089
    locust -f src/tureen/bench/locustfile.py --host http://127.0.0.1:8000 --dataset prefix

    # the file's path inside an installed package:
    python -c "import tureen.bench.locustfile as m; print(m.__file__)"

Workload options (same meaning as ``tureen bench serve``): ``--model`` (default: first id of
``/v1/models``), ``--endpoint completions|chat``, ``--dataset random|prefix``,
``--input-len``, ``--output-len``, ``--range-ratio``, ``--prefix-len``, ``--num-prompts`` (size
of the prompt pool the users cycle through), ``--seed``, ``--tokenizer PATH`` (else the server's
``/tokenize``), ``--ignore-eos``, ``--api-key``, ``--request-timeout`` (seconds per request).
Only ``--host`` is contacted.
"""

from __future__ import annotations

import itertools
import logging
import time
from typing import Any, Iterator

from locust import HttpUser, events, task
from locust.exception import StopUser
from locust.env import Environment

from tureen.bench.client import SSEParser, StreamError, build_payload, choice_text, first_model_id, \
    parse_event, sync_http_client
from tureen.bench.datasets import SampleRequest, build_samples
from tureen.bench.serve_config import TargetConfig, WorkloadConfig
from tureen.bench.token_codec import LocalCodec, ServerCodec
from tureen.errors import TureenError

_POOL: dict[str, Any] = {}
logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per /tokenize call otherwise


@events.init_command_line_parser.add_listener
def _add_options(parser: Any) -> None:
    group = parser.add_argument_group("tureen workload")
    group.add_argument("--model", default=None, help="Model name (default: first id of /v1/models).")
    group.add_argument("--endpoint", default="completions", choices=["completions", "chat"])
    group.add_argument("--dataset", default="random", choices=["random", "prefix"])
    group.add_argument("--input-len", type=int, default=256)
    group.add_argument("--output-len", type=int, default=128)
    group.add_argument("--range-ratio", type=float, default=0.0)
    group.add_argument("--prefix-len", type=int, default=None)
    group.add_argument("--num-prompts", type=int, default=200, help="Prompt pool the users cycle through.")
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--tokenizer", default=None, help="Local tokenizer dir (else the server's /tokenize).")
    group.add_argument("--ignore-eos", action="store_true", default=False)
    group.add_argument("--api-key", default=None)
    group.add_argument("--request-timeout", type=float, default=300.0, help="Seconds per request.")


@events.test_start.add_listener
def _build_pool(environment: Environment, **_: Any) -> None:
    """Build the prompts once, before any user starts (exact token lengths, as bench serve)."""
    opts = environment.parsed_options
    target = TargetConfig(base_url=environment.host, model=opts.model, endpoint=opts.endpoint,
                          api_key=opts.api_key, timeout=opts.request_timeout, ignore_eos=opts.ignore_eos,
                          tokenizer=opts.tokenizer)
    workload = WorkloadConfig(dataset=opts.dataset, num_prompts=opts.num_prompts, input_len=opts.input_len,
                              output_len=opts.output_len, range_ratio=opts.range_ratio,
                              prefix_len=opts.prefix_len, seed=opts.seed)
    try:
        with sync_http_client(target) as client:
            model = target.model or first_model_id(client)
            codec = LocalCodec(target.tokenizer) if target.tokenizer else ServerCodec.probe(client, model)
            samples = build_samples(workload, codec)
    except TureenError as exc:  # unreachable server, bad options: stop the test with a clear message
        logging.getLogger("tureen.bench").error("cannot build the workload: %s", exc)
        environment.process_exit_code = 2
        if environment.runner is not None:
            environment.runner.quit()
        return
    _POOL.update(target=target, model=model, samples=itertools.cycle(samples))


class OpenAIStreamingUser(HttpUser):
    """One streamed completion after another, no think time (closed-loop, like --max-concurrency)."""

    @task
    def stream_one(self) -> None:
        if "target" not in _POOL:  # the workload could not be built (already reported)
            raise StopUser()
        target: TargetConfig = _POOL["target"]
        samples: Iterator[SampleRequest] = _POOL["samples"]
        payload = build_payload(target, _POOL["model"], next(samples))
        headers = {"Authorization": f"Bearer {target.api_key}"} if target.api_key else {}
        start = time.perf_counter()
        with self.client.post(target.api_path, json=payload, headers=headers, stream=True, catch_response=True,
                              timeout=target.timeout, name=target.api_path) as resp:
            try:
                if resp.status_code != 200:
                    raise StreamError(f"http_{resp.status_code}", resp.text[:300])
                ttft, e2e, tokens = _read_stream(resp, start, target.timeout)
            except StreamError as exc:
                resp.failure(f"{exc.reason}: {exc}")
                self._fire("E2E", (time.perf_counter() - start) * 1000, 0, exc)
                return
            except Exception as exc:  # timeouts and dropped connections from requests
                resp.failure(f"{type(exc).__name__}: {exc}")
                self._fire("E2E", (time.perf_counter() - start) * 1000, 0, exc)
                return
            resp.success()
        self._fire("TTFT", ttft * 1000, 0, None)
        self._fire("E2E", e2e * 1000, tokens, None)

    def _fire(self, kind: str, ms: float, length: int, exc: Exception | None) -> None:
        self.environment.events.request.fire(request_type=kind, name=_POOL["target"].api_path, response_time=ms,
                                             response_length=length, exception=exc, context={})


def _read_stream(resp: Any, start: float, timeout: float) -> tuple[float, float, int]:
    """(TTFT s, E2E s, output tokens) of one SSE response, with the same rules as bench serve."""
    events, ttft, last, tokens, chunks, done = SSEParser(), None, None, 0, 0, False
    for raw in resp.iter_content(chunk_size=None):  # as bytes arrive
        now = time.perf_counter()
        if now - start > timeout:
            raise StreamError("timeout", f"no complete response within {timeout:g} s")
        for event, data in events.feed(raw):
            done = data == b"[DONE]"
            if done:
                break
            obj = parse_event(event, data)
            choices = obj.get("choices")
            if choices and isinstance(choices[0], dict):
                last = now
                if choice_text(choices[0]):
                    ttft = now - start if ttft is None else ttft
                    chunks += 1
            usage = obj.get("usage")
            if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
                tokens = usage["completion_tokens"]
        if done:
            break
    if last is None:
        raise StreamError("no_content", "the stream ended without any completion chunk")
    return (ttft if ttft is not None else last - start), last - start, tokens or chunks

