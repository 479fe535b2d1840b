"""Plain data of the teacher client: its config, what it sends, what it returns.

Shapes: L = sequence length (prompt + response), R = L - start response rows,
K = top-K width, Q = query ids per row. Row r of every result array describes the
token ids[start + r], i.e. the teacher's distribution at position start + r - 1.

Imports nothing from the server side (no backend, no scheduler): a trainer installs
the client without the teacher's model stack.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from trainer.client.resolve import Resolver, getaddrinfo_resolver, parse_dns_target

LOGPROB_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class TlsOptions:
    """TLS for the gRPC channels.

    Attributes:
        ca_cert: PEM root certificates that sign the server's certificate; None uses
            the system roots.
        client_cert, client_key: PEM client certificate chain and key for mutual TLS
            (both or neither).
        server_name: name to verify the server's certificate against when it differs
            from the host in the endpoint (e.g. connecting by IP).
    """

    ca_cert: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError("TlsOptions: client_cert and client_key must be given together")


@dataclass(frozen=True)
class ClientConfig:
    """Everything the teacher client needs; built once by the trainer.

    Attributes:
        endpoints: replica addresses, "host:port" or any gRPC target. A
            "dns:///name:port" endpoint (e.g. a headless Service) is resolved by the
            client into one endpoint per address, again every `resolve_interval_s`.
            Requests are balanced across endpoints (least tokens in flight) and fail
            over between them. Each endpoint is one HTTP/2 connection carrying one
            ScoreStream.
        teacher: hosted teacher name; "" means the server's default teacher.
        client_id: sent as metadata `x-client-id` (the server's fairness key and metric
            label); None lets the server use the peer address.
        token: bearer token, sent as `authorization: Bearer <token>`.
        tls: TLS options; None means plaintext.
        deadline_s: per request, across all its attempts; past it the request raises
            TeacherDeadlineError.
        max_retries: extra attempts after the first on UNAVAILABLE, RESOURCE_EXHAUSTED,
            DEADLINE_EXCEEDED or a lost connection.
        backoff_base_s, backoff_max_s: retry delay is uniform(0, min(max, base * 2**n))
            ("full jitter"), and never shorter than a server's retry-after hint.
        max_in_flight: requests outstanding per endpoint; more wait in the client.
        keepalive_s: HTTP/2 keepalive ping interval to detect dead peers on idle
            connections; None disables it (the server must permit the interval, else it
            closes the connection with too_many_pings).
        max_message_bytes: largest gRPC message sent or received.
        resolver: host -> its addresses, for dns:/// endpoints; the default asks the
            system resolver (getaddrinfo: every A and AAAA record).
        resolve_interval_s: how often dns:/// endpoints are resolved again: new
            addresses get connections (and load), vanished ones are retired once their
            requests are answered.
    """

    endpoints: tuple[str, ...]
    teacher: str = ""
    client_id: str | None = None
    token: str | None = None
    tls: TlsOptions | None = None
    deadline_s: float = 60.0
    max_retries: int = 6
    backoff_base_s: float = 0.05
    backoff_max_s: float = 2.0
    max_in_flight: int = 256
    keepalive_s: float | None = None
    max_message_bytes: int = 256 * 1024 * 1024
    resolver: Resolver = getaddrinfo_resolver
    resolve_interval_s: float = 10.0

    def __post_init__(self) -> None:
        if isinstance(self.endpoints, str):
            raise TypeError("ClientConfig.endpoints must be a tuple of strings, not a string")
        if not self.endpoints:
            raise ValueError("ClientConfig.endpoints must name at least one endpoint")
        if len(set(self.endpoints)) != len(self.endpoints):
            raise ValueError(f"ClientConfig.endpoints has duplicates: {list(self.endpoints)}")
        if not self.deadline_s > 0:
            raise ValueError(f"ClientConfig.deadline_s must be > 0, got {self.deadline_s}")
        if self.max_retries < 0:
            raise ValueError(f"ClientConfig.max_retries must be >= 0, got {self.max_retries}")
        if self.backoff_base_s < 0 or self.backoff_max_s < self.backoff_base_s:
            raise ValueError(
                "ClientConfig: need 0 <= backoff_base_s <= backoff_max_s, got "
                f"{self.backoff_base_s} and {self.backoff_max_s}"
            )
        if self.max_in_flight < 1:
            raise ValueError(f"ClientConfig.max_in_flight must be >= 1, got {self.max_in_flight}")
        if self.keepalive_s is not None and not self.keepalive_s > 0:
            raise ValueError(f"ClientConfig.keepalive_s must be > 0, got {self.keepalive_s}")
        if self.token is not None and not self.token:
            raise ValueError("ClientConfig.token must not be empty (use None for no token)")
        for endpoint in self.endpoints:
            parse_dns_target(endpoint)  # raises ValueError naming a malformed dns: target
        if not (math.isfinite(self.resolve_interval_s) and self.resolve_interval_s > 0):
            raise ValueError(
                f"ClientConfig.resolve_interval_s must be finite and > 0, got "
                f"{self.resolve_interval_s}"
            )


@dataclass(frozen=True)
class ScoreSpec:
    """One sequence to score.

    Attributes:
        token_ids: integer [L] prompt followed by response (any device; sent as int32).
        start: index of the first response token, 1 <= start <= L - 1.
        top_k: teacher top-K width K.
        query_ids: integer [R, Q] ids whose teacher log-probs are wanted per row (e.g.
            the student's own top-K), or None.
        temperature: teacher log-probs are log_softmax(logits / temperature).
        logprob_dtype: wire dtype of the log-probs (float32, float16 or bfloat16); the
            client always returns float32 tensors.
        request_id: idempotency key; None draws a fresh one. Retries reuse it.
    """

    token_ids: torch.Tensor
    start: int
    top_k: int
    query_ids: torch.Tensor | None = None
    temperature: float = 1.0
    logprob_dtype: torch.dtype = torch.float32
    request_id: str | None = None

    def validate(self) -> None:
        """Raises ValueError naming the field when the spec cannot be a valid request."""
        ids = self.token_ids
        if ids.dim() != 1 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise ValueError(
                f"token_ids: expected an integer [L] tensor, got {ids.dtype} {list(ids.shape)}"
            )
        length = int(ids.shape[0])
        if not 1 <= self.start <= length - 1:
            raise ValueError(f"start: must be in [1, L - 1] = [1, {length - 1}], got {self.start}")
        if self.top_k < 1:
            raise ValueError(f"top_k: must be >= 1, got {self.top_k}")
        if self.query_ids is not None:
            q = self.query_ids
            rows = length - self.start
            if q.dim() != 2 or q.shape[0] != rows or q.shape[1] < 1 or q.dtype.is_floating_point:
                raise ValueError(
                    f"query_ids: expected an integer [R={rows}, Q>=1] tensor, got "
                    f"{q.dtype} {list(q.shape)}"
                )
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature: must be finite and > 0, got {self.temperature}")
        if self.logprob_dtype not in LOGPROB_DTYPES:
            raise ValueError(
                f"logprob_dtype: must be one of {LOGPROB_DTYPES}, got {self.logprob_dtype}"
            )


@dataclass(frozen=True)
class TeacherScores:
    """The teacher's scores of one sequence; row r is about token ids[start + r].

    Attributes:
        topk_ids: int64 [R, K] teacher top-K ids, highest log-prob first.
        topk_logprobs: float32 [R, K] their log-probs.
        token_logprobs: float32 [R] log-prob of the token that actually followed.
        query_logprobs: float32 [R, Q] log-probs at the spec's query ids, or None.
        leftover_logmass: float32 [R] log of the mass outside the top-K (-inf when the
            top-K covers the vocabulary).
        request_id: the idempotency key the result answers.
        endpoint: the replica that produced it.
    """

    topk_ids: torch.Tensor
    topk_logprobs: torch.Tensor
    token_logprobs: torch.Tensor
    query_logprobs: torch.Tensor | None
    leftover_logmass: torch.Tensor
    request_id: str = ""
    endpoint: str = ""


@dataclass(frozen=True)
class TeacherInfo:
    """The teacher a client is connected to, as its endpoints' `Info` describes it."""

    name: str
    model_name: str
    revision: str
    vocab_size: int
    tokenizer_fingerprint: str
    max_top_k: int
    max_sequence_length: int
    backend: str
    logprob_dtypes: tuple[torch.dtype, ...]
    supports_query_ids: bool
    max_query_ids: int
    server_version: str = ""
    endpoint: str = ""
