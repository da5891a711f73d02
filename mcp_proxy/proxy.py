"""The proxy's core: who may use which credential (session tokens), and MCP calls made with it (upstream)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from managed_agents.mesh.errors import CredentialNotFound, InvalidArgument, NotGranted
from mcp_proxy.tokens import SessionGrant, TokenAuthority
from mcp_proxy.upstream import McpEndpoint, ToolResult, UpstreamError, UpstreamPool, UpstreamTool
from mcp_proxy.vault import CredentialKind, CredentialRecord, CredentialSpec, Secret, Vault

log = logging.getLogger(__name__)

# Tool names as the model sees them: `<server>__<tool>`, limited as `ToolSpec.name` documents.
SEPARATOR = "__"
MAX_TOOL_NAME = 64


def _tool_name_ok(name: str) -> bool:
    return 0 < len(name) <= MAX_TOOL_NAME and all(c.isascii() and (c.isalnum() or c in "_-") for c in name)


@dataclass(frozen=True, slots=True)
class ProxiedTool:
    """A tool of a granted server, under the name the model calls it by."""

    name: str
    server: str
    tool: UpstreamTool


class McpProxy:
    """Checks session tokens and grants, looks credentials up, and reaches upstream MCP servers with them."""

    def __init__(
        self, vault: Vault, tokens: TokenAuthority, upstream: UpstreamPool, *, list_timeout: float = 10.0
    ) -> None:
        self.vault = vault
        self.tokens = tokens
        self.upstream = upstream
        self._list_timeout = list_timeout

    # Credentials -------------------------------------------------------------------------------------------

    async def put_credential(self, spec: CredentialSpec, secret: Secret, *, token_ttl_us: int) -> CredentialRecord:
        """Stores a credential; an open connection made with the old one is closed."""
        record = await self.vault.put(spec, secret, token_ttl_us=token_ttl_us)
        self.upstream.forget(spec.name)
        return record

    async def delete_credential(self, name: str) -> bool:
        """Deletes a credential; tokens that grant it lose access at once, and its connection is closed."""
        existed = await self.vault.delete(name)
        self.upstream.forget(name)
        return existed

    # Tokens ------------------------------------------------------------------------------------------------

    async def mint(self, session_id: str, grants: Sequence[str], *, ttl_us: int) -> tuple[str, SessionGrant]:
        """A token for `session_id` granting `grants`, which must all exist."""
        for index, name in enumerate(grants):
            try:
                await self.vault.get(name)
            except CredentialNotFound:
                raise CredentialNotFound(
                    f"grants[{index}]: no credential is named {name!r}; put it before granting it"
                ) from None
        return await self.tokens.mint(session_id, grants, ttl_us=ttl_us)

    # MCP ---------------------------------------------------------------------------------------------------

    async def _endpoint(self, grant: SessionGrant, server: str) -> McpEndpoint:
        if not grant.allows(server):
            raise NotGranted(
                f"the session token of session {grant.session_id!r} does not grant {server!r}; it grants "
                f"{', '.join(repr(g) for g in grant.grants)}"
            )
        try:
            record = await self.vault.get(server)
        except CredentialNotFound:
            raise CredentialNotFound(
                f"credential {server!r} was granted but has since been deleted from the vault"
            ) from None
        if record.spec.kind is not CredentialKind.MCP_OAUTH or not record.spec.mcp_server_url:
            raise InvalidArgument.field("server", f"credential {server!r} is not an MCP server credential")
        return McpEndpoint(server, record.spec.mcp_server_url)

    async def list_tools(self, token: str) -> list[ProxiedTool]:
        """Tools of every MCP server the token grants, named `<server>__<tool>`.

        A server that cannot be reached is left out (and logged), so one broken server does not take the
        others' tools away from a session.
        """
        grant = self.tokens.verify(token)
        endpoints = []
        for name in grant.grants:
            try:
                record = await self.vault.get(name)
            except CredentialNotFound:
                continue
            if record.spec.kind is CredentialKind.MCP_OAUTH and record.spec.mcp_server_url:
                endpoints.append(McpEndpoint(name, record.spec.mcp_server_url))

        async def tools_of(endpoint: McpEndpoint) -> list[ProxiedTool]:
            try:
                tools = await self.upstream.list_tools(endpoint, time_limit=self._list_timeout)
            except UpstreamError as exc:
                log.warning("leaving out the tools of MCP server %r: %s", endpoint.name, exc)
                return []
            named = []
            for tool in tools:
                name = f"{endpoint.name}{SEPARATOR}{tool.name}"
                if not _tool_name_ok(name):
                    log.warning(
                        "leaving out tool %r of MCP server %r: %r is not a valid tool name",
                        tool.name,
                        endpoint.name,
                        name,
                    )
                    continue
                named.append(ProxiedTool(name, endpoint.name, tool))
            return named

        lists = await asyncio.gather(*(tools_of(e) for e in endpoints))
        return [tool for tools in lists for tool in tools]

    async def call_tool(
        self, token: str, server: str, tool: str, arguments: Mapping[str, Any], *, time_limit: float
    ) -> ToolResult:
        """Calls `tool` on granted server `server`; upstream failures come back as error results."""
        grant = self.tokens.verify(token)
        endpoint = await self._endpoint(grant, server)
        return await self.upstream.call_tool(endpoint, tool, arguments, time_limit=time_limit)

    async def aclose(self) -> None:
        """Closes upstream connections."""
        await self.upstream.aclose()
