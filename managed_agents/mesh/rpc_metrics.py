"""RPCs served, by method and status code: a server interceptor recording into a server's `ServiceMetrics`.

`MeshServer` installs it only when metrics are on, so a server without metrics pays nothing per call (with
them, one wrapper coroutine per call). It is the outermost interceptor, so calls the mesh-secret check refuses
are counted too, as UNAUTHENTICATED. Methods the server does not serve are not counted: their names come from
the caller, and a label per made-up name would let anyone grow the metric without bound.

    rpc.server.calls           counter    {rpc.service, rpc.method, rpc.grpc.status_code} (OK, NOT_FOUND, ...)
    rpc.server.call.duration   histogram  {rpc.service, rpc.method}, seconds; a stream counts until it ends
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from managed_agents.mesh.metrics import ServiceMetrics


def _code(context: grpc.aio.ServicerContext[Any, Any], failure: BaseException | None) -> str:
    """The status a finished call ended with: the code set on the context (abort sets it), else OK, or
    CANCELLED/UNKNOWN for a call that ended in an exception without one."""
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return str(code.name)
    if failure is None:
        return "OK"
    # A stream the client left ends in GeneratorExit or CancelledError, with no code set.
    return "CANCELLED" if isinstance(failure, asyncio.CancelledError | GeneratorExit) else "UNKNOWN"


class RpcMetrics(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # grpc.aio ships no types
    """Counts and times every call of the methods a server serves."""

    def __init__(self, metrics: ServiceMetrics) -> None:
        self._calls = metrics.counter("rpc.server.calls", "RPCs served, by method and status code")
        self._duration = metrics.latency(
            "rpc.server.call.duration", "time from a call's start to its status (a stream: until it ends)"
        )

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        service, _, method = (handler_call_details.method or "").lstrip("/").rpartition("/")
        where = {"rpc.service": service, "rpc.method": method}
        if handler.response_streaming:
            kind = "stream_stream" if handler.request_streaming else "unary_stream"
            return handler._replace(**{kind: self._streaming(getattr(handler, kind), where)})
        kind = "stream_unary" if handler.request_streaming else "unary_unary"
        return handler._replace(**{kind: self._unary(getattr(handler, kind), where)})

    def _record(self, where: dict[str, str], code: str, started: float) -> None:
        self._duration.record(time.perf_counter() - started, where)
        self._calls.add(1, {**where, "rpc.grpc.status_code": code})

    def _unary(self, behavior: Any, where: dict[str, str]) -> Any:
        async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            started, failure = time.perf_counter(), None
            try:
                return await behavior(request, context)
            except BaseException as error:
                failure = error
                raise
            finally:
                self._record(where, _code(context, failure), started)

        return unary

    def _streaming(self, behavior: Any, where: dict[str, str]) -> Any:
        async def streaming(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            started, failure = time.perf_counter(), None
            try:
                async for item in behavior(request, context):
                    yield item
            except BaseException as error:
                failure = error
                raise
            finally:
                self._record(where, _code(context, failure), started)

        return streaming
