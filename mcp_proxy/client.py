"""Typed async client of the vault and the MCP proxy, for the brain, the CLI and the tests.

Methods return the contract's protobuf messages and raise `MeshError` subclasses (e.g. `TokenInvalid`,
`NotGranted`, `CredentialNotFound`) rather than raw gRPC errors. Upstream failures of `call_tool` are not
errors: they come back as a response with `is_error` set.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

import grpc
from google.protobuf import duration_pb2, struct_pb2
from opentelemetry.sdk.trace import TracerProvider

from managed_agents.mesh.calls import translated_errors
from managed_agents.mesh.channel import dial
from managed_agents.mesh.errors import Unavailable
from managed_agents.mesh.tls import MeshTls
from managed_agents.v1 import mcp_proxy_pb2, mcp_proxy_pb2_grpc, sandbox_pb2

# Named from the descriptor rather than imported from `mcp_proxy.server`, which would pull the MCP SDK (a
# second of imports) into every process that only wants to call the proxy.
VAULT_SERVICE_NAME = mcp_proxy_pb2.DESCRIPTOR.services_by_name["VaultService"].full_name
PROXY_SERVICE_NAME = mcp_proxy_pb2.DESCRIPTOR.services_by_name["McpProxyService"].full_name
# Reads are safe to repeat; the channel retries them when the proxy is briefly unavailable. CallTool is not:
# an upstream tool may have run.
_RELAY_CHUNK = 1 << 20  # the contract's limit for one body chunk
_RETRIED = [(VAULT_SERVICE_NAME, "ListCredentials"), (PROXY_SERVICE_NAME, "ListTools")]


def _duration(seconds: float) -> duration_pb2.Duration:
    value = duration_pb2.Duration()
    value.FromNanoseconds(int(seconds * 1e9))
    return value


class McpProxyClient:
    """Client of `managed_agents.v1.VaultService` and `managed_agents.v1.McpProxyService`."""

    def __init__(self, channel: grpc.aio.Channel, *, owns_channel: bool = False) -> None:
        self._channel = channel
        self._owns_channel = owns_channel
        self._vault = mcp_proxy_pb2_grpc.VaultServiceStub(channel)
        self._proxy = mcp_proxy_pb2_grpc.McpProxyServiceStub(channel)

    @classmethod
    def connect(
        cls,
        target: str,
        *,
        tracer_provider: TracerProvider | None = None,
        mesh_secret: str = "",
        tls: MeshTls | None = None,
    ) -> McpProxyClient:
        """A client with its own channel to `target`; close it with `aclose()`."""
        channel = dial(
            target, tracer_provider=tracer_provider, retry_methods=_RETRIED, mesh_secret=mesh_secret, tls=tls
        )
        return cls(channel, owns_channel=True)

    async def aclose(self) -> None:
        """Closes the channel if this client opened it."""
        if self._owns_channel:
            await self._channel.close()

    async def __aenter__(self) -> McpProxyClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

    # Vault -------------------------------------------------------------------------------------------------

    async def put_credential(
        self, credential: mcp_proxy_pb2.Credential, secret: mcp_proxy_pb2.CredentialSecret
    ) -> mcp_proxy_pb2.Credential:
        """Stores (or replaces) a credential; returns its stored metadata."""
        with translated_errors():
            response: mcp_proxy_pb2.PutCredentialResponse = await self._vault.PutCredential(
                mcp_proxy_pb2.PutCredentialRequest(credential=credential, secret=secret)
            )
        return response.credential

    async def list_credentials(self) -> list[mcp_proxy_pb2.Credential]:
        """Every credential's metadata, by name, following every page."""
        credentials: list[mcp_proxy_pb2.Credential] = []
        token = ""
        while True:
            with translated_errors():
                response: mcp_proxy_pb2.ListCredentialsResponse = await self._vault.ListCredentials(
                    mcp_proxy_pb2.ListCredentialsRequest(page_size=1000, page_token=token)
                )
            credentials.extend(response.credentials)
            token = response.next_page_token
            if not token:
                return credentials

    async def delete_credential(self, name: str) -> bool:
        """Deletes a credential; True if it existed."""
        with translated_errors():
            response: mcp_proxy_pb2.DeleteCredentialResponse = await self._vault.DeleteCredential(
                mcp_proxy_pb2.DeleteCredentialRequest(name=name)
            )
        return response.existed

    # Session tokens ----------------------------------------------------------------------------------------

    async def mint_session_token(
        self, session_id: str, grants: Sequence[str], ttl: float = 0
    ) -> mcp_proxy_pb2.MintSessionTokenResponse:
        """A token for `session_id` granting the named credentials for `ttl` seconds (0: one hour)."""
        with translated_errors():
            response: mcp_proxy_pb2.MintSessionTokenResponse = await self._proxy.MintSessionToken(
                mcp_proxy_pb2.MintSessionTokenRequest(session_id=session_id, grants=grants, ttl=_duration(ttl))
            )
        return response

    async def revoke_session_token(self, session_id: str) -> int:
        """Revokes every token of `session_id`; returns how many were still unexpired."""
        with translated_errors():
            response: mcp_proxy_pb2.RevokeSessionTokenResponse = await self._proxy.RevokeSessionToken(
                mcp_proxy_pb2.RevokeSessionTokenRequest(session_id=session_id)
            )
        return response.revoked

    # MCP ---------------------------------------------------------------------------------------------------

    async def list_tools(self, session_token: str) -> list[sandbox_pb2.ToolSpec]:
        """Tools of the MCP servers the token grants, named `<server>__<tool>`."""
        with translated_errors():
            response: mcp_proxy_pb2.McpProxyServiceListToolsResponse = await self._proxy.ListTools(
                mcp_proxy_pb2.McpProxyServiceListToolsRequest(session_token=session_token)
            )
        return list(response.tools)

    async def call_tool(
        self,
        session_token: str,
        *,
        server: str,
        tool: str,
        arguments: Mapping[str, object] | struct_pb2.Struct,
        # The name callers know; it bounds the upstream call and sets the RPC's deadline from it.
        timeout: float | None = None,
    ) -> mcp_proxy_pb2.McpProxyServiceCallToolResponse:
        """Calls `tool` of granted MCP server `server`; `timeout` bounds the upstream call (default 60 s).

        The gRPC deadline is set a little longer than `timeout`, so a slow upstream comes back as a result
        with `is_error` rather than as `DeadlineExceeded`.
        """
        if isinstance(arguments, struct_pb2.Struct):
            struct = arguments
        else:
            struct = struct_pb2.Struct()
            struct.update(dict(arguments))  # type: ignore[arg-type]  # JSON values; Struct checks them itself
        request = mcp_proxy_pb2.McpProxyServiceCallToolRequest(
            session_token=session_token, server=server, tool=tool, arguments=struct
        )
        if timeout is not None:
            request.timeout.CopyFrom(_duration(timeout))
        deadline = (timeout if timeout else 60.0) + 5.0
        with translated_errors():
            response: mcp_proxy_pb2.McpProxyServiceCallToolResponse = await self._proxy.CallTool(
                request, timeout=deadline
            )
        return response

    # Relays ------------------------------------------------------------------------------------------------

    async def relay_git(
        self, head: mcp_proxy_pb2.RelayGitRequestHead, body: AsyncIterator[bytes]
    ) -> tuple[mcp_proxy_pb2.RelayGitResponseHead, AsyncIterator[bytes]]:
        """Relays one git smart-HTTP request; returns the response head and its body as it streams."""
        call = self._proxy.RelayGit(_relay_requests(mcp_proxy_pb2.RelayGitRequest, head, body))
        answer: mcp_proxy_pb2.RelayGitResponseHead = await _response_head(call, "git relay")
        return answer, _response_body(call)

    async def relay_http(
        self, head: mcp_proxy_pb2.RelayHttpRequestHead, body: AsyncIterator[bytes]
    ) -> tuple[mcp_proxy_pb2.RelayHttpResponseHead, AsyncIterator[bytes]]:
        """Relays one HTTP request a sandbox sent out; returns the response head and its body as it streams."""
        call = self._proxy.RelayHttp(_relay_requests(mcp_proxy_pb2.RelayHttpRequest, head, body))
        answer: mcp_proxy_pb2.RelayHttpResponseHead = await _response_head(call, "egress relay")
        return answer, _response_body(call)


async def _relay_requests(message: Callable[..., Any], head: Any, body: AsyncIterator[bytes]) -> AsyncIterator[Any]:
    """A relay request stream: the head, then the body in chunks no larger than the contract allows."""
    yield message(head=head)
    async for chunk in body:
        for start in range(0, len(chunk), _RELAY_CHUNK):
            yield message(body=chunk[start : start + _RELAY_CHUNK])


async def _response_head(call: Any, what: str) -> Any:
    """The first message of a relay's answer, which must be its head; refusals raise `MeshError`."""
    with translated_errors():
        first = await call.read()
    if first is grpc.aio.EOF or first.WhichOneof("part") != "head":
        call.cancel()
        raise Unavailable(f"the {what} ended its answer before sending a response head")
    return first.head


async def _response_body(call: Any) -> AsyncIterator[bytes]:
    """The body chunks that follow a relay's response head."""
    try:
        with translated_errors():
            while True:
                part = await call.read()
                if part is grpc.aio.EOF:
                    return
                yield part.body
    finally:
        call.cancel()
