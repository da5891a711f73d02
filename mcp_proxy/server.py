"""`VaultService` and `McpProxyService` servicers: check requests, translate between protobuf and the core."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf import struct_pb2

from managed_agents.mesh import paging
from managed_agents.mesh.errors import FailedPrecondition, InvalidArgument, MeshError
from managed_agents.mesh.metrics import ServiceMetrics
from managed_agents.v1 import content_pb2, mcp_proxy_pb2, mcp_proxy_pb2_grpc, sandbox_pb2
from mcp_proxy import validate
from mcp_proxy.egress import EgressRelay, Placeholder
from mcp_proxy.git_relay import GitRelay
from mcp_proxy.http_upstream import host_of
from mcp_proxy.proxy import McpProxy
from mcp_proxy.upstream import Content
from mcp_proxy.vault import CredentialRecord

VAULT_SERVICE_NAME = mcp_proxy_pb2.DESCRIPTOR.services_by_name["VaultService"].full_name
PROXY_SERVICE_NAME = mcp_proxy_pb2.DESCRIPTOR.services_by_name["McpProxyService"].full_name

# Answer a little before the caller's deadline: a slow upstream then is an error result, not a deadline.
_DEADLINE_MARGIN = 0.25
# What of a refused relay request is read before the refusal is sent (see `_refusal_read_to_the_end`).
_DRAIN_BYTES = 16 << 20
_DRAIN_SECONDS = 5.0


def credential_message(record: CredentialRecord) -> mcp_proxy_pb2.Credential:
    """The `Credential` (metadata only: there is no field a secret could go in) of a stored record."""
    spec = record.spec
    message = mcp_proxy_pb2.Credential(
        name=spec.name,
        kind=int(spec.kind),  # type: ignore[arg-type]  # same numbers as the proto enum
        mcp_server_url=spec.mcp_server_url,
        token_endpoint=spec.token_endpoint,
        client_id=spec.client_id,
        allowed_hosts=spec.allowed_hosts,
    )
    message.create_time.FromMicroseconds(record.create_time_us)
    message.update_time.FromMicroseconds(record.update_time_us)
    if record.expire_time_us:
        message.expire_time.FromMicroseconds(record.expire_time_us)
    return message


def content_block(content: Content) -> content_pb2.ContentBlock:
    """A core content block as the contract's `ContentBlock`."""
    if content.kind == "image":
        return content_pb2.ContentBlock(image=content_pb2.ImageBlock(media_type=content.media_type, data=content.data))
    return content_pb2.ContentBlock(text=content_pb2.TextBlock(text=content.text))


class VaultServicer(mcp_proxy_pb2_grpc.VaultServiceServicer):
    """Serves `managed_agents.v1.VaultService`: credentials go in, metadata comes out, secrets never do."""

    def __init__(self, proxy: McpProxy) -> None:
        self._proxy = proxy

    async def PutCredential(
        self, request: mcp_proxy_pb2.PutCredentialRequest, context: grpc.aio.ServicerContext
    ) -> mcp_proxy_pb2.PutCredentialResponse:
        if not request.HasField("credential"):
            raise InvalidArgument.field("credential", "is required")
        if not request.HasField("secret"):
            raise InvalidArgument.field("secret", "is required")
        spec, secret, ttl_us = validate.credential(request.credential, request.secret)
        record = await self._proxy.put_credential(spec, secret, token_ttl_us=ttl_us)
        return mcp_proxy_pb2.PutCredentialResponse(credential=credential_message(record))

    async def ListCredentials(
        self, request: mcp_proxy_pb2.ListCredentialsRequest, context: grpc.aio.ServicerContext
    ) -> mcp_proxy_pb2.ListCredentialsResponse:
        size = validate.page_size(request.page_size)
        after = ""
        if request.page_token:
            # A token is caller input: a forged position is refused, never a crash.
            position = paging.decode(request.page_token, {}).get("after")
            if not isinstance(position, str) or not 1 <= len(position) <= 64:
                raise InvalidArgument.field("page_token", "is not a token this server issued")
            after = position
        records = await self._proxy.vault.list(after=after, limit=size + 1)
        response = mcp_proxy_pb2.ListCredentialsResponse(credentials=[credential_message(r) for r in records[:size]])
        if len(records) > size:
            response.next_page_token = paging.encode({"after": records[size - 1].spec.name}, {})
        return response

    async def DeleteCredential(
        self, request: mcp_proxy_pb2.DeleteCredentialRequest, context: grpc.aio.ServicerContext
    ) -> mcp_proxy_pb2.DeleteCredentialResponse:
        existed = await self._proxy.delete_credential(validate.credential_name(request.name))
        return mcp_proxy_pb2.DeleteCredentialResponse(existed=existed)


class McpProxyServicer(mcp_proxy_pb2_grpc.McpProxyServiceServicer):
    """Serves `managed_agents.v1.McpProxyService`: session tokens, MCP tools reached through them, and the git
    and egress relays."""

    def __init__(
        self,
        proxy: McpProxy,
        git: GitRelay | None = None,
        metrics: ServiceMetrics | None = None,
        egress: EgressRelay | None = None,
    ) -> None:
        self._proxy = proxy
        self._git = git
        self._egress = egress
        metrics = metrics or ServiceMetrics.disabled()
        self._egress_requests = metrics.counter(
            "managed_agents.proxy.egress_requests", "sandboxes' HTTP requests relayed, by host and status"
        )
        self._egress_time = metrics.latency(
            "managed_agents.proxy.egress_duration", "time of one relayed HTTP request, to the end of its body"
        )
        self._calls = metrics.counter("managed_agents.proxy.tool_calls", "MCP tool calls, by server and error")
        self._call_time = metrics.latency("managed_agents.proxy.tool_call_duration", "time of one MCP tool call")

    async def MintSessionToken(
        self, request: mcp_proxy_pb2.MintSessionTokenRequest, context: grpc.aio.ServicerContext
    ) -> mcp_proxy_pb2.MintSessionTokenResponse:
        session_id = validate.session_id(request.session_id)
        grants = validate.grants(request.grants)
        ttl_us = validate.session_ttl_us(request.ttl)
        token, grant = await self._proxy.mint(session_id, grants, ttl_us=ttl_us)
        response = mcp_proxy_pb2.MintSessionTokenResponse(token=token)
        response.expire_time.FromMicroseconds(grant.expire_time_us)
        return response

    async def RevokeSessionToken(
        self, request: mcp_proxy_pb2.RevokeSessionTokenRequest, context: grpc.aio.ServicerContext
    ) -> mcp_proxy_pb2.RevokeSessionTokenResponse:
        revoked = await self._proxy.tokens.revoke(validate.session_id(request.session_id))
        return mcp_proxy_pb2.RevokeSessionTokenResponse(revoked=revoked)

    async def ListTools(
        self, request: mcp_proxy_pb2.McpProxyServiceListToolsRequest, context: grpc.aio.ServicerContext
    ) -> mcp_proxy_pb2.McpProxyServiceListToolsResponse:
        tools = await self._proxy.list_tools(request.session_token)
        specs = []
        for tool in tools:
            schema = struct_pb2.Struct()
            schema.update(tool.tool.input_schema)
            specs.append(
                sandbox_pb2.ToolSpec(
                    name=tool.name,
                    description=tool.tool.description,
                    input_schema=schema,
                    # Nobody can know what an upstream tool does twice; the brain must not re-run one.
                    safe_to_retry=False,
                )
            )
        return mcp_proxy_pb2.McpProxyServiceListToolsResponse(tools=specs)

    async def CallTool(
        self, request: mcp_proxy_pb2.McpProxyServiceCallToolRequest, context: grpc.aio.ServicerContext
    ) -> mcp_proxy_pb2.McpProxyServiceCallToolResponse:
        # The token first: a caller without a valid one learns nothing about the rest of its request.
        self._proxy.tokens.verify(request.session_token)
        server = validate.credential_name(request.server, "server")
        tool = validate.tool_name(request.tool)
        arguments = validate.arguments(request.arguments)
        timeout = validate.call_timeout(request.timeout)
        remaining = context.time_remaining()
        if remaining is not None:
            timeout = max(0.001, min(timeout, remaining - _DEADLINE_MARGIN))
        started = time.perf_counter()
        result = await self._proxy.call_tool(request.session_token, server, tool, arguments, time_limit=timeout)
        self._calls.add(1, {"server": server, "error": result.is_error})
        self._call_time.record(time.perf_counter() - started, {"server": server})
        return mcp_proxy_pb2.McpProxyServiceCallToolResponse(
            content=[content_block(c) for c in result.content], is_error=result.is_error
        )

    async def RelayGit(
        self, request_iterator: AsyncIterator[mcp_proxy_pb2.RelayGitRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[mcp_proxy_pb2.RelayGitResponse]:
        if self._git is None:
            raise FailedPrecondition("this proxy does not relay git")
        head, body = await _head_and_body(request_iterator)
        async with _refusal_read_to_the_end(body):
            relayed = await self._git.relay(
                session_token=head.session_token,
                credential=validate.credential_name(head.credential, "head.credential"),
                url=head.url,
                method=head.method,
                headers=[(h.name, h.value) for h in head.headers],
                body=body,
            )
        yield mcp_proxy_pb2.RelayGitResponse(
            head=mcp_proxy_pb2.RelayGitResponseHead(status=relayed.status, headers=_headers(relayed.headers))
        )
        async for chunk in relayed.body:
            yield mcp_proxy_pb2.RelayGitResponse(body=chunk)

    async def RelayHttp(
        self, request_iterator: AsyncIterator[mcp_proxy_pb2.RelayHttpRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[mcp_proxy_pb2.RelayHttpResponse]:
        if self._egress is None:
            raise FailedPrecondition("this proxy does not relay sandboxes' HTTP requests")
        head, body = await _head_and_body(request_iterator)
        started = time.perf_counter()
        async with _refusal_read_to_the_end(body):
            credentials = [
                Placeholder(validate.credential_name(c.credential, f"head.credentials[{i}].credential"), c.placeholder)
                for i, c in enumerate(head.credentials)
            ]
            relayed = await self._egress.relay(
                session_token=head.session_token,
                credentials=credentials,
                url=head.url,
                method=head.method,
                headers=[(h.name, h.value) for h in head.headers],
                body=body,
            )
        host = host_of(head.url)
        self._egress_requests.add(1, {"host": host, "status": relayed.status})
        yield mcp_proxy_pb2.RelayHttpResponse(
            head=mcp_proxy_pb2.RelayHttpResponseHead(status=relayed.status, headers=_headers(relayed.headers))
        )
        async for chunk in relayed.body:
            yield mcp_proxy_pb2.RelayHttpResponse(body=chunk)
        self._egress_time.record(time.perf_counter() - started, {"host": host})


@contextlib.asynccontextmanager
async def _refusal_read_to_the_end(body: AsyncIterator[Any]) -> AsyncIterator[None]:
    """On a refusal, reads what is left of the request (up to a limit) before the error is sent: grpcio turns
    a status that reaches a client still sending into its own `INTERNAL` error, and the refusal's sentence
    would be lost."""
    try:
        yield
    except MeshError:
        received = 0
        with contextlib.suppress(Exception):
            async with asyncio.timeout(_DRAIN_SECONDS):
                async for chunk in body:
                    received += len(chunk)
                    if received > _DRAIN_BYTES:
                        break
        raise


async def _head_and_body(request_iterator: AsyncIterator[Any]) -> tuple[Any, AsyncIterator[bytes]]:
    """The head of a relay request stream (refusing a stream that does not start with one), and its body."""
    first = await anext(aiter(request_iterator), None)
    if first is None or first.WhichOneof("part") != "head":
        async with _refusal_read_to_the_end(request_iterator):
            raise InvalidArgument.field("head", "the first message must be the request head")

    async def body() -> AsyncIterator[bytes]:
        async for part in request_iterator:
            if part.WhichOneof("part") != "body":
                raise InvalidArgument.field("body", "only body chunks may follow the head")
            yield part.body

    return first.head, body()


def _headers(pairs: list[tuple[str, str]]) -> list[mcp_proxy_pb2.HttpHeader]:
    return [mcp_proxy_pb2.HttpHeader(name=k, value=v) for k, v in pairs]
