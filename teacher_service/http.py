"""The HTTP side port: liveness, readiness and Prometheus metrics (FastAPI + uvicorn).

    GET /healthz  200 while the event loop runs and every backend can serve; 503 with
                  the reason when one cannot (a dead vLLM engine, a streak of failed
                  batches): liveness, so the kubelet restarts the pod
    GET /readyz   200 when every teacher is loaded, healthy and the server is not
                  draining, 503 with the reason otherwise (readiness: the load
                  balancer stops sending work)
    GET /metrics  Prometheus text exposition of the service's registry

It runs in the gRPC server's own event loop (`HttpServer.start`), so a wedged loop
fails liveness, and it never installs signal handlers: the server owns SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable, Iterator

import uvicorn
from fastapi import FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

log = logging.getLogger(__name__)


def build_app(
    ready: Callable[[], tuple[bool, str]],
    registry: CollectorRegistry,
    before_scrape: Callable[[], None] | None = None,
    live: Callable[[], tuple[bool, str]] | None = None,
) -> FastAPI:
    """The side-port app.

    Args:
        ready: returns (is_ready, reason); the reason is the /readyz body.
        live: returns (is_alive, reason) for /healthz; None: alive while serving.
        registry: the metrics registry to expose.
        before_scrape: refreshes gauges that are sampled, not pushed (GPU memory).
    """
    app = FastAPI(title="teacher-service side port", docs_url=None, redoc_url=None)

    # Probes are `async def`: they run on the event loop itself (a sync endpoint would
    # go through a thread pool), so their latency is the loop's responsiveness.
    @app.get("/healthz")
    async def healthz() -> Response:
        ok, reason = live() if live is not None else (True, "ok")
        return Response(f"{reason}\n", status_code=200 if ok else 503, media_type="text/plain")

    @app.get("/readyz")
    async def readyz() -> Response:
        ok, reason = ready()
        return Response(f"{reason}\n", status_code=200 if ok else 503, media_type="text/plain")

    @app.get("/metrics")
    def metrics() -> Response:
        if before_scrape is not None:
            before_scrape()
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app


class _QuietServer(uvicorn.Server):
    """A uvicorn server that leaves signal handling to its host process."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class HttpServer:
    """Serves an app on host:port inside the running event loop."""

    def __init__(self, app: FastAPI, host: str, port: int) -> None:
        self._app = app
        self._host = host
        self._requested_port = port
        self._server: _QuietServer | None = None
        self._task: asyncio.Task[None] | None = None
        self.port = 0

    async def start(self) -> None:
        """Binds (port 0 picks a free one, then `self.port` says which) and serves."""
        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self._host, self._requested_port))
        sock.listen(128)
        sock.setblocking(False)
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self._app, log_level="warning", access_log=False, lifespan="off", loop="none"
        )
        self._server = _QuietServer(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name="http-side-port")
        while not self._server.started:
            if self._task.done():  # startup failed: surface the error here
                await self._task
                raise RuntimeError("HTTP side port exited during start-up")
            await asyncio.sleep(0.01)
        log.info("HTTP side port on %s:%s", self._host, self.port)

    async def stop(self) -> None:
        if self._server is None or self._task is None:
            return
        self._server.should_exit = True
        await self._task
