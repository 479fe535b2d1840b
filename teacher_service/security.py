"""Transport security and caller authentication for the gRPC port, reloaded on rotation.

- TLS: `server_credentials` turns PEM files into gRPC server credentials; with a client
  CA the server requires and verifies client certificates (mutual TLS). The files are
  watched (`CertificateFiles`): when cert-manager renews them, the next TLS handshake
  after the check interval uses the new certificate, key and client CA (gRPC's dynamic
  certificate configuration); connections already open keep the session they have.
- Bearer tokens: `BearerAuthInterceptor` refuses every call that lacks the metadata
  `authorization: Bearer <token>` with UNAUTHENTICATED. Health checks and server
  reflection stay open so that probes and grpcurl work without the secret; they reveal
  nothing a client could not read from the proto. A token from a file (`TokenFile`) is
  re-read when the file changes: after a rotation the old token is refused.

A changed file is checked at most once per `check_interval_s`. A half-written update (a
certificate whose key does not match, an empty token file) is refused with one warning
and the previous material stays in use until a consistent one appears.
"""

from __future__ import annotations

import hmac
import logging
import os
import ssl
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc

from teacher_service.log_limit import RateLimitedLog

log = logging.getLogger(__name__)

# Method-name prefixes that need no token.
OPEN_SERVICES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)
# How often a watched file is looked at, at most. A Kubernetes Secret update reaches the
# pod's volume within about a minute, so seconds here add nothing noticeable.
DEFAULT_CHECK_INTERVAL_S = 5.0

Stamp = tuple[tuple[int, int, int], ...]


def _stamp(paths: tuple[Path, ...]) -> Stamp:
    """(inode, size, mtime_ns) of each file, links followed: a Secret volume swaps a
    symlink, which changes the inode even when the mtime is preserved."""
    stats = [os.stat(path) for path in paths]
    return tuple((s.st_ino, s.st_size, s.st_mtime_ns) for s in stats)


class _Watched:
    """Files whose content is reloaded when their stamp changes, checked at most once
    per interval. Subclasses turn the bytes into the material (`_load`)."""

    def __init__(
        self,
        paths: tuple[Path, ...],
        check_interval_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._paths = paths
        self._interval = check_interval_s
        self._clock = clock
        self._lock = threading.Lock()  # the TLS fetcher runs on gRPC's own threads
        self._checked = clock()
        self._stamp = _stamp(paths)
        self._refused: Stamp | None = None

    def _changed(self) -> tuple[bytes, ...] | None:
        """The files' bytes when they changed since the last accepted load, else None."""
        now = self._clock()
        with self._lock:
            if now - self._checked < self._interval:
                return None
            self._checked = now
            try:
                stamp = _stamp(self._paths)
                if stamp in (self._stamp, self._refused):
                    return None
                contents = tuple(path.read_bytes() for path in self._paths)
                if _stamp(self._paths) != stamp:  # written while we read: next time
                    return None
            except OSError as exc:
                log.warning("cannot reload %s: %s", ", ".join(map(str, self._paths)), exc)
                return None
            problem = self._invalid(contents)
            if problem is not None:
                self._refused = stamp
                log.warning("not reloading %s: %s", ", ".join(map(str, self._paths)), problem)
                return None
            self._stamp = stamp
            log.info("reloaded %s", ", ".join(map(str, self._paths)))
            return contents

    def _invalid(self, contents: tuple[bytes, ...]) -> str | None:
        """Why freshly read contents must not be used, or None when they are fine."""
        return None


class TokenFile(_Watched):
    """A bearer token read from a file and re-read when the file changes.

    Args:
        path: the token file; surrounding whitespace is dropped (mounted Secrets often
            end with a newline).
        check_interval_s: the file is looked at no more often than this.
    """

    def __init__(
        self,
        path: Path,
        check_interval_s: float = DEFAULT_CHECK_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__((path,), check_interval_s, clock)
        token = path.read_bytes().strip()
        if not token:
            raise ValueError(f"auth token file {path} is empty")
        self._token = token

    def _invalid(self, contents: tuple[bytes, ...]) -> str | None:
        return None if contents[0].strip() else "the token file is empty"

    def current(self) -> bytes:
        """The token now in force (reloaded first if the file changed)."""
        contents = self._changed()
        if contents is not None:
            self._token = contents[0].strip()
        return self._token


class CertificateFiles(_Watched):
    """The server certificate chain, its key and an optional client CA, as PEM files.

    `fetch` is gRPC's certificate-configuration fetcher: called on TLS handshakes, it
    returns a new configuration after a (valid) change and None otherwise.
    """

    def __init__(
        self,
        cert: Path,
        key: Path,
        client_ca: Path | None = None,
        check_interval_s: float = DEFAULT_CHECK_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        paths = (cert, key) if client_ca is None else (cert, key, client_ca)
        super().__init__(paths, check_interval_s, clock)
        contents = tuple(path.read_bytes() for path in paths)
        problem = self._invalid(contents)
        if problem is not None:
            raise ValueError(f"TLS files {', '.join(map(str, paths))}: {problem}")
        self.initial = self._configuration(contents)

    @staticmethod
    def _configuration(contents: tuple[bytes, ...]) -> Any:
        cert, key, *ca = contents
        return grpc.ssl_server_certificate_configuration(
            [(key, cert)], root_certificates=ca[0] if ca else None
        )

    def _invalid(self, contents: tuple[bytes, ...]) -> str | None:
        """Checks that the key matches the certificate and the CA parses (OpenSSL via
        the ssl module, which reads files only: a private temporary directory)."""
        cert, key, *ca = contents
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        with tempfile.TemporaryDirectory() as tmp:
            cert_path, key_path = Path(tmp) / "cert.pem", Path(tmp) / "key.pem"
            cert_path.write_bytes(cert)
            key_path.write_bytes(key)
            try:
                context.load_cert_chain(cert_path, key_path)
                if ca:
                    context.load_verify_locations(cadata=ca[0].decode("ascii"))
            except (ssl.SSLError, ValueError) as exc:
                return f"certificate, key or client CA unusable ({exc})"
        return None

    def fetch(self) -> Any:
        contents = self._changed()
        return None if contents is None else self._configuration(contents)


def server_credentials(
    cert: Path,
    key: Path,
    client_ca: Path | None = None,
    check_interval_s: float = DEFAULT_CHECK_INTERVAL_S,
) -> grpc.ServerCredentials:
    """TLS credentials from PEM files, reloaded when they change; `client_ca` turns on
    mutual TLS."""
    files = CertificateFiles(cert, key, client_ca, check_interval_s)
    return grpc.dynamic_ssl_server_credentials(
        files.initial, files.fetch, require_client_authentication=client_ca is not None
    )


def bearer_token(metadata: tuple[tuple[str, str | bytes], ...] | None) -> str | None:
    """The token in an `authorization: Bearer <token>` metadata entry, if any."""
    for key, value in metadata or ():
        if key.lower() == "authorization" and isinstance(value, str):
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer" and token:
                return token.strip()
    return None


class BearerAuthInterceptor(grpc.aio.ServerInterceptor):
    """Lets a call through only with the expected bearer token (open services excepted).

    Args:
        token: a fixed token, or a `TokenFile` whose current token is checked per call.
    """

    def __init__(self, token: str | TokenFile) -> None:
        self._tokens = token if isinstance(token, TokenFile) else None
        self._token = token.encode() if isinstance(token, str) else b""
        # Anyone who reaches the port can make refusals: one line a minute at most.
        self._refusals = RateLimitedLog(log)

    def _authorized(self, details: grpc.HandlerCallDetails) -> bool:
        if details.method.startswith(OPEN_SERVICES):
            return True
        expected = self._tokens.current() if self._tokens is not None else self._token
        token = bearer_token(details.invocation_metadata)
        # Constant-time comparison: the time to refuse says nothing about the token.
        return token is not None and hmac.compare_digest(token.encode(), expected)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or self._authorized(handler_call_details):
            return handler
        method = handler_call_details.method
        self._refusals.log(logging.INFO, "refused", "refused unauthenticated call to %s", method)
        return _refusing_handler(handler)


async def _refuse(_request: Any, context: grpc.aio.ServicerContext) -> None:
    await context.abort(
        grpc.StatusCode.UNAUTHENTICATED,
        "authorization: missing or invalid bearer token (send 'authorization: Bearer <token>')",
    )


def _refusing_handler(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that aborts with UNAUTHENTICATED."""
    codec = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(_refuse, **codec)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(_refuse, **codec)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(_refuse, **codec)
    return grpc.stream_stream_rpc_method_handler(_refuse, **codec)
