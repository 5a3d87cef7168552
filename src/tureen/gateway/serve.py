"""Run the gateway under uvicorn with a graceful drain on SIGTERM/SIGINT.

The first signal drains: new requests get 503 + Retry-After and /health fails, while in-flight
requests and streams run to completion (up to ``tureen_settings.drain_timeout_s``); then the
process exits 0. A second signal exits at once. This is ``tureen serve``'s drain, reused.
"""

from __future__ import annotations

import logging
import os
import signal
from dataclasses import dataclass

import uvicorn

from tureen.gateway.app import build_app
from tureen.gateway.config import GatewayConfig
from tureen.server.config import ServerConfig
from tureen.server.connections import KEEP_ALIVE_S, default_max_connections, guarded_protocol
from tureen.server.runner import UVICORN_GRACE_S, DrainingServer


class _AppState:
    """Adapts the app's ``GatewayState`` (created at start-up) to what ``DrainingServer`` calls."""

    def __init__(self, app) -> None:
        self.app = app

    def begin_drain(self) -> None:
        gateway = getattr(self.app.state, "gateway", None)
        if gateway is not None:
            gateway.state.begin_drain()

    async def drain(self) -> None:
        gateway = getattr(self.app.state, "gateway", None)
        if gateway is not None:
            await gateway.state.drain()




def serve(config: GatewayConfig, host: str, port: int, log_level: str = "info", workers: int = 1,
          source: tuple[str | None, str | None] = (None, None)) -> int:
    """Serve in this process, or in ``workers`` processes sharing one listening socket."""
    logging.getLogger("tureen.gateway").info("gateway on http://%s:%d: %d deployment(s), strategy %s, %d worker(s)",
                                             host, port, len(config.model_list),
                                             config.router_settings.routing_strategy, workers)
    if workers <= 1:
        return _serve_one(build_app(config), host, port, log_level)
    return _supervise(Worker(source[0], source[1], host, port, log_level), workers)


def _serve_one(app, host: str, port: int, log_level: str, sockets=None) -> int:
    # The server's slow-loris guards (tureen.server.connections), with the server's default limits.
    guards = guarded_protocol(ServerConfig.http_read_timeout, default_max_connections())
    uv_config = uvicorn.Config(app, host=host, port=port, log_config=None, log_level=log_level, access_log=False,
                               timeout_graceful_shutdown=UVICORN_GRACE_S, lifespan="on", backlog=4096, http=guards,
                               timeout_keep_alive=KEEP_ALIVE_S)
    server = DrainingServer(uv_config, _AppState(app))
    server.run(sockets)
    return 0 if server.started else 1


@dataclass(frozen=True)
class Worker:
    """One worker process: loads the config itself (secrets come from its environment) and serves."""

    config_path: str | None
    upstream: str | None
    host: str
    port: int
    log_level: str

    def __call__(self, sockets) -> None:
        from tureen.gateway.config import DEFAULT_UPSTREAM, default_config, load_config

        logging.basicConfig(level=self.log_level.upper(), format=f"%(asctime)s %(levelname)s [{os.getpid()}] "
                                                                   "%(name)s: %(message)s")
        config = load_config(self.config_path)[0] if self.config_path else default_config(
            self.upstream or DEFAULT_UPSTREAM)
        raise SystemExit(_serve_one(build_app(config), self.host, self.port, self.log_level, sockets))


def _supervise(worker: Worker, workers: int) -> int:
    """Bind once, start the workers, forward SIGTERM/SIGINT to them (each drains), wait for them all.

    Per-process state stays per worker: breakers, health checks, and the in-process limiter when no
    Redis is configured (use Redis to share limits between workers, as between gateway hosts).
    """
    from uvicorn._subprocess import get_subprocess

    placeholder = uvicorn.Config("tureen.gateway.serve:Worker", host=worker.host, port=worker.port, log_config=None,
                                 backlog=4096)
    sock = placeholder.bind_socket()
    procs = [get_subprocess(placeholder, worker, [sock]) for _ in range(workers)]
    for proc in procs:
        proc.start()

    def forward(sig: int, frame) -> None:
        for proc in procs:
            if proc.pid is not None and proc.is_alive():
                os.kill(proc.pid, sig)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    for proc in procs:
        proc.join()
    sock.close()
    return max((proc.exitcode or 0) for proc in procs)
