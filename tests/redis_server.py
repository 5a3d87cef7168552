"""A real ``redis-server`` for tests: a free port, a temp dir, and stop/restart/pause mid-test.

Use the ``redis_server`` fixture (``from redis_server import redis_server``) or the class directly.
The server snapshots to ``dump.rdb`` in its own directory when stopped, so ``restart()`` brings
the same data back on the same port, as a real Redis with RDB persistence would.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

REDIS_SERVER = shutil.which("redis-server")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """One ``redis-server`` process bound to 127.0.0.1 on a free port."""

    def __init__(self, directory: Path, *, password: str | None = None) -> None:
        if REDIS_SERVER is None:
            raise RuntimeError("redis-server is not installed; run scripts/ci-system-deps.sh")
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = _free_port()
        self.password = password
        self.proc: subprocess.Popen | None = None
        self._log = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 15.0) -> RedisServer:
        assert self.proc is None or self.proc.poll() is not None, "redis-server is already running"
        cmd = [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
               "--save", "3600 1", "--appendonly", "no", "--daemonize", "no", "--protected-mode", "no"]
        if self.password:
            cmd += ["--requirepass", self.password]
        self._log = open(self.dir / "redis.log", "a")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT)
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"redis-server exited early:\n{self.log_text()}"
            if self.ping():
                return
            time.sleep(0.02)
        raise AssertionError(f"redis-server not ready in {timeout} s:\n{self.log_text()}")

    def ping(self) -> bool:
        """A raw RESP PING, so the helper needs no client library."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                if self.password:
                    s.sendall(f"AUTH {self.password}\r\n".encode())
                    s.recv(64)
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        """SIGTERM: Redis writes its snapshot and exits; the port then refuses connections."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a paused server cannot handle SIGTERM
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        if self._log:
            self._log.close()
            self._log = None

    def restart(self) -> RedisServer:
        self.stop()
        return self.start()

    def pause(self) -> None:
        """SIGSTOP: connections are accepted by the kernel but never answered (a hung Redis)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def log_text(self) -> str:
        path = self.dir / "redis.log"
        return path.read_text() if path.exists() else ""

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@pytest.fixture
def redis_server(tmp_path):
    """A fresh, empty redis-server for one test; stopped afterwards."""
    server = RedisServer(tmp_path / "redis").start()
    try:
        yield server
    finally:
        server.stop()
