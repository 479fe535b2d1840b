"""The teacher server process: gRPC TeacherService + health + reflection + HTTP side port.

    hybrid-distill serve --model [NAME=]DIR --grpc-port 50051 --http-port 8080
    python -m teacher_service.server --model DIR ...          (same flags)

Start-up order: the HTTP side port first (liveness answers, /readyz says 503 while
weights load), then every backend and its scheduler, then the gRPC port; readiness turns
true last. On SIGTERM or SIGINT: readiness false and health NOT_SERVING at once, new
sequences refused with UNAVAILABLE, accepted ones finish within --grace-seconds, then
the ports close and the process exits 0.

For tests and embedding: `start_server(config)` inside a running event loop returns a
`RunningServer`; `serve_in_thread(config)` runs one on a background thread for
synchronous code.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from importlib import metadata

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from teacher_service.backends.base import Backend
from teacher_service.codec import LOGPROB_DTYPES
from teacher_service.config import ServerConfig, parse_args
from teacher_service.gpu_memory import NvmlReader
from teacher_service.http import HttpServer, build_app
from teacher_service.metrics import Metrics
from teacher_service.safe_decode import SafeDecodeInterceptor
from teacher_service.scheduler import Scheduler, SchedulerConfig
from teacher_service.security import BearerAuthInterceptor, TokenFile, server_credentials
from teacher_service.servicer import HostedTeacher, TeacherServicer, add_to_server, teacher_info
from teacher_service.v1 import teacher_pb2 as pb

log = logging.getLogger(__name__)

# After the drain, how long open streams get to flush their last answers.
STREAM_CLOSE_S = 1.0
# How often backend health is copied into the gRPC health service and the ready gauge
# (the HTTP probes ask the backends directly).
HEALTH_POLL_S = 0.5
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["TeacherService"].full_name


def server_version() -> str:
    try:
        return metadata.version("hybrid-distill")
    except metadata.PackageNotFoundError:
        return "unknown"


def build_backend(config: ServerConfig, model_index: int) -> Backend:
    """The configured backend for one model (vLLM is imported only when asked for)."""
    spec = config.models[model_index]
    if config.backend == "vllm":
        from teacher_service.backends.vllm_backend import VllmBackend

        return VllmBackend(
            spec.path,
            max_top_k=config.max_top_k,
            dtype=config.dtype,
            tensor_parallel_size=config.tensor_parallel_size,
            gpu_memory_utilization=config.gpu_memory_utilization,
            max_model_len=config.max_sequence_length,
            max_failed_batches=config.max_failed_batches,
        )
    from teacher_service.backends.torch_backend import TorchBackend

    return TorchBackend(
        spec.path,
        device=config.device,
        dtype=config.dtype,
        max_sequence_length=config.max_sequence_length,
        max_failed_batches=config.max_failed_batches,
    )


def scheduler_config(config: ServerConfig) -> SchedulerConfig:
    return SchedulerConfig(
        max_batch_tokens=config.max_batch_tokens,
        max_batch_size=config.max_batch_size,
        max_wait_s=config.max_wait_s,
        max_queued_tokens=config.max_queued_tokens,
        max_client_queued_tokens=config.max_client_queued_tokens,
    )


@dataclass
class RunningServer:
    """A started server inside the current event loop.

    Attributes:
        grpc_port / http_port: the bound ports (useful when the config asked for 0).
        metrics: the server's metrics (its own registry).
    """

    config: ServerConfig
    grpc_port: int
    http_port: int
    metrics: Metrics
    servicer: TeacherServicer
    _grpc: grpc.aio.Server
    _http: HttpServer
    _health: HealthServicer
    _schedulers: list[Scheduler]
    _backends: list[Backend]
    _stopped: asyncio.Event = field(default_factory=asyncio.Event)
    _health_task: asyncio.Task[None] | None = None

    @property
    def draining(self) -> bool:
        return self.servicer.draining

    def dead_reason(self) -> str | None:
        """Why some teacher's backend cannot serve (see backends/health.py), or None."""
        for spec, backend in zip(self.config.models, self._backends, strict=True):
            reason = backend.dead_reason()
            if reason is not None:
                return f"teacher {spec.name}: {reason}"
        return None

    def liveness(self) -> tuple[bool, str]:
        """False when a backend is dead: restarting the process is the remedy."""
        reason = self.dead_reason()
        return (False, reason) if reason is not None else (True, "ok")

    def readiness(self) -> tuple[bool, str]:
        if self.servicer.draining:
            return False, "draining"
        reason = self.dead_reason()
        return (False, reason) if reason is not None else (True, "ready")

    def watch_health(self) -> None:
        """Starts copying backend health into gRPC health and the ready gauge."""
        self._health_task = asyncio.create_task(self._watch_health(), name="health-watch")

    async def _watch_health(self) -> None:
        serving = True
        while not self.servicer.draining:
            ok, reason = self.readiness()
            if ok != serving and not self.servicer.draining:
                serving = ok
                if not ok:
                    log.error("not serving: %s", reason)
                else:
                    log.warning("serving again: every backend is healthy")
                status = health_pb2.HealthCheckResponse
                value = status.SERVING if ok else status.NOT_SERVING
                await self._health.set("", value)
                await self._health.set(SERVICE_NAME, value)
                self.metrics.ready.set(1 if ok else 0)
            await asyncio.sleep(HEALTH_POLL_S)

    async def begin_drain(self) -> None:
        """Readiness false, health NOT_SERVING, new sequences refused with UNAVAILABLE."""
        if self.servicer.draining:
            return
        log.info("draining: refusing new work, %d sequences in flight", self.servicer.inflight)
        self.servicer.begin_drain()
        self.metrics.ready.set(0)
        for scheduler in self._schedulers:
            scheduler.drain()
        await self._health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        await self._health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)

    async def drain_and_stop(self, grace_s: float | None = None) -> None:
        """Drains, lets accepted work finish for up to `grace_s`, then shuts everything."""
        grace = self.config.grace_seconds if grace_s is None else grace_s
        deadline = time.monotonic() + grace
        await self.begin_drain()
        if not await self.servicer.wait_idle(grace):
            log.warning("grace period of %.1fs over; cancelling remaining work", grace)
        # Every accepted sequence is answered; streams may still be open (a trainer keeps
        # one for its whole run). Give their last answers a moment to leave, then cancel.
        await self._grpc.stop(min(STREAM_CLOSE_S, max(0.0, deadline - time.monotonic())))
        if self._health_task is not None:
            self._health_task.cancel()
            await asyncio.gather(self._health_task, return_exceptions=True)
        for scheduler in self._schedulers:
            await scheduler.close()
        for backend in self._backends:
            await backend.close()
        await self._http.stop()
        self._stopped.set()
        log.info("server stopped")

    async def wait_stopped(self) -> None:
        await self._stopped.wait()


async def start_server(
    config: ServerConfig,
    metrics: Metrics | None = None,
    backend_factory: Callable[[ServerConfig, int], Backend] = build_backend,
) -> RunningServer:
    """Loads every teacher and starts both ports in the running event loop.

    Readiness (HTTP /readyz and grpc.health.v1) is true when this returns; from then on
    both, and liveness (/healthz), follow the backends' health. Call
    `drain_and_stop()` on the result to shut down. `backend_factory(config, i)` builds
    the backend of config.models[i] (tests pass their own).
    """
    metrics = metrics or Metrics(max_clients=config.max_client_labels)
    if config.torch_threads is not None:
        import torch

        # Process-wide. On a small CPU host, fewer torch threads than cores leaves room
        # for the event loop (gRPC I/O, encoding) instead of OpenMP workers spinning.
        torch.set_num_threads(config.torch_threads)
    metrics.ready.set(0)
    state: dict[str, RunningServer] = {}
    gpus = NvmlReader.for_this_process()

    def ready() -> tuple[bool, str]:
        running = state.get("server")
        return running.readiness() if running else (False, "loading")

    def live() -> tuple[bool, str]:
        running = state.get("server")
        return running.liveness() if running else (True, "loading")

    http = HttpServer(
        build_app(ready, metrics.registry, lambda: sample_gpu_memory(metrics, gpus), live),
        config.host,
        config.http_port,
    )
    await http.start()
    backends: list[Backend] = []
    schedulers: list[Scheduler] = []
    try:
        teachers: dict[str, HostedTeacher] = {}
        for index, spec in enumerate(config.models):
            # Off the loop: the first build imports transformers (or vLLM), which takes
            # seconds, and the side port must answer probes meanwhile.
            backend = await asyncio.get_running_loop().run_in_executor(
                None, backend_factory, config, index
            )
            backends.append(backend)
            log.info("loading teacher %s from %s (%s)", spec.name, spec.path, config.backend)
            await backend.start()
            scheduler = Scheduler(spec.name, backend, scheduler_config(config), metrics)
            await scheduler.start()
            schedulers.append(scheduler)
            meta = backend.meta
            info = teacher_info(
                spec.name, meta, config.max_top_k, config.max_query_ids, LOGPROB_DTYPES
            )
            teachers[spec.name] = HostedTeacher(info=info, scheduler=scheduler)
            metrics.teacher_info.labels(
                spec.name, meta.model_name, meta.revision, meta.backend
            ).set(1)
        if config.backend == "vllm":
            from teacher_service.backends.vllm_backend import engine_metrics_view

            # The engine's own metrics on the same /metrics (dashboard: KV cache, queue).
            metrics.registry.register(engine_metrics_view())
        servicer = TeacherServicer(
            teachers,
            config.default_teacher,
            metrics,
            server_version(),
            max_stream_buffer_bytes=config.max_stream_buffer_bytes,
        )
        grpc_server, grpc_port, health = await _start_grpc(config, servicer)
    except BaseException:
        for scheduler in schedulers:
            await scheduler.close()
        for backend in backends:
            await backend.close()
        await http.stop()
        raise
    running = RunningServer(
        config=config,
        grpc_port=grpc_port,
        http_port=http.port,
        metrics=metrics,
        servicer=servicer,
        _grpc=grpc_server,
        _http=http,
        _health=health,
        _schedulers=schedulers,
        _backends=backends,
    )
    state["server"] = running
    metrics.ready.set(1)
    running.watch_health()
    return running


async def _start_grpc(
    config: ServerConfig, servicer: TeacherServicer
) -> tuple[grpc.aio.Server, int, HealthServicer]:
    """Binds the gRPC port with the scoring, health and reflection services."""
    token: str | TokenFile | None = config.auth_token
    if config.auth_token_file is not None:  # re-read on rotation
        token = TokenFile(config.auth_token_file, config.credentials_check_s)
    interceptors: list[grpc.aio.ServerInterceptor] = [BearerAuthInterceptor(token)] if token else []
    interceptors.append(SafeDecodeInterceptor())  # after auth: unparsable bytes -> INVALID_ARGUMENT
    options = [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
    ]
    if config.max_connection_age_s > 0:
        # GOAWAY to old connections: clients reconnect (and re-resolve), so replicas the
        # autoscaler adds get load; open streams keep the grace period to finish.
        options += [
            ("grpc.max_connection_age_ms", max(1, round(config.max_connection_age_s * 1000))),
            ("grpc.max_connection_age_grace_ms", round(config.max_connection_age_grace_s * 1000)),
        ]
    server = grpc.aio.server(interceptors=interceptors, options=options)
    add_to_server(servicer, server)  # raw request bytes: the servicer parses them
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        (
            SERVICE_NAME,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    address = (
        f"[{config.host}]:{config.grpc_port}"
        if ":" in config.host
        else (f"{config.host}:{config.grpc_port}")
    )
    if config.tls_cert is not None and config.tls_key is not None:
        creds = server_credentials(
            config.tls_cert, config.tls_key, config.tls_client_ca, config.credentials_check_s
        )
        port = server.add_secure_port(address, creds)
    else:
        port = server.add_insecure_port(address)
    await server.start()
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    await health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    return server, port, health


def sample_gpu_memory(metrics: Metrics, gpus: NvmlReader) -> None:
    """Sets the GPU memory gauges from NVML before each scrape (device-wide, so a vLLM
    engine's processes count); without a GPU the gauges stay absent."""
    for device in gpus.read():
        metrics.gpu_memory_used.labels(device.name).set(device.used_bytes)
        metrics.gpu_memory_total.labels(device.name).set(device.total_bytes)


# -- running on a background thread (synchronous tests, notebooks) ---------------------


class ThreadedServer:
    """A server on its own event loop in a daemon thread; see `serve_in_thread`."""

    def __init__(
        self,
        config: ServerConfig,
        backend_factory: Callable[[ServerConfig, int], Backend] = build_backend,
    ) -> None:
        self.config = config
        self._backend_factory = backend_factory
        self._loop = asyncio.new_event_loop()
        self._started: Future[RunningServer] = Future()
        self._thread = threading.Thread(target=self._run, name="teacher-server", daemon=True)
        self._thread.start()
        self.server = self._started.result()

    @property
    def grpc_port(self) -> int:
        return self.server.grpc_port

    @property
    def http_port(self) -> int:
        return self.server.http_port

    @property
    def metrics(self) -> Metrics:
        return self.server.metrics

    @property
    def address(self) -> str:
        """'127.0.0.1:PORT'-style target for a gRPC channel."""
        host = "127.0.0.1" if self.config.host in ("0.0.0.0", "") else self.config.host
        return f"{host}:{self.grpc_port}"

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._main())
        finally:
            self._loop.close()

    async def _main(self) -> None:
        try:
            running = await start_server(self.config, backend_factory=self._backend_factory)
        except BaseException as exc:
            self._started.set_exception(exc)
            return
        self._started.set_result(running)
        await running.wait_stopped()

    def begin_drain(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.begin_drain(), self._loop).result()

    def stop(self, grace_s: float = 0.0) -> None:
        """Drains with `grace_s` of grace, shuts down and joins the thread (idempotent)."""
        if self._thread.is_alive():
            stopping = asyncio.run_coroutine_threadsafe(
                self.server.drain_and_stop(grace_s), self._loop
            )
            stopping.result()
            self._thread.join()

    def __enter__(self) -> ThreadedServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve_in_thread(
    config: ServerConfig,
    backend_factory: Callable[[ServerConfig, int], Backend] = build_backend,
) -> ThreadedServer:
    """Starts a server on a background thread; returns once it is ready."""
    return ThreadedServer(config, backend_factory)


# -- the process entry point -----------------------------------------------------------


async def serve(config: ServerConfig) -> None:
    """Runs until SIGTERM/SIGINT, then drains for config.grace_seconds and returns."""
    running = await start_server(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # One parseable line: tests and scripts read the bound ports from it.
    log.info(
        "serving grpc_port=%d http_port=%d teachers=%s",
        running.grpc_port,
        running.http_port,
        ",".join(m.name for m in config.models),
    )
    try:
        await stop.wait()
        log.info("signal received; draining for up to %.1fs", config.grace_seconds)
    finally:
        await running.drain_and_stop(config.grace_seconds)


def main(argv: list[str] | None = None) -> int:
    """`hybrid-distill serve` and `python -m teacher_service.server`; returns the exit code."""
    config = parse_args(argv)
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    log.info("configuration: %s", config)
    asyncio.run(serve(config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
