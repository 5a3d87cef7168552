"""The channel between the API process and the engine core: typed messages over one Unix socket pair.

    API process: ClientChannel                          engine core process: EngineChannel
    any thread sends (non-blocking; bytes the  <── socketpair ──>  the engine thread reads between
    socket cannot take yet wait in a buffer                        steps and writes one StepOutputs
    that the reader thread flushes); the reader                    per step with one blocking
    thread receives                                                sendall

Each frame is a 4-byte little-endian length and one message encoded by ``core_messages.encode``
(msgpack via msgspec; never pickle). The engine's end is inherited by the child process as a
file descriptor, so no address is bound and nothing is left on disk.

Why not ZeroMQ, which this replaced: a ZeroMQ send hands the message to ZeroMQ's own I/O thread,
so every step's output woke two extra threads (one per process) before the API process's reader
saw it. On a machine whose cores the engine's compute threads already fill, each wake-up was a
context switch and a scheduling delay on the engine's critical path; a py-spy profile of the
engine thread had most of its non-compute samples inside ``Socket.send``. Here the engine thread
writes straight into the socket and the API process's reader thread is the only one woken.

End of file on the socket means the other process is gone: ``receive`` raises ``ChannelClosed``
at once, which is how each side notices the other's death without waiting for a timeout.
"""

from __future__ import annotations

import os
import select
import socket
import struct
import threading
from typing import Any

from tureen.engine.core_messages import decode, encode

_HEADER = struct.Struct("<I")
_READ_SIZE = 1 << 20
SOCKET_BUFFER_BYTES = 4 << 20  # a step's outputs, or a long prompt, normally fit in one write


class ChannelClosed(ConnectionError):
    """The process at the other end closed the socket (it exited or was killed)."""


def channel_pair() -> tuple[socket.socket, socket.socket]:
    """(the API process's end, the engine process's end); the second is handed to the child."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    for sock in (ours, theirs):
        for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            try:
                sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER_BYTES)
            except OSError:  # the kernel's limit is lower: its own default buffer still works
                pass
    return ours, theirs


class _FrameReader:
    """Splits a byte stream into frames.

    ``feed`` returns views into ``data`` where it can (whole frames in a read that starts on a frame
    boundary, the usual case), so they are valid only until the next read: decode them at once.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: memoryview | bytes) -> list[memoryview | bytes]:
        if self._buffer:  # a frame was split across reads: join, then split what is complete
            self._buffer += data
            frames, used = _split(bytes(self._buffer))  # bytes: the buffer shrinks next, under no view
            del self._buffer[:used]
            return frames
        frames, used = _split(data)
        if used < len(data):
            self._buffer += data[used:]
        return frames


def _split(data: memoryview | bytes) -> tuple[list, int]:
    """The whole frames at the start of ``data`` (slices of it), and how many bytes they span."""
    frames, start, total = [], 0, len(data)
    while total - start >= _HEADER.size:
        (size,) = _HEADER.unpack_from(data, start)
        end = start + _HEADER.size + size
        if end > total:
            break
        frames.append(data[start + _HEADER.size:end])
        start = end
    return frames, start


def frame(message: Any) -> bytes:
    payload = encode(message)
    return _HEADER.pack(len(payload)) + payload


def _poll(sock: socket.socket, mask: int, timeout_s: float) -> int:
    """The events of ``mask`` (plus hang-up and error) ready on ``sock`` within ``timeout_s``; 0 if none.

    poll, not select: the API process may hold more than FD_SETSIZE descriptors (connections)."""
    poller = select.poll()
    poller.register(sock, mask)
    ready = poller.poll(max(timeout_s, 0.0) * 1000)
    return ready[0][1] if ready else 0


class _Channel:
    """Receiving, shared by both ends: one thread reads."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._reader = _FrameReader()
        # recv_into one buffer: a fresh 1 MiB recv() per message is an mmap, mremap and munmap each time
        self._read_buffer = memoryview(bytearray(_READ_SIZE))

    def receive(self, timeout_s: float) -> list[Any]:
        """The messages that arrived within ``timeout_s`` (possibly none); raises ChannelClosed on EOF."""
        return self.receive_ready() if self.wait_readable(timeout_s) else []

    def receive_ready(self) -> list[Any]:
        """The messages one read finds, without waiting (a socket the caller knows is readable, or
        a non-blocking one); raises ChannelClosed on EOF."""
        try:
            size = self.sock.recv_into(self._read_buffer)
        except BlockingIOError:
            return []
        except OSError as exc:
            raise ChannelClosed(f"the engine channel failed: {exc}") from exc
        if not size:
            raise ChannelClosed("the other process closed the engine channel")
        return [decode(f) for f in self._reader.feed(self._read_buffer[:size])]

    def wait_readable(self, timeout_s: float) -> bool:
        return bool(_poll(self.sock, select.POLLIN, timeout_s))

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class EngineChannel(_Channel):
    """The engine process's end: only the engine thread uses it, and its writes may block."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(True)
        super().__init__(sock)

    @classmethod
    def from_fd(cls, fd: int) -> "EngineChannel":
        os.set_inheritable(fd, False)  # inherited from the parent; no grandchild should keep it open
        return cls(socket.socket(fileno=fd))

    def send(self, message: Any) -> None:
        try:
            self.sock.sendall(frame(message))
        except OSError as exc:
            raise ChannelClosed(f"the API process is gone: {exc}") from exc


class ClientChannel(_Channel):
    """The API process's end: any thread may send, without ever blocking (an event loop sends).

    What the socket's buffer cannot take right away (an engine busy in a long step while many
    requests arrive) waits here, in order, and goes out as soon as the reader thread sees the
    socket writable, or with the next send.
    """

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        super().__init__(sock)
        self._pending = bytearray()
        self._lock = threading.Lock()  # senders and the reader's flush

    def send(self, message: Any) -> None:
        """Queue ``message``; raises ChannelClosed when the engine is gone."""
        data = frame(message)
        with self._lock:
            self._pending += data
            self._flush_locked()

    def _flush_quietly(self) -> None:
        with self._lock:
            try:
                self._flush_locked()
            except ChannelClosed:
                pass  # the read reports it

    def _flush_locked(self) -> None:
        while self._pending:
            try:
                sent = self.sock.send(self._pending)
            except BlockingIOError:
                return
            except OSError as exc:
                raise ChannelClosed(f"the engine is gone: {exc}") from exc
            del self._pending[:sent]

    @property
    def has_pending(self) -> bool:
        return bool(self._pending)

    def flush_when_writable(self, timeout_s: float) -> None:
        """Wait up to ``timeout_s`` for the socket to take what is pending, and send it (while an
        event loop reads the channel, another thread still flushes the writes)."""
        if _poll(self.sock, select.POLLOUT, timeout_s) & select.POLLOUT:
            self._flush_quietly()

    def wait_readable(self, timeout_s: float) -> bool:
        events = _poll(self.sock, select.POLLIN | (select.POLLOUT if self._pending else 0), timeout_s)
        if events & select.POLLOUT:
            self._flush_quietly()
        return bool(events & ~select.POLLOUT)  # readable, hung up or failed: recv tells which
