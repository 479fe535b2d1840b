"""Every Prometheus metric the teacher service exports, in one place.

Names follow Prometheus conventions (base units, `_seconds`, `_total`). Label values are
bounded: `teacher` by the hosted models, `method`/`code` by the proto and gRPC, and
`client` by `ClientLabeler`, which names at most `max_clients` distinct clients and
folds the rest into "other". The deploy rules and dashboard in deploy/monitoring use
these names; tests/deploy checks that every name they reference is defined here.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Buckets sized for scoring: a CPU test model takes milliseconds, a 70B teacher on long
# contexts takes seconds. The top buckets reach past the trainers' request deadline
# (trainer TeacherConfig.deadline_s, 60 s), so a p99 near the deadline is measured, not
# clipped at the last finite bucket (tests/deploy/test_metric_names.py checks this).
LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120,
)  # fmt: skip
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
BATCH_TOKEN_BUCKETS = (64, 256, 1024, 4096, 16384, 65536, 262144, 1048576)

OTHER_CLIENT = "other"


class ClientLabeler:
    """Maps client ids to at most `max_clients` label values; the rest become "other".

    A named client that has been quiet for `idle_s` seconds gives its slot to the next
    new client (its series is removed through `on_evict`), so a long-running teacher
    that sees many short trainer jobs keeps naming the ones that are active now.
    """

    def __init__(
        self,
        max_clients: int,
        idle_s: float = 900.0,
        on_evict: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._max = max_clients
        self._idle_s = idle_s
        self._on_evict = on_evict
        self._clock = clock
        self._last_seen: dict[str, float] = {}  # insertion order = least recently seen first
        self._lock = threading.Lock()

    def __call__(self, client_id: str) -> str:
        with self._lock:
            now = self._clock()
            if client_id in self._last_seen:
                del self._last_seen[client_id]  # re-insert: most recently seen goes last
                self._last_seen[client_id] = now
                return client_id
            if len(self._last_seen) >= self._max:
                oldest, seen = next(iter(self._last_seen.items()), (None, now))
                if oldest is None or now - seen < self._idle_s:
                    return OTHER_CLIENT
                del self._last_seen[oldest]
                if self._on_evict is not None:
                    self._on_evict(oldest)
            self._last_seen[client_id] = now
            return client_id


class Metrics:
    """The service's metrics, registered on their own registry (tests build several)."""

    def __init__(self, registry: CollectorRegistry | None = None, max_clients: int = 64) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "teacher_service_requests_total",
            "Scoring requests finished, by RPC method and gRPC status code.",
            ["method", "code"],
            registry=r,
        )
        self.request_latency = Histogram(
            "teacher_service_request_latency_seconds",
            "Time from a request's arrival to its response, by RPC method.",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tokens_scored = Counter(
            "teacher_service_tokens_scored_total",
            "Response tokens (rows) scored.",
            ["teacher"],
            registry=r,
        )
        self.client_tokens = Counter(
            "teacher_service_client_tokens_total",
            "Response tokens scored per client (at most max_clients names, then 'other').",
            ["client"],
            registry=r,
        )
        self.client_label = ClientLabeler(max_clients, on_evict=self._forget_client)
        self.batch_size = Histogram(
            "teacher_service_batch_size",
            "Sequences per backend batch.",
            ["teacher"],
            buckets=BATCH_SIZE_BUCKETS,
            registry=r,
        )
        self.batch_tokens = Histogram(
            "teacher_service_batch_tokens",
            "Tokens (prompt + response) per backend batch.",
            ["teacher"],
            buckets=BATCH_TOKEN_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "teacher_service_queue_depth",
            "Sequences waiting for a batch.",
            ["teacher"],
            registry=r,
        )
        self.queued_tokens = Gauge(
            "teacher_service_queued_tokens",
            "Tokens waiting for a batch.",
            ["teacher"],
            registry=r,
        )
        self.queue_wait = Histogram(
            "teacher_service_queue_wait_seconds",
            "Time a sequence waited in the queue before its batch started.",
            ["teacher"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.compute = Histogram(
            "teacher_service_compute_seconds",
            "Backend time per batch.",
            ["teacher"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.rejected = Counter(
            "teacher_service_rejected_total",
            "Sequences refused or dropped before scoring, by reason "
            "(queue_full, client_queue_full, deadline, cancelled, draining).",
            ["teacher", "reason"],
            registry=r,
        )
        self.inflight_streams = Gauge(
            "teacher_service_inflight_streams",
            "Open ScoreStream calls.",
            registry=r,
        )
        self.stream_buffered_bytes = Gauge(
            "teacher_service_stream_buffered_bytes",
            "Bytes held for open ScoreStreams: requests read and answers not yet sent "
            "(each stream is bounded by --max-stream-buffer-bytes).",
            registry=r,
        )
        self.streams_paused = Gauge(
            "teacher_service_streams_paused",
            "ScoreStreams whose buffer is full: their requests are not read until the "
            "client reads answers.",
            registry=r,
        )
        self.ready = Gauge(
            "teacher_service_ready",
            "1 when every teacher is loaded and the server is not draining.",
            registry=r,
        )
        self.teacher_info = Gauge(
            "teacher_service_teacher_info",
            "Constant 1, labelled with each hosted teacher's model and backend.",
            ["teacher", "model", "revision", "backend"],
            registry=r,
        )
        self.gpu_memory_used = Gauge(
            "teacher_service_gpu_memory_used_bytes",
            "GPU memory in use on each visible device, by every process (NVML: the vLLM "
            "engine's processes included); absent without a GPU.",
            ["device"],
            registry=r,
        )
        self.gpu_memory_total = Gauge(
            "teacher_service_gpu_memory_total_bytes",
            "Total memory of each visible GPU (NVML); absent without a GPU.",
            ["device"],
            registry=r,
        )

    def _forget_client(self, client: str) -> None:
        """Drops an evicted client's series (absent if it never got a token counted)."""
        with contextlib.suppress(KeyError):
            self.client_tokens.remove(client)
