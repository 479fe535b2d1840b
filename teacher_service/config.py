"""The teacher server's configuration: one frozen dataclass built from CLI flags.

`parse_args(argv)` is the only place that reads the command line and the environment
(`HYBRID_DISTILL_AUTH_TOKEN`); everything below `server.main` receives a
`ServerConfig`. Tests build a `ServerConfig` directly.

    hybrid-distill serve --model [NAME=]DIR [--model ...] --grpc-port N --http-port M
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

AUTH_TOKEN_ENV = "HYBRID_DISTILL_AUTH_TOKEN"
BACKENDS = ("torch", "vllm")
WEIGHT_DTYPES = ("float32", "bfloat16", "float16")
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
MAX_CONNECTION_AGE_S = 2_000_000.0  # ~23 days; gRPC's option is int32 milliseconds


@dataclass(frozen=True)
class ModelSpec:
    """One hosted teacher: the name clients use and the model directory."""

    name: str
    path: Path

    @staticmethod
    def parse(text: str) -> ModelSpec:
        """'NAME=DIR' or 'DIR' (the name is then the directory's base name)."""
        name, sep, path = text.partition("=")
        if not sep:
            name, path = "", text
        if not path:
            raise ValueError(f"--model {text!r}: empty model directory")
        resolved = Path(path).expanduser()
        return ModelSpec(name=name or resolved.name, path=resolved)


@dataclass(frozen=True)
class ServerConfig:
    """Everything the server process needs; the first model is the default teacher.

    Scheduler knobs mirror `teacher_service.scheduler.SchedulerConfig` (one scheduler
    per teacher, all with the same knobs).
    """

    models: tuple[ModelSpec, ...]
    host: str = "0.0.0.0"
    grpc_port: int = 50051
    http_port: int = 8080
    backend: str = "torch"
    device: str = "cpu"
    dtype: str = "float32"
    max_top_k: int = 64
    max_query_ids: int = 256
    max_sequence_length: int | None = None
    # torch intra-op threads for this process (None: torch's default, one per core).
    torch_threads: int | None = None
    # Scheduler.
    max_batch_tokens: int = 16384
    max_batch_size: int = 256
    max_wait_s: float = 0.002
    max_queued_tokens: int = 2_000_000
    max_client_queued_tokens: int = 500_000
    # vLLM backend only.
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    # Transport and lifecycle.
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    # Bytes one ScoreStream may hold (requests read, answers unsent); past it the
    # server stops reading that stream until the client reads (flow control).
    max_stream_buffer_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    grace_seconds: float = 30.0
    # gRPC sends GOAWAY to a connection this old (+-10% jitter, gRPC's), so that clients
    # reconnect and re-resolve: replicas added by an autoscaler then get load. Streams
    # still open on it get the grace period, then are cut. 0 = connections live forever.
    max_connection_age_s: float = 300.0
    max_connection_age_grace_s: float = 60.0
    # Security: TLS when cert and key are set; mutual TLS when client_ca is also set.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    auth_token: str | None = field(default=None, repr=False)  # never logged
    # The token's file: re-read when it changes (rotation without restart); auth_token
    # holds what it said at start. TLS files are watched alike; both at most this often.
    auth_token_file: Path | None = None
    credentials_check_s: float = 5.0
    # Liveness and readiness fail after this many batches in a row failed in a backend.
    max_failed_batches: int = 3
    max_client_labels: int = 64
    log_level: str = "INFO"

    def __post_init__(self) -> None:
        if not self.models:
            raise ValueError("at least one --model is required")
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError(f"--model names must be unique, got {names}")
        if self.backend not in BACKENDS:
            raise ValueError(f"--backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.dtype not in WEIGHT_DTYPES:
            raise ValueError(f"--dtype must be one of {WEIGHT_DTYPES}, got {self.dtype!r}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key must be given together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("--tls-client-ca needs --tls-cert and --tls-key")
        if self.auth_token is not None and not self.auth_token:
            raise ValueError("the auth token must not be empty")
        positive = {
            "--max-top-k": self.max_top_k,
            "--max-query-ids": self.max_query_ids,
            "--max-batch-tokens": self.max_batch_tokens,
            "--max-batch-size": self.max_batch_size,
            "--max-queued-tokens": self.max_queued_tokens,
            "--max-client-queued-tokens": self.max_client_queued_tokens,
            "--max-message-bytes": self.max_message_bytes,
            "--max-stream-buffer-bytes": self.max_stream_buffer_bytes,
            "--max-client-labels": self.max_client_labels,
            "--tensor-parallel-size": self.tensor_parallel_size,
            "--max-failed-batches": self.max_failed_batches,
        }
        for flag, value in positive.items():
            if value < 1:
                raise ValueError(f"{flag} must be >= 1, got {value}")
        if self.max_sequence_length is not None and self.max_sequence_length < 2:
            raise ValueError(f"--max-sequence-length must be >= 2, got {self.max_sequence_length}")
        if self.torch_threads is not None and self.torch_threads < 1:
            raise ValueError(f"--torch-threads must be >= 1, got {self.torch_threads}")
        if self.max_wait_s < 0 or self.grace_seconds < 0:
            raise ValueError("--max-wait-ms and --grace-seconds must be >= 0")
        if not self.credentials_check_s > 0:
            raise ValueError(
                f"--credentials-check-seconds must be > 0, got {self.credentials_check_s}"
            )
        ages = {
            "--max-connection-age-seconds": self.max_connection_age_s,
            "--max-connection-age-grace-seconds": self.max_connection_age_grace_s,
        }
        for flag, seconds in ages.items():
            # gRPC takes int32 milliseconds; NaN fails both comparisons.
            if not 0 <= seconds <= MAX_CONNECTION_AGE_S:
                raise ValueError(f"{flag} must be in [0, {MAX_CONNECTION_AGE_S}], got {seconds}")
        for flag, port in (("--grpc-port", self.grpc_port), ("--http-port", self.http_port)):
            if not 0 <= port <= 65535:
                raise ValueError(f"{flag} must be in [0, 65535], got {port}")

    @property
    def default_teacher(self) -> str:
        return self.models[0].name


def build_parser() -> argparse.ArgumentParser:
    """The `serve` command's flags (also used by `python -m teacher_service.server`)."""
    d = ServerConfig(models=(ModelSpec("x", Path(".")),))  # defaults, for --help
    p = argparse.ArgumentParser(
        prog="hybrid-distill serve",
        description="Serve teacher top-K log-probs over gRPC, with an HTTP health/metrics port.",
    )
    p.add_argument(
        "--model",
        action="append",
        required=True,
        metavar="[NAME=]DIR",
        help="teacher model directory; repeat to host several (the first is the default)",
    )
    p.add_argument("--host", default=d.host, help="bind address for both ports")
    p.add_argument("--grpc-port", type=int, default=d.grpc_port, help="0 picks a free port")
    p.add_argument("--http-port", type=int, default=d.http_port, help="0 picks a free port")
    p.add_argument("--backend", choices=BACKENDS, default=d.backend)
    p.add_argument("--device", default=d.device, help="cpu, cuda or cuda:N (torch backend)")
    p.add_argument("--dtype", choices=WEIGHT_DTYPES, default=d.dtype, help="weight dtype")
    p.add_argument("--max-top-k", type=int, default=d.max_top_k)
    p.add_argument("--max-query-ids", type=int, default=d.max_query_ids)
    p.add_argument(
        "--max-sequence-length", type=int, default=None, help="default: the model's limit"
    )
    p.add_argument(
        "--torch-threads",
        type=int,
        default=None,
        help="torch intra-op threads (CPU); default: one per core",
    )
    p.add_argument("--max-batch-tokens", type=int, default=d.max_batch_tokens)
    p.add_argument("--max-batch-size", type=int, default=d.max_batch_size)
    p.add_argument("--max-wait-ms", type=float, default=d.max_wait_s * 1000)
    p.add_argument("--max-queued-tokens", type=int, default=d.max_queued_tokens)
    p.add_argument("--max-client-queued-tokens", type=int, default=d.max_client_queued_tokens)
    p.add_argument("--tensor-parallel-size", type=int, default=d.tensor_parallel_size)
    p.add_argument("--gpu-memory-utilization", type=float, default=d.gpu_memory_utilization)
    p.add_argument("--max-message-bytes", type=int, default=d.max_message_bytes)
    p.add_argument(
        "--max-stream-buffer-bytes",
        type=int,
        default=d.max_stream_buffer_bytes,
        help="bytes one ScoreStream may hold before the server stops reading it",
    )
    p.add_argument("--grace-seconds", type=float, default=d.grace_seconds)
    p.add_argument(
        "--max-connection-age-seconds",
        type=float,
        default=d.max_connection_age_s,
        help="GOAWAY to connections this old so clients re-resolve and rebalance; 0 = never",
    )
    p.add_argument(
        "--max-connection-age-grace-seconds",
        type=float,
        default=d.max_connection_age_grace_s,
        help="how long streams on an aged connection may finish before they are cut",
    )
    p.add_argument("--tls-cert", type=Path, default=None, help="PEM server certificate chain")
    p.add_argument("--tls-key", type=Path, default=None, help="PEM server private key")
    p.add_argument(
        "--tls-client-ca", type=Path, default=None, help="PEM CA; clients must present a cert"
    )
    p.add_argument(
        "--auth-token-file",
        type=Path,
        default=None,
        help=f"file holding the bearer token clients must send (else ${AUTH_TOKEN_ENV})",
    )
    p.add_argument(
        "--credentials-check-seconds",
        type=float,
        default=d.credentials_check_s,
        help="how often the TLS files and the token file are checked for a rotation",
    )
    p.add_argument(
        "--max-failed-batches",
        type=int,
        default=d.max_failed_batches,
        help="failed backend batches in a row after which liveness and readiness fail",
    )
    p.add_argument("--max-client-labels", type=int, default=d.max_client_labels)
    p.add_argument("--log-level", default=d.log_level)
    return p


def parse_args(
    argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None
) -> ServerConfig:
    """A ServerConfig from command-line flags and the environment.

    The auth token comes from --auth-token-file when given, else from the
    HYBRID_DISTILL_AUTH_TOKEN environment variable; surrounding whitespace is dropped.
    Invalid combinations exit through argparse with a message naming the flag.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    environ = os.environ if env is None else env
    token: str | None = None
    if args.auth_token_file is not None:
        try:
            token = args.auth_token_file.read_text().strip()
        except OSError as exc:
            parser.error(f"--auth-token-file: {exc}")
    elif environ.get(AUTH_TOKEN_ENV):
        token = environ[AUTH_TOKEN_ENV].strip()
    try:
        return ServerConfig(
            models=tuple(ModelSpec.parse(m) for m in args.model),
            host=args.host,
            grpc_port=args.grpc_port,
            http_port=args.http_port,
            backend=args.backend,
            device=args.device,
            dtype=args.dtype,
            max_top_k=args.max_top_k,
            max_query_ids=args.max_query_ids,
            max_sequence_length=args.max_sequence_length,
            torch_threads=args.torch_threads,
            max_batch_tokens=args.max_batch_tokens,
            max_batch_size=args.max_batch_size,
            max_wait_s=args.max_wait_ms / 1000,
            max_queued_tokens=args.max_queued_tokens,
            max_client_queued_tokens=args.max_client_queued_tokens,
            tensor_parallel_size=args.tensor_parallel_size,
            gpu_memory_utilization=args.gpu_memory_utilization,
            max_message_bytes=args.max_message_bytes,
            max_stream_buffer_bytes=args.max_stream_buffer_bytes,
            grace_seconds=args.grace_seconds,
            max_connection_age_s=args.max_connection_age_seconds,
            max_connection_age_grace_s=args.max_connection_age_grace_seconds,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            tls_client_ca=args.tls_client_ca,
            auth_token=token,
            auth_token_file=args.auth_token_file,
            credentials_check_s=args.credentials_check_seconds,
            max_failed_batches=args.max_failed_batches,
            max_client_labels=args.max_client_labels,
            log_level=args.log_level,
        )
    except ValueError as exc:
        parser.error(str(exc))
