"""The engine-core channel: typed messages framed over a Unix socket pair, both ends."""

from __future__ import annotations

import threading

import pytest

from tureen.engine.core_channel import ChannelClosed, ClientChannel, EngineChannel, _FrameReader, channel_pair, frame
from tureen.engine.core_messages import AbortRequests, EngineCoreRequest, Shutdown, StepOutputs
from tureen.engine.protocol import EngineStats
from tureen.outputs import CompletionOutput, RequestOutput
from tureen.sampling_params import SamplingParams


def _pair() -> tuple[ClientChannel, EngineChannel]:
    ours, theirs = channel_pair()
    return ClientChannel(ours), EngineChannel(theirs)


def _receive_all(channel, count: int, timeout_s: float = 10.0) -> list:
    got: list = []
    for _ in range(10_000):  # bounded by count: each receive waits up to timeout_s
        if len(got) >= count:
            break
        got += channel.receive(timeout_s)
    return got


def test_messages_cross_both_ways_typed_and_in_order():
    client, engine = _pair()
    request = EngineCoreRequest("r1", "hi", [1, 2, 3], SamplingParams(max_tokens=4), priority=2, arrival_time=1.5)
    client.send(request)
    client.send(AbortRequests(["r0"]))
    client.send(Shutdown())
    got = _receive_all(engine, 3)
    assert got == [request, AbortRequests(["r0"]), Shutdown()]
    out = RequestOutput("r1", None, [], [CompletionOutput(0, "text", [7, 8], finish_reason="length")], True)
    engine.send(StepOutputs([out], EngineStats(num_running=1)))
    (back,) = _receive_all(client, 1)
    assert isinstance(back, StepOutputs) and back.outputs == [out] and back.stats.num_running == 1


def test_frames_split_anywhere_are_reassembled():
    data = frame(AbortRequests(["a"])) + frame(AbortRequests(["b" * 300])) + frame(Shutdown())
    reader = _FrameReader()
    frames = []
    for i in range(0, len(data), 7):  # 7-byte pieces cut through headers and payloads alike
        frames += reader.feed(data[i:i + 7])
    assert len(frames) == 3 and reader.feed(b"") == []


def test_a_send_never_blocks_and_what_the_socket_cannot_take_goes_out_later_in_order():
    client, engine = _pair()
    big = [AbortRequests([f"{i}-" + "x" * 4000]) for i in range(3000)]  # ~12 MB: far over the socket buffers
    done = threading.Event()

    def send_all() -> None:
        for message in big:
            client.send(message)
        done.set()

    sender = threading.Thread(target=send_all)
    sender.start()
    assert done.wait(30), "ClientChannel.send blocked although nobody was reading"
    sender.join()
    assert client._pending  # the rest waits in the buffer ...
    received: list = []
    for _ in range(100_000):  # ... and is flushed by the receiving side's polls
        if len(received) >= len(big):
            break
        client.receive(0.0)
        received += engine.receive(0.05)
    assert received == big


def test_end_of_file_is_channel_closed_on_either_side():
    client, engine = _pair()
    engine.close()
    with pytest.raises(ChannelClosed):
        client.receive(5.0)
    with pytest.raises(ChannelClosed):
        for _ in range(100):  # the first sends may still land in the socket buffer
            client.send(AbortRequests(["x" * 100_000]))
    client2, engine2 = _pair()
    client2.close()
    with pytest.raises(ChannelClosed):
        engine2.receive(5.0)
    with pytest.raises(ChannelClosed):
        engine2.send(StepOutputs())


def test_receive_with_nothing_sent_returns_nothing():
    client, engine = _pair()
    assert engine.receive(0.01) == [] and client.receive(0.0) == []
