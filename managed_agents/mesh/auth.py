"""Service authentication: a mesh's servers accept calls only from peers holding the deployment's secret.

Every process of one deployment is given the same secret (`MANAGED_AGENTS_MESH_SECRET_FILE`, a file readable
only by the services, or `MANAGED_AGENTS_MESH_SECRET` itself). Clients send it as `authorization: Bearer
<secret>` on every call; servers refuse any call without it with UNAUTHENTICATED, except health checks, which
load balancers and orchestrators make without credentials. The secret never enters a sandbox: hands start
sandboxes with a cleared environment and without the mesh's files. With no secret configured (tests, a
laptop), servers accept every call, and say so once at start.
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
import stat
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import grpc
from grpc_status import rpc_status

from managed_agents.mesh.errors import NotMeshPeer
from managed_agents.mesh.status import to_status

log = logging.getLogger(__name__)

SECRET_ENV = "MANAGED_AGENTS_MESH_SECRET"
SECRET_FILE_ENV = "MANAGED_AGENTS_MESH_SECRET_FILE"
MIN_SECRET_CHARS = 32
_HEADER = "authorization"
_OPEN_METHODS = ("/grpc.health.v1.Health/",)


class MeshSecretError(ValueError):
    """The configured mesh secret cannot be used; the message says why and what to do."""


def mesh_secret(environ: Mapping[str, str]) -> str:
    """The deployment's secret from the environment ('' if none is configured)."""
    path = environ.get(SECRET_FILE_ENV, "")
    if path:
        try:
            value = Path(path).read_text().strip()
        except OSError as error:
            raise MeshSecretError(f"{SECRET_FILE_ENV}={path} cannot be read: {error.strerror}") from None
        source = f"the file {path}"
    else:
        value = environ.get(SECRET_ENV, "").strip()
        source = SECRET_ENV
    if value and (len(value) < MIN_SECRET_CHARS or not value.isprintable() or " " in value):
        raise MeshSecretError(
            f"the mesh secret in {source} must be at least {MIN_SECRET_CHARS} printable characters without "
            "spaces (make one with `managed-agents secret --out FILE`)"
        )
    return value


def write_secret_file(path: Path) -> str:
    """Creates `path` holding a new random secret, readable by its owner only; returns the secret."""
    value = secrets.token_urlsafe(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, stat.S_IRUSR | stat.S_IWUSR)
    with os.fdopen(fd, "w") as out:
        out.write(value + "\n")
    return value


def _refusal(secret: str, metadata: tuple[tuple[str, str | bytes], ...] | None) -> str:
    """Why a call's metadata does not prove it comes from the mesh ('' if it does)."""
    sent = [v for k, v in (metadata or ()) if k == _HEADER]
    if not sent:
        return (
            "this server accepts calls only from its mesh: send `authorization: Bearer <mesh secret>` (the "
            f"secret is in the file named by {SECRET_FILE_ENV} on the mesh's hosts)"
        )
    value = sent[0] if isinstance(sent[0], str) else sent[0].decode(errors="replace")
    if not hmac.compare_digest(value.encode(), f"Bearer {secret}".encode()):
        return "the mesh secret sent in `authorization` is not this mesh's"
    return ""


class RequireMeshSecret(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # grpc.aio ships no types
    """Refuses calls that do not carry the mesh secret (health checks excepted)."""

    def __init__(self, secret: str) -> None:
        self._secret = secret

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method or ""
        if handler is None or method.startswith(_OPEN_METHODS):
            return handler
        reason = _refusal(self._secret, handler_call_details.invocation_metadata)
        if not reason:
            return handler
        return _refusing(handler, reason)


def _refusing(handler: grpc.RpcMethodHandler, reason: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that ends every call with UNAUTHENTICATED."""

    status = rpc_status.to_status(to_status(NotMeshPeer(reason), domain="managed_agents.mesh"))

    async def refuse(_: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await context.abort_with_status(status)

    async def refuse_stream(_: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        await context.abort_with_status(status)
        yield  # pragma: no cover - abort raises

    kw = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse_stream, **kw)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse, **kw)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse_stream, **kw)
    return grpc.unary_unary_rpc_method_handler(refuse, **kw)


def _with_secret(details: grpc.aio.ClientCallDetails, secret: str) -> grpc.aio.ClientCallDetails:
    metadata = grpc.aio.Metadata(*(details.metadata or ()))
    metadata[_HEADER] = f"Bearer {secret}"
    return details._replace(metadata=metadata)


class _UnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]  # grpc.aio ships no types
    def __init__(self, secret: str) -> None:
        self._secret = secret

    async def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await continuation(_with_secret(client_call_details, self._secret), request)


class _UnaryStream(grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[misc]  # grpc.aio ships no types
    def __init__(self, secret: str) -> None:
        self._secret = secret

    async def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await continuation(_with_secret(client_call_details, self._secret), request)


class _StreamUnary(grpc.aio.StreamUnaryClientInterceptor):  # type: ignore[misc]  # grpc.aio ships no types
    def __init__(self, secret: str) -> None:
        self._secret = secret

    async def intercept_stream_unary(self, continuation: Any, client_call_details: Any, request_iterator: Any) -> Any:
        return await continuation(_with_secret(client_call_details, self._secret), request_iterator)


class _StreamStream(grpc.aio.StreamStreamClientInterceptor):  # type: ignore[misc]  # grpc.aio ships no types
    def __init__(self, secret: str) -> None:
        self._secret = secret

    async def intercept_stream_stream(self, continuation: Any, client_call_details: Any, request_iterator: Any) -> Any:
        return await continuation(_with_secret(client_call_details, self._secret), request_iterator)


def client_interceptors(secret: str) -> list[grpc.aio.ClientInterceptor]:
    """Interceptors that send the mesh secret on every call of a channel."""
    return [_UnaryUnary(secret), _UnaryStream(secret), _StreamUnary(secret), _StreamStream(secret)]
