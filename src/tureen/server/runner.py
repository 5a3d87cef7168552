"""Run the app under uvicorn, with a graceful drain on SIGTERM/SIGINT.

The first signal starts a drain: new requests get 503 + Retry-After and /health fails, in-flight
requests run up to ``--shutdown-timeout``, the rest are aborted (their streams end with
finish_reason "abort"), then uvicorn closes and the process exits 0. A second signal exits at once.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from typing import Any

import uvicorn

from tureen.server.app import build_app
from tureen.server.config import ServerConfig, warn_if_exposed
from tureen.server.connections import KEEP_ALIVE_S, default_max_connections, guarded_protocol
from tureen.server.lifecycle import ServerState

logger = logging.getLogger("tureen.server")

TRACE = 5  # uvicorn's "trace" level
UVICORN_GRACE_S = 5  # after our drain, the longest uvicorn waits for connections to close
GIL_SWITCH_INTERVAL_S = 0.001  # Python's default is 0.005


def run_server(engine_config: Any, server_config: ServerConfig, engine_factory: Any = None) -> int:
    """Serve until a signal drains the server; returns the exit code (0 after a clean drain)."""
    if engine_factory is None:
        def engine_factory():
            from tureen.engine.core_client import EngineCoreClient, WatchdogConfig

            watchdog = WatchdogConfig(stall_timeout=server_config.watchdog_timeout,
                                      max_restarts=server_config.max_engine_restarts,
                                      restart_window=server_config.engine_restart_window,
                                      shutdown_timeout=server_config.shutdown_timeout + 5.0)
            level = "debug" if server_config.log_level == "trace" else server_config.log_level
            return EngineCoreClient(engine_config, watchdog, log_level=level)

    warn_if_exposed(server_config, logger)
    state = ServerState(server_config)
    exit_code = [0]
    server: DrainingServer

    def on_fatal(exc: BaseException) -> None:
        exit_code[0] = 1
        server.should_exit = True

    app = build_app(state, engine_factory, on_fatal)
    server = DrainingServer(uvicorn_config(app, server_config), state)
    # The engine's reader thread shares this interpreter with the HTTP loop; a shorter GIL switch
    # interval hands the interpreter back sooner, so health checks and streams stay prompt.
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    server.run()
    if not server.started and exit_code[0] == 0:
        return 1
    return exit_code[0]


def uvicorn_config(app: Any, server_config: ServerConfig, **overrides: Any) -> uvicorn.Config:
    """uvicorn's config for this app, with the connection guards of ``tureen.server.connections``."""
    max_connections = server_config.max_connections or default_max_connections()
    options: dict[str, Any] = dict(
        host=server_config.host, port=server_config.port, log_config=None,
        log_level=TRACE if server_config.log_level == "trace" else server_config.log_level,
        access_log=not server_config.disable_uvicorn_access_log, timeout_graceful_shutdown=UVICORN_GRACE_S,
        lifespan="on", http=guarded_protocol(server_config.http_read_timeout, max_connections),
        timeout_keep_alive=KEEP_ALIVE_S)
    return uvicorn.Config(app, **{**options, **overrides})


class DrainingServer(uvicorn.Server):
    """uvicorn's server, but the first signal drains instead of closing the listening socket.

    uvicorn would stop accepting connections at once; we keep listening so that new requests get
    a clear 503 + Retry-After (and load balancers see /health fail) while in-flight ones finish.
    """

    def __init__(self, config: Any, state: Any) -> None:
        super().__init__(config)
        self.state = state
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining = False

    async def serve(self, sockets: Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self._draining and self.should_exit:  # drained already and on the way out
            return
        if self._draining or self._loop is None:
            logger.warning("second signal (%s): exiting now", signal.Signals(sig).name)
            self.should_exit = True
            self.force_exit = True
            return
        self._draining = True
        logger.info("received %s: draining", signal.Signals(sig).name)
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self.state.begin_drain()
        self._drain_task = asyncio.ensure_future(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        try:
            await self.state.drain()
        finally:
            self.should_exit = True
