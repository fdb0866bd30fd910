"""Server interceptor that maps exceptions to gRPC statuses — the only place that does.

* :class:`~diffmesh.errors.DiffmeshError` → its own code, message and trailing metadata.
* :class:`grpc.aio.AioRpcError` raised by a downstream call → the same code, details and
  error trailers (through :func:`~diffmesh.errors.from_rpc_error`), so a worker's
  INVALID_ARGUMENT reaches the router's client unchanged.
* :class:`TimeoutError` → DEADLINE_EXCEEDED.
* anything else → INTERNAL with a short message (the traceback goes to the log only).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from grpc import aio

from diffmesh.errors import DeadlineExceeded, DiffmeshError, Internal, from_rpc_error

log = logging.getLogger(__name__)


def _as_error(method: str, exc: Exception) -> DiffmeshError:
    """The :class:`DiffmeshError` a handler's exception becomes (logged here)."""
    if isinstance(exc, DiffmeshError):
        log.info("rpc failed", extra={"method": method, "code": exc.code.name, "detail": exc.message})
        return exc
    if isinstance(exc, aio.AioRpcError):
        err = from_rpc_error(exc)
        log.info("downstream rpc failed", extra={"method": method, "code": err.code.name, "detail": err.message})
        return err
    if isinstance(exc, TimeoutError):
        return DeadlineExceeded(f"{method}: deadline exceeded")
    log.exception("unhandled error", exc_info=exc, extra={"method": method})
    return Internal(f"internal error in {method}: {type(exc).__name__}")


async def _abort(context: aio.ServicerContext, method: str, exc: Exception) -> None:
    err = _as_error(method, exc)
    md = err.trailing_metadata()
    if md:
        context.set_trailing_metadata(md)
    await context.abort(err.code, err.message)


# Only Exception is mapped: CancelledError (the client went away), GeneratorExit (a stream
# closed) and the interpreter's own exits are BaseException and pass through untouched.
def _passes_through(exc: Exception) -> bool:
    # AbortError: the handler aborted on its own.
    return isinstance(exc, aio.AbortError)


def _wrap_unary(method: str, behavior: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    async def wrapper(request: Any, context: aio.ServicerContext) -> Any:
        try:
            return await behavior(request, context)
        except Exception as exc:
            if _passes_through(exc):
                raise
            await _abort(context, method, exc)

    return wrapper


def _wrap_stream(method: str, behavior: Callable[..., AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
    async def wrapper(request: Any, context: aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            async for item in behavior(request, context):
                yield item
        except Exception as exc:
            if _passes_through(exc):
                raise
            await _abort(context, method, exc)

    return wrapper


class ErrorInterceptor(aio.ServerInterceptor):
    """Maps handler exceptions to gRPC statuses for unary-unary and unary-stream RPCs."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _wrap_unary(method, handler.unary_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                _wrap_stream(method, handler.unary_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler
