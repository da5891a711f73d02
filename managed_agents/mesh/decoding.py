"""Requests that cannot be decoded get INVALID_ARGUMENT with a sentence, not grpcio's UNKNOWN.

grpcio decodes a request with the method handler's `request_deserializer` (the generated `Message.FromString`)
before any servicer code runs; when that raises (corrupt or truncated protobuf, invalid UTF-8 in a string
field, messages nested deeper than protobuf's decoder allows, which a `google.protobuf.Struct` reaches at about
33 levels of JSON), the server answers UNKNOWN "Unexpected <class 'DecodeError'>", and nothing of the mesh sees
the call. So `MeshServer` registers every service (its own, health checking and reflection) through a
`GuardedRegistry`, which replaces each method handler once, at registration:

- its deserializer returns an `Undecodable` value instead of raising;
- its behaviour answers a call whose request is `Undecodable` with INVALID_ARGUMENT (`UndecodableRequest`),
  before any servicer code runs; in a client or bidirectional stream, the first undecodable message ends the
  call the same way, whatever the servicer is doing with the stream (a servicer reading with `context.read()`
  instead of iterating would see the `Undecodable` value itself; none does).

Synchronous handlers (health checking's `List`, which the async health servicer inherits) are guarded alike.
"""

from __future__ import annotations

import inspect
import logging
import re
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from typing import Any

import grpc
from grpc_status import rpc_status

from managed_agents.mesh.errors import UndecodableRequest
from managed_agents.mesh.status import record, to_status

log = logging.getLogger(__name__)

_PREFIX = re.compile(r"^Error parsing message(?: with type '[^']*')?:?\s*")
# upb's reasons, in words a client can act on.
_REASONS = {
    "String field had bad UTF-8": "a string field holds invalid UTF-8",
    "Wire format was corrupt": "the protobuf encoding is corrupt or truncated",
    "Exceeded upb_DecodeOptions_MaxDepth": (
        "messages are nested deeper than protobuf decodes (100 levels; a google.protobuf.Struct or Value uses "
        "three per level of JSON)"
    ),
}


class Undecodable:
    """Stands for a request message whose bytes did not decode: what it should have been, and why not."""

    __slots__ = ("reason", "type_name")

    def __init__(self, type_name: str, reason: str) -> None:
        self.type_name = type_name
        self.reason = reason

    def error(self) -> UndecodableRequest:
        """The error the call ends with."""
        return UndecodableRequest(
            f"the request could not be decoded as {self.type_name}: {self.reason}; it was not processed"
        )


def _reason(error: Exception) -> str:
    text = _PREFIX.sub("", str(error)).strip()
    return _REASONS.get(text, text or type(error).__name__)


def _guarded_deserializer(deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    message_type = getattr(deserializer, "__self__", None)
    descriptor = getattr(message_type, "DESCRIPTOR", None)
    type_name = str(getattr(descriptor, "full_name", "") or "the method's request message")

    def deserialize(raw: bytes) -> Any:
        try:
            return deserializer(raw)
        except Exception as error:  # whatever the decoder raises, the bytes are at fault
            return Undecodable(type_name, _reason(error))

    return deserialize


def _status(request: Undecodable, domain: str) -> grpc.Status:
    error = request.error()
    log.debug("refused an undecodable request: %s", error)
    record(error)
    return rpc_status.to_status(to_status(error, domain=domain))


async def _refuse(request: Undecodable, context: grpc.aio.ServicerContext[Any, Any], domain: str) -> None:
    await context.abort_with_status(_status(request, domain))


def _refuse_sync(request: Undecodable, context: Any, domain: str) -> None:
    # A synchronous handler's context (grpcio runs the handler on a worker thread) has `abort` alone.
    status = _status(request, domain)
    context.abort(status.code, status.details, status.trailing_metadata)


async def _checked(
    requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any], domain: str
) -> AsyncIterator[Any]:
    async for request in requests:
        if isinstance(request, Undecodable):
            await _refuse(request, context, domain)
        yield request


def _checked_sync(requests: Iterator[Any], context: Any, domain: str) -> Iterator[Any]:
    for request in requests:
        if isinstance(request, Undecodable):
            _refuse_sync(request, context, domain)
        yield request


def _guarded_async(behavior: Any, *, request_streaming: bool, domain: str) -> Any:
    if inspect.isasyncgenfunction(behavior):
        if request_streaming:

            async def stream_stream(requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
                async for response in behavior(_checked(requests, context, domain), context):
                    yield response

            return stream_stream

        async def unary_stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            if isinstance(request, Undecodable):
                await _refuse(request, context, domain)
            async for response in behavior(request, context):
                yield response

        return unary_stream
    if request_streaming:

        async def stream_unary(requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            return await behavior(_checked(requests, context, domain), context)

        return stream_unary

    async def unary_unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        if isinstance(request, Undecodable):
            await _refuse(request, context, domain)
        return await behavior(request, context)

    return unary_unary


def _guarded_sync(behavior: Any, *, request_streaming: bool, response_streaming: bool, domain: str) -> Any:
    # grpcio calls a synchronous streaming handler on the event loop and iterates what it returns on a worker
    # thread, so the check must happen inside a generator, where aborting cannot block the loop.
    if response_streaming:

        def streaming(request: Any, context: Any) -> Iterator[Any]:
            if request_streaming:
                request = _checked_sync(request, context, domain)
            elif isinstance(request, Undecodable):
                _refuse_sync(request, context, domain)
            yield from behavior(request, context)

        return streaming

    def unary(request: Any, context: Any) -> Any:
        if request_streaming:
            request = _checked_sync(request, context, domain)
        elif isinstance(request, Undecodable):
            _refuse_sync(request, context, domain)
        return behavior(request, context)

    return unary


def guard(handler: grpc.RpcMethodHandler, *, domain: str) -> grpc.RpcMethodHandler:
    """`handler`, but answering an undecodable request with INVALID_ARGUMENT (unchanged if it takes raw
    bytes)."""
    if handler is None or handler.request_deserializer is None:
        return handler
    kind = ("stream_" if handler.request_streaming else "unary_") + (
        "stream" if handler.response_streaming else "unary"
    )
    behavior = getattr(handler, kind)
    if inspect.isasyncgenfunction(behavior) or inspect.iscoroutinefunction(behavior):
        guarded = _guarded_async(behavior, request_streaming=handler.request_streaming, domain=domain)
    else:
        guarded = _guarded_sync(
            behavior,
            request_streaming=handler.request_streaming,
            response_streaming=handler.response_streaming,
            domain=domain,
        )
    return handler._replace(request_deserializer=_guarded_deserializer(handler.request_deserializer), **{kind: guarded})


def _service_of(method: str) -> str:
    return method.lstrip("/").rpartition("/")[0]


class _GuardedGenericHandler(grpc.GenericRpcHandler):  # type: ignore[misc]  # grpc ships no types
    """A generic handler whose method handlers are guarded, each built once."""

    def __init__(self, inner: grpc.GenericRpcHandler) -> None:
        self._inner = inner
        # method name -> (the inner handler, its guarded copy); only names that resolved are kept.
        self._guarded: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = self._inner.service(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method or ""
        known = self._guarded.get(method)
        if known is None or known[0] is not handler:
            known = (handler, guard(handler, domain=_service_of(method)))
            self._guarded[method] = known
        return known[1]


class GuardedRegistry:
    """What the generated `add_*_to_server` functions register with instead of the server: it registers
    guarded copies of their handlers on the server."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, generic_rpc_handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self._server.add_generic_rpc_handlers(tuple(_GuardedGenericHandler(h) for h in generic_rpc_handlers))

    def add_registered_method_handlers(
        self, service_name: str, method_handlers: Mapping[str, grpc.RpcMethodHandler]
    ) -> None:
        self._server.add_registered_method_handlers(
            service_name, {name: guard(h, domain=service_name) for name, h in method_handlers.items()}
        )
