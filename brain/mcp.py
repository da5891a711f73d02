"""A session's MCP servers, reached through the mcp_proxy: the brain never holds a credential, only a token.

The token is minted for the session's granted servers when the run first needs it, kept in this process's
memory only (never in the log, never in a sandbox), and minted again shortly before it expires or when the
proxy refuses it (the vault key was rotated, or the token was revoked because it was feared leaked: the
brain is the one party trusted to mint).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Protocol

from google.protobuf import struct_pb2

from managed_agents.mesh.errors import DeadlineExceeded, MeshError, TokenInvalid, Unavailable
from managed_agents.v1 import mcp_proxy_pb2, sandbox_pb2

log = logging.getLogger(__name__)

SEPARATOR = "__"  # `<server>__<tool>`, as the proxy names tools
TOKEN_TTL = 3600.0
# Mint anew when less than this is left, so no call starts with a token about to die.
_RENEW_BEFORE = 300.0


class McpProxy(Protocol):
    """What the brain needs of `McpProxyService` (`mcp_proxy.client.McpProxyClient` provides it)."""

    async def mint_session_token(
        self, session_id: str, grants: Sequence[str], ttl: float = 0
    ) -> mcp_proxy_pb2.MintSessionTokenResponse: ...

    async def list_tools(self, session_token: str) -> list[sandbox_pb2.ToolSpec]: ...

    async def call_tool(
        self,
        session_token: str,
        *,
        server: str,
        tool: str,
        arguments: Mapping[str, object] | struct_pb2.Struct,
        timeout: float | None = None,
    ) -> mcp_proxy_pb2.McpProxyServiceCallToolResponse: ...


class McpUnavailable(Exception):
    """The session's MCP servers cannot be offered; the message says why, for the session log."""


def split_tool_name(name: str, servers: Sequence[str]) -> tuple[str, str] | None:
    """(server, tool) of a namespaced tool name, if it belongs to one of `servers`.

    Server names may themselves hold `__`, so the longest granted server that prefixes the name wins.
    """
    for server in sorted(servers, key=len, reverse=True):
        prefix = f"{server}{SEPARATOR}"
        if name.startswith(prefix) and len(name) > len(prefix):
            return server, name[len(prefix) :]
    return None


class SessionMcp:
    """One run's access to its session's MCP servers, and the token its sandbox's relays present."""

    def __init__(
        self,
        proxy: McpProxy | None,
        session_id: str,
        servers: Sequence[str],
        sandbox_credentials: Sequence[str] = (),
    ) -> None:
        self._proxy = proxy
        self._session_id = session_id
        self.servers = list(servers)
        # The sandbox's git tokens and API keys: hands presents the token to relay them.
        self._grants = sorted(set(servers) | set(sandbox_credentials))
        self._token = ""
        self._expires = 0.0
        self._lock = asyncio.Lock()

    def _require_proxy(self) -> McpProxy:
        if self._proxy is None:
            raise McpUnavailable(
                f"this brain has no MCP proxy (--proxy is empty), so the session's MCP servers "
                f"({', '.join(self.servers)}) cannot be reached"
            )
        return self._proxy

    async def _session_token(self, *, fresh: bool = False) -> str:
        proxy = self._require_proxy()
        async with self._lock:
            if fresh or not self._token or time.monotonic() > self._expires - _RENEW_BEFORE:
                minted = await proxy.mint_session_token(self._session_id, self._grants, ttl=TOKEN_TTL)
                self._token = minted.token
                self._expires = time.monotonic() + TOKEN_TTL
            return self._token

    async def token(self) -> str:
        """The session's current token (minted or renewed as needed), for hands' relays."""
        return await self._session_token()

    async def tools(self) -> list[sandbox_pb2.ToolSpec]:
        """The granted servers' tools; raises `McpUnavailable` with a sentence if they cannot be listed."""
        if not self.servers:
            return []
        delay, deadline = 0.2, time.monotonic() + 15
        while True:
            try:
                proxy = self._require_proxy()
                try:
                    tools = await proxy.list_tools(await self._session_token())
                except TokenInvalid:
                    tools = await proxy.list_tools(await self._session_token(fresh=True))
                break
            except (Unavailable, DeadlineExceeded) as error:
                if time.monotonic() > deadline:
                    raise McpUnavailable(f"the MCP proxy could not be reached ({error})") from error
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
            except MeshError as error:
                raise McpUnavailable(f"the MCP proxy refused to list the session's tools: {error}") from error
        listed = {split_tool_name(t.name, self.servers) for t in tools}
        missing = sorted(set(self.servers) - {s[0] for s in listed if s is not None})
        if missing:
            log.warning("session %s: MCP servers without tools (down or empty): %s", self._session_id, missing)
        return tools

    async def call(
        self, server: str, tool: str, arguments: struct_pb2.Struct, *, timeout: float
    ) -> mcp_proxy_pb2.McpProxyServiceCallToolResponse:
        """Calls one tool. Upstream failures come back as results with `is_error`; refusals by the proxy,
        and a proxy that cannot be reached (the call may or may not have run), raise `MeshError`."""
        proxy = self._require_proxy()
        token = await self._session_token()
        try:
            return await proxy.call_tool(token, server=server, tool=tool, arguments=arguments, timeout=timeout)
        except TokenInvalid:
            # Refused before anything ran upstream, so asking again with a new token cannot run it twice.
            token = await self._session_token(fresh=True)
            return await proxy.call_tool(token, server=server, tool=tool, arguments=arguments, timeout=timeout)
