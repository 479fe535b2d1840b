"""Unparsable request bytes on any gRPC method become INVALID_ARGUMENT, not a traceback.

gRPC turns an exception in a method's request deserializer into UNKNOWN and logs a
traceback per call. The TeacherService methods take raw bytes and parse them in the
servicer (servicer.py); this interceptor gives every other method (grpc.health.v1 and
server reflection, which stay open without a token) the same treatment: the
deserializer cannot raise, a request that does not parse is refused with
INVALID_ARGUMENT naming the message type, and the refusals are logged at most once a
minute. On a client-streaming method the call ends at the bad frame (the handler is
not ours to keep going).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from teacher_service.errors import truncate
from teacher_service.log_limit import RateLimitedLog

log = logging.getLogger(__name__)


class _Unparsable:
    """What the safe deserializer returns for bytes it could not parse."""

    def __init__(self, size: int, error: Exception) -> None:
        self.message = f"request: {size} bytes do not parse ({truncate(str(error), 160)})"


class SafeDecodeInterceptor(grpc.aio.ServerInterceptor):
    """Wraps every handler that has a request deserializer (see the module docstring)."""

    def __init__(self) -> None:
        self._limited = RateLimitedLog(log)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        return self._wrap(handler, handler_call_details.method)

    def _wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        parse = handler.request_deserializer

        def safe(data: bytes) -> Any:
            try:
                return parse(data)
            except Exception as exc:  # any parser's failure: the bytes are the caller's
                return _Unparsable(len(data), exc)

        async def refuse(bad: _Unparsable, context: grpc.aio.ServicerContext) -> None:
            self._limited.warning("unparsable", "%s refused: %s", method, bad.message)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, bad.message)

        async def checked(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext):
            async for request in requests:
                if isinstance(request, _Unparsable):
                    await refuse(request, context)
                yield request

        codec = {"request_deserializer": safe, "response_serializer": handler.response_serializer}
        if handler.unary_unary is not None:
            inner_uu = handler.unary_unary

            async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                if isinstance(request, _Unparsable):
                    await refuse(request, context)
                return await inner_uu(request, context)

            return grpc.unary_unary_rpc_method_handler(unary_unary, **codec)
        if handler.unary_stream is not None:
            inner_us = handler.unary_stream

            async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> None:
                if isinstance(request, _Unparsable):
                    await refuse(request, context)
                await _respond(inner_us(request, context), context)

            return grpc.unary_stream_rpc_method_handler(unary_stream, **codec)
        if handler.stream_unary is not None:
            inner_su = handler.stream_unary

            async def stream_unary(requests: AsyncIterator[Any], context: Any) -> Any:
                return await inner_su(checked(requests, context), context)

            return grpc.stream_unary_rpc_method_handler(stream_unary, **codec)
        inner_ss = handler.stream_stream

        async def stream_stream(requests: AsyncIterator[Any], context: Any) -> None:
            await _respond(inner_ss(checked(requests, context), context), context)

        return grpc.stream_stream_rpc_method_handler(stream_stream, **codec)


async def _respond(result: Any, context: grpc.aio.ServicerContext) -> None:
    """Runs a streaming handler of either style: an async generator (its items are
    written here) or a coroutine that writes with context.write itself."""
    if inspect.isasyncgen(result):
        async for response in result:
            await context.write(response)
    elif inspect.isawaitable(result):
        await result
