"""``tureen bench serve`` against a small fake OpenAI-compatible server on 127.0.0.1.

The fake server streams at fixed, known delays (first chunk after ``FIRST_S``, then one chunk
every ``GAP_S``), so the measured TTFT / ITL / TPOT / E2EL can be checked against them. Prompts
steer its misbehaviour: ``FAIL503`` (503 + Retry-After), ``HANG`` (never answers in time),
``MIDERR`` (error event mid-stream), ``DROP`` (connection cut mid-stream), ``NOUSAGE`` (no usage
chunk), ``SLOWSTREAM`` (one chunk per second).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import uvicorn  # noqa: E402
from fastapi import FastAPI, Request  # noqa: E402
from fastapi.responses import JSONResponse, StreamingResponse  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402

from tureen.bench.client import RequestRecord, SSEParser  # noqa: E402
from tureen.bench.datasets import build_samples  # noqa: E402
from tureen.bench.metrics import compute_metrics  # noqa: E402
from tureen.bench.serve import arrival_offsets, bench_serve  # noqa: E402
from tureen.bench.serve_config import ServeBenchConfig, WorkloadConfig  # noqa: E402
from tureen.bench.token_codec import LocalCodec, ServerCodec  # noqa: E402
from tureen.errors import ConfigError  # noqa: E402

FIRST_S = 0.200
GAP_S = 0.050
BOS_ID = 0


# ----------------------------------------------------------------------------- fake server


def train_tokenizer(directory: Path) -> Tokenizer:
    """A small byte-level BPE, so prompt fitting meets real merges across cut points."""
    rng = np.random.default_rng(1)
    sylls = ["ka", "lo", "mi", "ne", "ru", "sa", "to", "vi", "de", "po", "la", "zu", "chi", "ben", "mar"]
    corpus = [" ".join("".join(rng.choice(sylls, size=rng.integers(1, 4))) for _ in range(40)) for _ in range(300)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    return tok


class FakeState:
    def __init__(self, tok: Tokenizer) -> None:
        self.tok = tok
        self.in_flight = 0
        self.peak_in_flight = 0
        self.requests = 0
        self.bodies: list[dict] = []  # every generation request's JSON body
        self.add_bos = False  # True: /tokenize always prepends BOS (a server ignoring add_special_tokens)


def make_app(state: FakeState):
    app = FastAPI()

    @app.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [{"id": "fake-model", "object": "model", "root": "fake-model"}]}

    @app.post("/tokenize")
    async def tokenize(req: Request) -> dict:
        body = await req.json()
        ids = state.tok.encode(body["prompt"]).ids
        if state.add_bos or body.get("add_special_tokens", True):
            ids = [BOS_ID] + ids
        return {"tokens": ids, "count": len(ids), "max_model_len": 4096}

    @app.post("/detokenize")
    async def detokenize(req: Request) -> dict:
        body = await req.json()
        return {"prompt": state.tok.decode(body["tokens"])}

    @app.post("/v1/completions")
    async def completions(req: Request):
        return await _generate(state, await req.json(), chat=False, arrived=req.scope["arrived"])

    @app.post("/v1/chat/completions")
    async def chat(req: Request):
        return await _generate(state, await req.json(), chat=True, arrived=req.scope["arrived"])

    async def stamped(scope, receive, send):  # the delays count from the moment the request arrives
        scope["arrived"] = time.perf_counter()
        await app(scope, receive, send)

    return stamped


async def _generate(state: FakeState, body: dict, chat: bool, arrived: float):
    state.bodies.append(body)
    prompt = body["messages"][-1]["content"] if chat else body["prompt"]
    state.requests += 1
    if "FAIL503" in prompt:
        return JSONResponse({"error": {"message": "queue full", "type": "server_overloaded"}}, status_code=503,
                            headers={"Retry-After": "1"})
    if "HANG" in prompt:
        await asyncio.sleep(30)
    n = int(body.get("max_tokens") or 16)
    return StreamingResponse(_stream(state, prompt, n, chat, body, arrived), media_type="text/event-stream")


def _chunk(text: str | None, chat: bool, finish: str | None = None) -> str:
    if chat:
        delta = {"content": text} if text is not None else {"role": "assistant", "content": ""}
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
    else:
        choice = {"index": 0, "text": text or "", "finish_reason": finish}
    return "data: " + json.dumps({"id": "x", "object": "chunk", "choices": [choice]}) + "\n\n"


async def _stream(state: FakeState, prompt: str, n: int, chat: bool, body: dict, start: float):
    state.in_flight += 1
    state.peak_in_flight = max(state.peak_in_flight, state.in_flight)
    gap = 1.0 if "SLOWSTREAM" in prompt else GAP_S
    try:
        if chat:
            yield _chunk(None, chat)  # role-only first chunk: not content, not TTFT
        for k in range(n):
            # Absolute schedule so delays do not drift: chunk k at FIRST_S + k * gap.
            await asyncio.sleep(max(0.0, start + FIRST_S + k * gap - time.perf_counter()))
            if k == 2 and "MIDERR" in prompt:
                yield 'data: {"error": {"message": "engine died", "type": "internal", "code": 500}}\n\n'
                return
            if k == 2 and "DROP" in prompt:
                raise RuntimeError("connection dropped on purpose")
            yield _chunk("tok ", chat, "length" if k == n - 1 else None)
        if "NOUSAGE" not in prompt and (body.get("stream_options") or {}).get("include_usage"):
            usage = {"prompt_tokens": len(state.tok.encode(prompt).ids), "completion_tokens": n,
                     "total_tokens": n + len(state.tok.encode(prompt).ids)}
            yield "data: " + json.dumps({"id": "x", "choices": [], "usage": usage}) + "\n\n"
        yield "data: [DONE]\n\n"
    finally:
        state.in_flight -= 1


class FakeServer:
    def __init__(self, state: FakeState) -> None:
        self.state = state
        # IPPROTO_TCP explicitly: asyncio only sets TCP_NODELAY on sockets whose proto says TCP.
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        config = uvicorn.Config(make_app(state), log_level="error", lifespan="off", timeout_graceful_shutdown=1)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "FakeServer":
        self.thread.start()
        deadline = time.time() + 10
        while not self.server.started and time.time() < deadline:
            time.sleep(0.02)
        assert self.server.started, "fake server did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.server.force_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("bench_tok")
    train_tokenizer(directory)
    return directory


@pytest.fixture(scope="module")
def server(tokenizer_dir: Path):
    with FakeServer(FakeState(Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")))) as srv:
        yield srv


@pytest.fixture(autouse=True)
def _reset(server: FakeServer):
    server.state.peak_in_flight = 0
    server.state.add_bos = False
    yield


def config(server: FakeServer, **kw) -> ServeBenchConfig:
    kw.setdefault("base_url", server.url)
    kw.setdefault("timeout", 10.0)
    return ServeBenchConfig.from_kwargs(**kw)


def jsonl(tmp_path: Path, prompts: list[str], output_len: int = 6) -> str:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "output_len": output_len}) + "\n" for p in prompts))
    return str(path)


def quiet():
    from rich.console import Console
    return Console(file=open(os.devnull, "w"), width=200)


# ----------------------------------------------------------------------------- timing


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_timings_match_the_fake_servers_delays(server: FakeServer, endpoint: str) -> None:
    out = 10
    code, doc = bench_serve(config(server, endpoint=endpoint, dataset="random", input_len=32, output_len=out,
                                   num_prompts=8, max_concurrency=4, warmup=4), quiet())
    assert code == 0
    assert doc["completed"] == 8 and doc["failed"] == 0 and doc["warmup_failed"] == 0
    assert doc["total_output_tokens"] == 8 * out
    first_ms, gap_ms = FIRST_S * 1000, GAP_S * 1000
    e2el_ms = first_ms + (out - 1) * gap_ms
    # The client can only add time, never subtract it. The slack is for loopback HTTP through a
    # Python server on a shared 2-core box (4 requests parsed one after another, other jobs running):
    # wide enough not to flake, narrow against a wrong definition (each is off by a whole 50 ms gap or more).
    assert first_ms - 5 <= doc["mean_ttft_ms"] <= first_ms + 150
    assert doc["mean_itl_ms"] == pytest.approx(gap_ms, abs=15)
    assert doc["mean_tpot_ms"] == pytest.approx(gap_ms, abs=15)
    assert e2el_ms - 5 <= doc["mean_e2el_ms"] <= e2el_ms + 200
    for rec in doc["requests"]:
        # The chat role-only chunk arrives at once: counting it would give a TTFT of a few ms.
        assert rec["success"] and rec["ttft"] >= FIRST_S - 0.005
        assert rec["output_len"] == out and rec["output_len_source"] == "usage"
        assert len(rec["itl"]) == out - 1
        assert rec["tpot"] == pytest.approx((rec["e2el"] - rec["ttft"]) / (out - 1))
        assert rec["e2el"] - rec["ttft"] == pytest.approx(sum(rec["itl"]), abs=1e-6)
    # 8 requests at concurrency 4: two waves of one E2E latency each.
    assert doc["duration"] == pytest.approx(2 * e2el_ms / 1000, abs=0.3)
    assert doc["request_throughput"] == pytest.approx(8 / doc["duration"])
    assert doc["max_concurrent_requests"] == 4 and server.state.peak_in_flight == 4


def test_max_concurrency_caps_in_flight_requests(server: FakeServer) -> None:
    code, doc = bench_serve(config(server, dataset="random", input_len=16, output_len=4, num_prompts=6,
                                   max_concurrency=2), quiet())
    assert code == 0 and doc["completed"] == 6
    assert server.state.peak_in_flight == 2
    queue_times = sorted(r["queue_time"] for r in doc["requests"])
    assert queue_times[-1] > 0.2  # the last two waited a whole wave for the semaphore


def test_requests_are_greedy_unless_sampling_flags_say_otherwise(server: FakeServer) -> None:
    server.state.bodies.clear()  # the server is shared by the module's tests
    code, _ = bench_serve(config(server, dataset="random", input_len=8, output_len=2, num_prompts=2), quiet())
    assert code == 0 and [b["temperature"] for b in server.state.bodies] == [0.0, 0.0]
    assert not any(k in b for b in server.state.bodies for k in ("top_p", "top_k", "min_p"))
    server.state.bodies.clear()
    code, _ = bench_serve(config(server, dataset="random", input_len=8, output_len=2, num_prompts=2,
                                 temperature=0.8, top_p=0.9, top_k=40, min_p=0.05), quiet())
    assert code == 0
    assert all((b["temperature"], b["top_p"], b["top_k"], b["min_p"]) == (0.8, 0.9, 40, 0.05)
               for b in server.state.bodies)
    with pytest.raises(ConfigError, match="temperature"):
        config(server, temperature=-1.0)


def test_output_tokens_fall_back_to_the_tokenizer_without_usage(server: FakeServer, tmp_path: Path) -> None:
    path = jsonl(tmp_path, ["NOUSAGE please", "with usage"], output_len=5)
    code, doc = bench_serve(config(server, dataset="jsonl", dataset_path=path, num_prompts=2), quiet())
    no_usage, with_usage = doc["requests"]
    assert no_usage["output_len_source"] == "tokenizer" and with_usage["output_len_source"] == "usage"
    tok = server.state.tok
    assert no_usage["output_len"] == len(tok.encode("tok " * 5).ids)
    assert no_usage["generated_text"] == "tok " * 5


# ----------------------------------------------------------------------------- failures


def test_failures_are_counted_with_their_reasons(server: FakeServer, tmp_path: Path) -> None:
    prompts = ["fine one", "FAIL503 a", "FAIL503 b", "HANG", "MIDERR", "DROP", "fine two"]
    save = tmp_path / "r.json"
    t0 = time.perf_counter()
    code, doc = bench_serve(config(server, dataset="jsonl", dataset_path=jsonl(tmp_path, prompts),
                                   num_prompts=len(prompts), timeout=1.5, save_result=str(save)), quiet())
    assert time.perf_counter() - t0 < 60  # not a latency target: only "the 1.5 s timeouts ended the run"
    assert code == 0
    assert doc["completed"] == 2 and doc["failed"] == 5 and doc["not_sent"] == 0
    assert doc["failure_reasons"] == {"http_503": 2, "timeout": 1, "stream_error": 1, "connection_error": 1}
    by_prompt = dict(zip(prompts, doc["requests"]))
    assert by_prompt["FAIL503 a"]["status_code"] == 503 and by_prompt["FAIL503 a"]["retry_after"] == "1"
    assert "queue full" in by_prompt["FAIL503 a"]["error"]
    assert "engine died" in by_prompt["MIDERR"]["error"]
    assert not any(r["success"] for p, r in by_prompt.items() if not p.startswith("fine"))
    saved = json.loads(save.read_text())
    assert saved["failure_reasons"] == doc["failure_reasons"]
    assert saved["errors"][1] and saved["output_lens"][1] == 0


def test_overall_deadline_stops_the_run_by_itself(server: FakeServer, tmp_path: Path) -> None:
    path = jsonl(tmp_path, ["fine", "HANG", "HANG"])
    t0 = time.perf_counter()
    code, doc = bench_serve(config(server, dataset="jsonl", dataset_path=path, num_prompts=3, timeout=60,
                                   max_duration=1.0), quiet())
    assert time.perf_counter() - t0 < 55  # far below the 60 s request timeout: the 1 s deadline ended it
    assert doc["stopped"] == "deadline"
    assert doc["completed"] == 1 and doc["failure_reasons"] == {"cancelled": 2}


def test_unreachable_server_is_a_clear_error(tmp_path: Path) -> None:
    from tureen.cli import main

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = main(["bench", "serve", "--base-url", f"http://127.0.0.1:{port}", "--num-prompts", "2"])
    assert code == 1


# ----------------------------------------------------------------------------- metrics and outputs


def test_sweep_writes_ordered_percentiles_goodput_json_and_png(server: FakeServer, tmp_path: Path) -> None:
    save, plot = tmp_path / "sweep.json", tmp_path / "sweep.png"
    cfg = config(server, dataset="random", input_len=24, output_len=6, num_prompts=8,
                 sweep_concurrency="1,2,4", goodput=["ttft:230", "tpot:60"], percentiles="50,90,99",
                 save_result=str(save), plot=str(plot))
    code, doc = bench_serve(cfg, quiet())
    assert code == 0
    assert [run["max_concurrency"] for run in doc["sweep"]] == [1, 2, 4]
    for run in doc["sweep"]:
        assert run["completed"] == 8
        for metric in ("ttft", "tpot", "itl", "e2el"):
            assert run[f"p50_{metric}_ms"] <= run[f"p90_{metric}_ms"] <= run[f"p99_{metric}_ms"]
        assert run["request_goodput"] is not None
        assert 0 <= run["request_goodput"] <= run["request_throughput"]
    throughputs = [run["request_throughput"] for run in doc["sweep"]]
    assert throughputs[0] < throughputs[1] < throughputs[2]  # the fake server is not saturated
    saved = json.loads(save.read_text())
    assert saved["sweep_concurrency"] == [1, 2, 4] and len(saved["sweep"]) == 3
    assert "api_key" not in saved["config"]
    _assert_real_png(plot, min_size=(800, 600))


def test_goodput_counts_only_requests_meeting_every_slo() -> None:
    def rec(ttft: float, e2el: float, out: int) -> RequestRecord:
        r = RequestRecord(0, 10, out, success=True, ttft=ttft, e2el=e2el, output_len=out, sent=True)
        r.itl = [(e2el - ttft) / max(out - 1, 1)] * (out - 1)
        return r

    records = [rec(0.1, 0.5, 5), rec(0.3, 0.7, 5), rec(0.1, 1.1, 5), rec(0.1, 0.1, 1),
               RequestRecord(4, 10, 5, sent=True, error_reason="http_503")]
    m = compute_metrics(records, 2.0, (50.0, 99.0), {"ttft": 200, "tpot": 150})
    # tpot: 0.1, 0.1, 0.25, and 0 for the one-token output (as vLLM) -> requests 0 and 3 are good.
    assert m["request_goodput"] == pytest.approx(2 / 2.0)
    assert m["request_throughput"] == pytest.approx(4 / 2.0)
    assert m["completed"] == 4 and m["failed"] == 1 and m["failure_reasons"] == {"http_503": 1}
    assert m["mean_tpot_ms"] == pytest.approx((100 + 100 + 250) / 3)  # one-token output excluded
    assert m["total_output_tokens"] == 16
    assert compute_metrics(records, 2.0, (99.0,), {})["request_goodput"] is None


def test_single_run_plot_is_a_latency_distribution(server: FakeServer, tmp_path: Path) -> None:
    plot = tmp_path / "single.png"
    code, _ = bench_serve(config(server, dataset="random", input_len=16, output_len=3, num_prompts=5,
                                 plot=str(plot)), quiet())
    assert code == 0
    _assert_real_png(plot, min_size=(800, 300))


def _assert_real_png(path: Path, min_size: tuple[int, int]) -> None:
    from PIL import Image

    with Image.open(path) as img:
        assert img.format == "PNG"
        assert img.size[0] >= min_size[0] and img.size[1] >= min_size[1]
        pixels = np.asarray(img.convert("L"), dtype=np.float64)
    assert pixels.std() > 5  # something was drawn, not a blank canvas


# ----------------------------------------------------------------------------- datasets


def test_random_prompts_have_exact_token_lengths_under_the_servers_tokenizer(server: FakeServer,
                                                                            tokenizer_dir: Path) -> None:
    server.state.add_bos = True  # the codec must strip the BOS the server adds anyway
    from tureen.bench.client import sync_http_client

    cfg = config(server, dataset="random", input_len=50, output_len=8, range_ratio=0.5, num_prompts=12, seed=3)
    with sync_http_client(cfg.target) as client:
        codec = ServerCodec.probe(client, "fake-model")
        assert codec is not None and codec.max_model_len == 4096
        samples = build_samples(cfg.workload, codec)
    tok = server.state.tok
    lens = [len(tok.encode(s.prompt).ids) for s in samples]
    assert lens == [s.prompt_len for s in samples]
    assert all(25 <= n <= 75 for n in lens) and len(set(lens)) > 3
    assert all(4 <= s.expected_output_len <= 12 for s in samples)
    assert len({s.prompt for s in samples}) == 12
    again = build_samples(cfg.workload, LocalCodec(tokenizer_dir))
    assert [s.prompt for s in again] == [s.prompt for s in samples]  # same seed, same tokenizer


def test_prefix_prompts_share_the_prefix_tokens(tokenizer_dir: Path) -> None:
    codec = LocalCodec(tokenizer_dir)
    workload = WorkloadConfig(dataset="prefix", input_len=20, prefix_len=40, num_prompts=6, seed=5)
    samples = build_samples(workload, codec)
    ids = [codec.encode(s.prompt) for s in samples]
    assert all(len(i) == 60 for i in ids) and all(s.prompt_len == 60 for s in samples)
    assert all(i[:39] == ids[0][:39] for i in ids)  # the shared prefix (boundary token may merge)
    assert len({tuple(i[40:]) for i in ids}) == 6  # distinct suffixes


def test_sharegpt_dataset_takes_first_human_turn_and_reply_length(tokenizer_dir: Path, tmp_path: Path) -> None:
    data = [
        {"conversations": [{"from": "human", "value": "ka lo mi ne ru sa to"},
                           {"from": "gpt", "value": "vi de po la zu chi ben mar ka lo"}]},
        {"conversations": [{"from": "gpt", "value": "no human turn first"}]},
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "too short prompt"}]},
        {"other": "ignored"},
    ]
    path = tmp_path / "sg.json"
    path.write_text(json.dumps(data))
    codec = LocalCodec(tokenizer_dir)
    samples = build_samples(WorkloadConfig(dataset="sharegpt", dataset_path=str(path), num_prompts=3), codec)
    assert len(samples) == 3 and {s.prompt for s in samples} == {"ka lo mi ne ru sa to"}
    assert samples[0].expected_output_len == len(codec.encode("vi de po la zu chi ben mar ka lo"))
    fixed = build_samples(WorkloadConfig(dataset="sharegpt", dataset_path=str(path), num_prompts=2,
                                         output_len=7), codec)
    assert all(s.expected_output_len == 7 for s in fixed)


def test_bad_inputs_raise_typed_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"nope": 1}\n')
    with pytest.raises(ConfigError, match=":2"):
        build_samples(WorkloadConfig(dataset="jsonl", dataset_path=str(bad), num_prompts=2), None)
    with pytest.raises(ConfigError, match="needs --dataset-path"):
        WorkloadConfig(dataset="sharegpt")
    with pytest.raises(ConfigError, match="needs a tokenizer"):
        build_samples(WorkloadConfig(dataset="random"), None)
    for kwargs, match in [({"request_rate": "0"}, "rate"), ({"goodput": ["ttfx:5"]}, "goodput"),
                          ({"goodput": ["ttft"]}, "NAME:MS"), ({"percentiles": "50,abc"}, "percentiles"),
                          ({"sweep_concurrency": "1,0"}, "sweep"), ({"base_url": "ftp://x"}, "http"),
                          ({"burstiness": 0}, "burstiness"), ({"bogus": 1}, "unknown")]:
        with pytest.raises(ConfigError, match=match):
            ServeBenchConfig.from_kwargs(**kwargs)


def test_cli_reports_config_errors_with_exit_code_2(capsys: pytest.CaptureFixture) -> None:
    from tureen.cli import main

    assert main(["bench", "serve", "--goodput", "latency:5"]) == 2
    assert "goodput SLO name" in capsys.readouterr().err


# ----------------------------------------------------------------------------- arrivals and SSE


def test_arrival_process_statistics() -> None:
    n, rate = 20000, 10.0
    for burstiness, cv2 in [(1.0, 1.0), (0.25, 4.0), (4.0, 0.25)]:
        gaps = np.diff(arrival_offsets(n, rate, burstiness, np.random.default_rng(7)), prepend=0.0)
        assert gaps.mean() == pytest.approx(1 / rate, rel=1e-6)  # rescaled to n / rate exactly
        assert gaps.var() / gaps.mean() ** 2 == pytest.approx(cv2, rel=0.12)
    a = arrival_offsets(50, 5.0, 0.5, np.random.default_rng(1))
    b = arrival_offsets(50, 5.0, 0.5, np.random.default_rng(1))
    assert np.array_equal(a, b) and np.all(np.diff(a) >= 0)
    assert np.array_equal(arrival_offsets(5, math.inf, 1.0, np.random.default_rng(0)), np.zeros(5))


def test_requests_are_sent_on_the_arrival_schedule(server: FakeServer) -> None:
    code, doc = bench_serve(config(server, dataset="random", input_len=8, output_len=2, num_prompts=20,
                                   request_rate=20.0, seed=11), quiet())
    expected = arrival_offsets(20, 20.0, 1.0, np.random.default_rng(11))
    lag = np.asarray(doc["start_times"]) - expected
    assert lag.min() > -0.001  # never early
    # How late a busy 2-core box sends is jitter, not behaviour: no bound on it here.
    assert doc["duration"] >= expected[-1]


def test_sse_parser_handles_comments_multiline_data_crlf_and_split_chunks() -> None:
    body = b': ping\ndata: {"a":\r\ndata: 1}\n\nevent: error\ndata: {"x": 2}\n\n\ndata: [DONE]'
    expected = [("message", b'{"a":\n1}'), ("error", b'{"x": 2}'), ("message", b"[DONE]")]
    whole = SSEParser()
    assert whole.feed(body) + whole.flush() == expected
    for size in (1, 2, 5):  # any split of the bytes gives the same events
        parser, events = SSEParser(), []
        for i in range(0, len(body), size):
            events += parser.feed(body[i:i + size])
        assert events + parser.flush() == expected


# ----------------------------------------------------------------------------- Ctrl-C


def test_ctrl_c_prints_partial_results(server: FakeServer, tmp_path: Path) -> None:
    path = jsonl(tmp_path, ["quick one", "quick two", "SLOWSTREAM a", "SLOWSTREAM b"], output_len=30)
    save = tmp_path / "partial.json"
    cmd = [sys.executable, "-m", "tureen.cli", "bench", "serve", "--base-url", server.url, "--dataset", "jsonl",
           "--dataset-path", path, "--num-prompts", "6", "--max-concurrency", "4", "--save-result", str(save)]
    before = server.state.requests
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 30
    while server.state.requests < before + 4 or server.state.in_flight < 2:  # the two slow ones are streaming
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.05)
    time.sleep(2.5)  # the quick ones are done, the slow ones are mid-stream
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 130, out
    assert "PARTIAL" in out and "Successful requests" in out
    doc = json.loads(save.read_text())
    assert doc["stopped"] == "interrupted"
    assert doc["completed"] >= 2 and doc["failure_reasons"].get("cancelled", 0) >= 2
    assert doc["completed"] + doc["failed"] + doc["not_sent"] == 6


# ----------------------------------------------------------------------------- Locust


def test_locustfile_reports_ttft_and_e2e(server: FakeServer, tmp_path: Path) -> None:
    import csv

    # Never import locust in this process: importing it monkey-patches sockets and threads (gevent).
    locustfile = Path(__file__).parents[1] / "src" / "tureen" / "bench" / "locustfile.py"
    cmd = [sys.executable, "-m", "locust", "-f", str(locustfile), "--host", server.url, "--headless", "-u", "2",
           "-r", "2", "--run-time", "8s", "--csv", str(tmp_path / "loc"), "--dataset", "prefix",
           "--input-len", "16", "--prefix-len", "16", "--output-len", "6", "--num-prompts", "4"]
    # --run-time counts from gevent's cached clock, which can date from before the (slow, on a loaded machine)
    # import of the locustfile: 3 s once left under half a second of load and no request in the CSV.
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=90, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {(r["Type"], r["Name"]): r for r in csv.DictReader(open(tmp_path / "loc_stats.csv"))}
    ttft, e2e = rows[("TTFT", "/v1/completions")], rows[("E2E", "/v1/completions")]
    assert int(ttft["Request Count"]) >= 2 and int(ttft["Failure Count"]) == 0
    assert FIRST_S * 1000 - 5 <= float(ttft["Median Response Time"]) <= FIRST_S * 1000 + 60
    expected_e2e = (FIRST_S + 5 * GAP_S) * 1000
    assert expected_e2e - 5 <= float(e2e["Median Response Time"]) <= expected_e2e + 80
    assert float(e2e["Average Content Size"]) == 6  # output tokens from the usage chunk
