"""Transport security and caller authentication for the gRPC port.

- TLS: `server_credentials` turns PEM files into gRPC server credentials; with a client
  CA the server requires and verifies client certificates (mutual TLS).
- Bearer tokens: `BearerAuthInterceptor` refuses every call that lacks the metadata
  `authorization: Bearer <token>` with UNAUTHENTICATED. Health checks and server
  reflection stay open so that probes and grpcurl work without the secret; they reveal
  nothing a client could not read from the proto.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc

log = logging.getLogger(__name__)

# Method-name prefixes that need no token.
OPEN_SERVICES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)


def server_credentials(
    cert: Path, key: Path, client_ca: Path | None = None
) -> grpc.ServerCredentials:
    """TLS credentials from PEM files; `client_ca` turns on mutual TLS."""
    pair = [(key.read_bytes(), cert.read_bytes())]
    if client_ca is None:
        return grpc.ssl_server_credentials(pair)
    return grpc.ssl_server_credentials(
        pair, root_certificates=client_ca.read_bytes(), require_client_auth=True
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
    """Lets a call through only with the expected bearer token (open services excepted)."""

    def __init__(self, token: str) -> None:
        self._token = token.encode()

    def _authorized(self, details: grpc.HandlerCallDetails) -> bool:
        if details.method.startswith(OPEN_SERVICES):
            return True
        token = bearer_token(details.invocation_metadata)
        # Constant-time comparison: the time to refuse says nothing about the token.
        return token is not None and hmac.compare_digest(token.encode(), self._token)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or self._authorized(handler_call_details):
            return handler
        log.info("refused unauthenticated call to %s", handler_call_details.method)
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
