"""Translation between `MeshError` and gRPC status with `google.rpc` details (AIP-193), both ways.

Servers never build statuses by hand: `ErrorTranslatingServicer` turns a raised `MeshError` into a status
carrying `ErrorInfo` (always), `BadRequest` (invalid arguments) and `RetryInfo` (retryable errors), and turns
any other exception into `INTERNAL` with a sentence and the trace id, logging the traceback instead of
sending it. Clients call `from_rpc_error` to get the typed `MeshError` back.

Exceptions are not classified by type: a `DecodeError`, `UnicodeDecodeError` or `RecursionError` raised inside
a servicer may come from the server's own data (stored bytes, an upstream's answer) as well as from the
request, so it is INTERNAL like any other. A request that does not decode never reaches a servicer:
`managed_agents.mesh.decoding` answers it INVALID_ARGUMENT, and services validate what did decode.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from managed_agents.mesh.errors import Code, FieldViolation, Internal, MeshError, error_class

log = logging.getLogger(__name__)

_STATUS_DETAILS_KEY = "grpc-status-details-bin"
# Codes that mean the server failed, as opposed to the caller asking for something wrong (OTel semconv).
_SERVER_FAULTS = {
    Code.UNKNOWN,
    Code.DEADLINE_EXCEEDED,
    Code.UNIMPLEMENTED,
    Code.INTERNAL,
    Code.UNAVAILABLE,
    Code.DATA_LOSS,
}


def _pack(message: Any) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def to_status(error: MeshError, *, domain: str) -> status_pb2.Status:
    """The `google.rpc.Status` that describes `error`, as returned by a service named `domain`."""
    status = status_pb2.Status(code=int(error.code), message=error.message)
    if error.reason:
        info = error_details_pb2.ErrorInfo(reason=error.reason, domain=domain, metadata=error.metadata)
        status.details.append(_pack(info))
    if error.violations:
        bad = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                for v in error.violations
            ]
        )
        status.details.append(_pack(bad))
    if error.retryable and error.retry_after is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(error.retry_after * 1e9))
        status.details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
    return status


def from_rpc_error(error: grpc.aio.AioRpcError | grpc.RpcError) -> MeshError:
    """The typed `MeshError` for a failed call, rebuilt from its status code and details."""
    code_value = error.code().value[0] if error.code() is not None else Code.UNKNOWN
    code = Code(code_value)
    message = error.details() or code.name.lower().replace("_", " ")
    reason, metadata, retry_after = "", {}, None
    violations: list[FieldViolation] = []
    for key, value in error.trailing_metadata() or ():
        if key != _STATUS_DETAILS_KEY:
            continue
        status = status_pb2.Status.FromString(value)
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reason, metadata = info.reason, dict(info.metadata)
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                violations = [FieldViolation(v.field, v.description) for v in bad.field_violations]
            elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                retry = error_details_pb2.RetryInfo()
                detail.Unpack(retry)
                retry_after = retry.retry_delay.ToNanoseconds() / 1e9
    cls = error_class(reason, code)
    result = cls(
        message,
        metadata=metadata,
        violations=violations,
        retry_after=retry_after,
    )
    # A class picked by code alone may carry a different default; keep what the wire said.
    result.code = code
    return result


def _internal_error(exc: BaseException) -> Internal:
    context = trace.get_current_span().get_span_context()
    trace_id = format(context.trace_id, "032x") if context.is_valid else "none"
    log.exception("unexpected error while handling a call (trace %s)", trace_id, exc_info=exc)
    return Internal(f"internal error ({type(exc).__name__}); the server log has details under trace {trace_id}")


def record(error: MeshError) -> None:
    """Notes on the current span the status a call ends with (an error when the server is at fault)."""
    span = trace.get_current_span()
    span.set_attribute("rpc.grpc.status_code", int(error.code))
    if error.reason:
        span.set_attribute("error.type", error.reason)
    if error.code in _SERVER_FAULTS:
        span.set_status(Status(StatusCode.ERROR, error.message))


class ErrorTranslatingServicer:
    """Wraps a servicer so each RPC method turns raised exceptions into proper gRPC statuses.

    The wrapping happens once, when the generated `add_*_to_server` function looks the methods up, so calls
    pay for a `try` and nothing else (a `grpc.aio` interceptor would add a coroutine and a handler per call).
    """

    def __init__(self, servicer: object, *, domain: str) -> None:
        self._servicer = servicer
        self._domain = domain

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._servicer, name)
        if not name[:1].isupper() or not callable(method):
            return method
        domain = self._domain

        async def fail(exc: BaseException, context: grpc.aio.ServicerContext) -> None:
            if context.done():
                # The call already has its status: something under the servicer aborted it (an undecodable
                # message in a request stream, `managed_agents.mesh.decoding`) and the servicer caught that
                # and failed otherwise. There is nothing left to send, and grpcio ends the call as aborted.
                log.debug("a call that already has its status then raised %r", exc)
                return
            error = exc if isinstance(exc, MeshError) else _internal_error(exc)
            record(error)
            await context.abort_with_status(rpc_status.to_status(to_status(error, domain=domain)))

        if inspect.isasyncgenfunction(method):

            async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                try:
                    async for item in method(request, context):
                        yield item
                except grpc.aio.AbortError:
                    raise
                except Exception as exc:
                    await fail(exc, context)

            return stream

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                return await method(request, context)
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await fail(exc, context)

        return unary
