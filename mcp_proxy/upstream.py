"""MCP client sessions to upstream servers over streamable HTTP, adding the vault's bearer token on the way.

One connection per MCP credential stays open and is shared by every call to that server: opening one costs
a TLS context, a protocol probe and a tool listing (tens of milliseconds), a call on an open one a few. Each
connection is owned by its own task, because the `mcp` client is a nest of anyio task groups that must be
entered and left in one task; calls are made from the callers' tasks, which the client supports. A
connection whose transport fails is retired and the next call opens a new one.

Authentication is an `httpx2.Auth` flow, so it applies to every HTTP request of a connection (probe, list,
call, event stream): it reads the current access token from the vault, and on a 401 refreshes it once and
resends the request. A refresh that fails leaves the 401 to the MCP client, which fails only that request;
the flow records why, so the caller's tool result can say so.

Upstream failures never escape as exceptions from `call_tool`: they become results with `is_error`, with a
sentence that names the server (never its URL, which may carry a key) and what went wrong.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import time
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import httpx2
import mcp_types
from mcp import Client, MCPError
from mcp.client.streamable_http import streamable_http_client

from managed_agents.mesh.errors import MeshError
from mcp_proxy.oauth import AccessTokens, OAuthError

log = logging.getLogger(__name__)

IMAGE_TYPES = frozenset({"image/png", "image/jpeg", "image/gif", "image/webp"})
# A tool result is written to the session log as one event (at most 4 MiB there); leave room for the rest.
MAX_RESULT_BYTES = 2 * 1024 * 1024
MAX_TOOL_PAGES = 20
_MAX_ERROR_CHARS = 300


class UpstreamError(Exception):
    """An upstream server could not be used; the message is a sentence naming the server and the cause."""


@dataclass(frozen=True, slots=True)
class McpEndpoint:
    """An MCP server as a credential describes it: the credential's name and the server's URL."""

    name: str
    url: str


@dataclass(frozen=True, slots=True)
class UpstreamTool:
    """A tool an upstream server offers, as it describes it."""

    name: str
    description: str
    input_schema: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Content:
    """One block of a tool result: text, or an image's bytes and media type."""

    kind: Literal["text", "image"]
    text: str = ""
    media_type: str = ""
    data: bytes = b""


@dataclass(frozen=True, slots=True)
class ToolResult:
    """A tool call's outcome; `is_error` when the tool or the way to it failed."""

    content: tuple[Content, ...]
    is_error: bool

    @classmethod
    def error(cls, sentence: str) -> ToolResult:
        """A failed call, explained in one text block."""
        return cls((Content("text", text=sentence),), is_error=True)


# Errors ------------------------------------------------------------------------------------------------


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        found: list[BaseException] = []
        for inner in exc.exceptions:
            found.extend(_leaves(inner))
        return found
    return [exc]


def _clip(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _MAX_ERROR_CHARS else text[:_MAX_ERROR_CHARS] + "..."


def _describe(exc: BaseException) -> str:
    """What went wrong, in words, from an exception (or group of them) the MCP client raised."""
    reasons = []
    for leaf in _leaves(exc):
        if isinstance(leaf, httpx2.ConnectError):
            reason = "the connection was refused or the host is unreachable"
        elif isinstance(leaf, httpx2.TimeoutException):
            reason = "the HTTP request timed out"
        elif isinstance(leaf, httpx2.HTTPError):
            reason = f"HTTP failed ({type(leaf).__name__})"
        elif isinstance(leaf, MCPError):
            reason = f"MCP error {leaf.code}: {_clip(leaf.message)}"
        elif isinstance(leaf, UpstreamError | OAuthError):
            reason = str(leaf)
        else:
            reason = f"{type(leaf).__name__}: {_clip(str(leaf))}" if str(leaf) else type(leaf).__name__
        if reason not in reasons:
            reasons.append(reason)
    return "; ".join(reasons) or type(exc).__name__


def _only_connect_errors(exc: BaseException | None) -> bool:
    return exc is not None and all(isinstance(leaf, httpx2.ConnectError) for leaf in _leaves(exc))


# Authentication ----------------------------------------------------------------------------------------


class _BearerAuth(httpx2.Auth):
    """Adds `Authorization: Bearer <access token>` from the vault; on a 401, refreshes once and resends."""

    # The body must be replayable, since a refused request is sent a second time.
    requires_request_body = True

    def __init__(self, name: str, tokens: AccessTokens) -> None:
        self._name = name
        self._tokens = tokens
        self.failure = ""
        self.failure_time = 0.0

    def _fail(self, sentence: str) -> None:
        self.failure, self.failure_time = sentence, time.monotonic()
        log.warning("%s", sentence)

    async def async_auth_flow(self, request: httpx2.Request) -> AsyncGenerator[httpx2.Request, httpx2.Response]:
        try:
            token = await self._tokens.current(self._name)
        except (OAuthError, MeshError) as exc:
            # Without a token the request goes out bare: the server refuses it, and the call says why.
            self._fail(f"MCP server {self._name!r} has no usable access token: {exc}")
            token = ""
        if token:
            request.headers["Authorization"] = f"Bearer {token}"
        response = yield request
        if response.status_code != 401:
            return
        try:
            token = await self._tokens.refreshed(self._name, refused=token)
        except (OAuthError, MeshError) as exc:
            self._fail(
                f"MCP server {self._name!r} refused the access token (HTTP 401), and it could not be refreshed: {exc}"
            )
            return
        request.headers["Authorization"] = f"Bearer {token}"
        response = yield request
        if response.status_code == 401:
            self._fail(
                f"MCP server {self._name!r} refused the credential (HTTP 401) even after its access token "
                "was refreshed; put a valid credential"
            )


# Connections -------------------------------------------------------------------------------------------


class _Connection:
    """One open MCP client session to one endpoint, owned by its own task."""

    def __init__(
        self,
        endpoint: McpEndpoint,
        tokens: AccessTokens,
        *,
        handshake_timeout: float,
        read_timeout: float,
    ) -> None:
        self.endpoint = endpoint
        self.auth = _BearerAuth(endpoint.name, tokens)
        self.failure: BaseException | None = None
        self._handshake_timeout = handshake_timeout
        self._read_timeout = read_timeout
        self._client: asyncio.Future[Client] = asyncio.get_running_loop().create_future()
        self._stop = asyncio.Event()
        self._task = asyncio.create_task(self._run(), name=f"mcp upstream {endpoint.name}")

    @property
    def alive(self) -> bool:
        """False once the session ended or is ending."""
        return not self._task.done() and not self._stop.is_set()

    async def _run(self) -> None:
        http = httpx2.AsyncClient(
            auth=self.auth,
            timeout=httpx2.Timeout(10.0, read=self._read_timeout),
            follow_redirects=False,
        )
        try:
            async with contextlib.AsyncExitStack() as stack:
                await stack.enter_async_context(http)
                async with asyncio.timeout(self._handshake_timeout):
                    client = await stack.enter_async_context(
                        Client(streamable_http_client(self.endpoint.url, http_client=http), mode="auto")
                    )
                self._client.set_result(client)
                await self._stop.wait()
        except asyncio.CancelledError:
            self._settle(UpstreamError(f"the connection to MCP server {self.endpoint.name!r} was closed"))
            raise
        except TimeoutError as exc:
            self.failure = exc
            self._settle(
                UpstreamError(
                    f"MCP server {self.endpoint.name!r} did not complete the MCP handshake within "
                    f"{self._handshake_timeout:g} s"
                )
            )
        except Exception as exc:  # the mcp client raises nested ExceptionGroups; all end this connection
            self.failure = exc
            self._settle(UpstreamError(self.explain(exc, since=0.0)))
            log.info("connection to MCP server %r ended: %s", self.endpoint.name, _describe(exc))

    def _settle(self, error: UpstreamError) -> None:
        if not self._client.done():
            self._client.set_exception(error)
            # Retrieved here so that an unawaited failure is not reported as "never retrieved".
            self._client.exception()

    def explain(self, exc: BaseException, *, since: float) -> str:
        """A sentence for a failure of this connection, preferring an authentication failure after `since`."""
        if self.auth.failure and self.auth.failure_time >= since:
            return self.auth.failure
        if isinstance(exc, UpstreamError):
            return str(exc)
        return f"MCP server {self.endpoint.name!r} failed: {_describe(exc)}"

    async def client(self) -> Client:
        """The connected client, once the handshake is done; raises `UpstreamError` if it failed."""
        return await asyncio.shield(self._client)

    async def ended(self, within: float) -> None:
        """Waits up to `within` seconds for the owner task to finish (so `failure` is known)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._task), within)

    async def aclose(self, within: float = 5.0) -> None:
        """Ends the session (the client says goodbye to the server), cancelling it if that takes longer."""
        self._stop.set()
        try:
            await asyncio.wait_for(asyncio.shield(self._task), within)
        except TimeoutError:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


# Results -----------------------------------------------------------------------------------------------


def _content(blocks: list[Any], structured: object) -> tuple[Content, ...]:
    out: list[Content] = []
    budget = MAX_RESULT_BYTES
    for block in blocks:
        item: Content | None
        if isinstance(block, mcp_types.TextContent):
            item = Content("text", text=block.text) if block.text else None
        elif isinstance(block, mcp_types.ImageContent) and block.mime_type in IMAGE_TYPES:
            try:
                item = Content("image", media_type=block.mime_type, data=base64.b64decode(block.data))
            except (binascii.Error, ValueError):
                item = Content("text", text=f"[an image ({block.mime_type}) that was not valid base64]")
        elif isinstance(block, mcp_types.ImageContent | mcp_types.AudioContent):
            item = Content("text", text=f"[{block.type} content of type {block.mime_type} left out]")
        elif isinstance(block, mcp_types.ResourceLink):
            item = Content("text", text=f"[resource link: {block.uri}{f' ({block.name})' if block.name else ''}]")
        elif isinstance(block, mcp_types.EmbeddedResource):
            resource = block.resource
            if isinstance(resource, mcp_types.TextResourceContents):
                item = Content("text", text=f"[resource {resource.uri}]\n{resource.text}")
            else:
                item = Content("text", text=f"[binary resource {resource.uri} ({resource.mime_type}) left out]")
        else:
            item = Content("text", text=f"[{getattr(block, 'type', type(block).__name__)} content left out]")
        if item is None:
            continue
        size = len(item.text.encode()) + len(item.data)
        if size > budget:
            if item.kind == "text" and budget > 256:
                cut = item.text.encode()[: budget - 128].decode(errors="ignore")
                out.append(Content("text", text=f"{cut}\n[truncated: the result exceeds {MAX_RESULT_BYTES} bytes]"))
            else:
                out.append(Content("text", text=f"[content left out: the result exceeds {MAX_RESULT_BYTES} bytes]"))
            break
        budget -= size
        out.append(item)
    if not out and structured is not None:
        out.append(Content("text", text=json.dumps(structured, ensure_ascii=False)[:MAX_RESULT_BYTES]))
    if not out:
        out.append(Content("text", text="(the tool returned no content)"))
    return tuple(out)


# The pool ----------------------------------------------------------------------------------------------


class UpstreamPool:
    """Open MCP connections by credential name, and the two operations the proxy needs of them."""

    def __init__(
        self,
        tokens: AccessTokens,
        *,
        handshake_timeout: float = 10.0,
        max_call_seconds: float = 600.0,
    ) -> None:
        self._tokens = tokens
        self._handshake_timeout = handshake_timeout
        # HTTP reads may legitimately wait as long as the longest call; the call's own deadline is the limit.
        self._read_timeout = max_call_seconds + 30.0
        self._connections: dict[str, _Connection] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self._closed = False

    def _connection(self, endpoint: McpEndpoint) -> tuple[_Connection, bool]:
        """The open connection to `endpoint` (False) or a new one (True); no await, so no race."""
        if self._closed:
            raise UpstreamError("the proxy is shutting down")
        current = self._connections.get(endpoint.name)
        if current is not None and current.endpoint == endpoint and current.alive:
            return current, False
        if current is not None:
            self._retire(current)
        fresh = _Connection(
            endpoint, self._tokens, handshake_timeout=self._handshake_timeout, read_timeout=self._read_timeout
        )
        self._connections[endpoint.name] = fresh
        return fresh, True

    def _retire(self, connection: _Connection) -> None:
        if self._connections.get(connection.endpoint.name) is connection:
            del self._connections[connection.endpoint.name]
        task = asyncio.create_task(connection.aclose())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def forget(self, name: str) -> None:
        """Closes the connection of credential `name` (it was replaced or deleted)."""
        current = self._connections.get(name)
        if current is not None:
            self._retire(current)

    async def _unsent(self, connection: _Connection, exc: BaseException) -> bool:
        """True if the failed request certainly never ran upstream, so it may be sent again."""
        if isinstance(exc, MCPError) and exc.code == mcp_types.INVALID_REQUEST and exc.message == "Session terminated":
            return True  # the server restarted and forgot the session: it did not run the request
        if isinstance(exc, MCPError) and exc.code == mcp_types.CONNECTION_CLOSED:
            await connection.ended(1.0)
            return _only_connect_errors(connection.failure)
        return isinstance(exc, UpstreamError) and _only_connect_errors(connection.failure)

    async def list_tools(self, endpoint: McpEndpoint, *, time_limit: float) -> list[UpstreamTool]:
        """Every tool `endpoint` offers; raises `UpstreamError` with a sentence if it cannot say."""
        started = time.monotonic()
        try:
            async with asyncio.timeout(time_limit):
                for attempt in (1, 2):
                    connection, fresh = self._connection(endpoint)
                    try:
                        return await self._list(await connection.client())
                    except Exception as exc:
                        if not connection.alive or isinstance(exc, MCPError):
                            self._retire(connection)
                        # Listing is harmless to repeat: a stale pooled session gets one fresh try.
                        if attempt == 1 and not fresh:
                            continue
                        raise UpstreamError(connection.explain(exc, since=started)) from None
        except TimeoutError:
            raise UpstreamError(
                f"MCP server {endpoint.name!r} did not list its tools within {time_limit:g} s"
            ) from None
        raise AssertionError("unreachable")

    @staticmethod
    async def _list(client: Client) -> list[UpstreamTool]:
        tools: list[UpstreamTool] = []
        cursor: str | None = None
        for _ in range(MAX_TOOL_PAGES):
            page = await client.list_tools(cursor=cursor)
            tools.extend(UpstreamTool(t.name, t.description or "", dict(t.input_schema)) for t in page.tools)
            cursor = page.next_cursor
            if not cursor:
                break
        return tools

    async def call_tool(
        self, endpoint: McpEndpoint, tool: str, arguments: Mapping[str, Any], *, time_limit: float
    ) -> ToolResult:
        """Calls `tool` on `endpoint`; any upstream failure (down, slow, refused) is an error result."""
        started = time.monotonic()
        try:
            async with asyncio.timeout(time_limit):
                for attempt in (1, 2):
                    connection, fresh = self._connection(endpoint)
                    try:
                        result = await (await connection.client()).call_tool(tool, dict(arguments))
                    except Exception as exc:
                        unsent = await self._unsent(connection, exc)
                        if not connection.alive or unsent:
                            self._retire(connection)
                        # A tool call is not safe to repeat unless it certainly never reached the server.
                        if attempt == 1 and not fresh and unsent:
                            log.info(
                                "call to MCP server %r was not delivered; retrying on a new connection",
                                endpoint.name,
                            )
                            continue
                        sentence = connection.explain(exc, since=started)
                        log.warning("call of %r on MCP server %r failed: %s", tool, endpoint.name, sentence)
                        return ToolResult.error(f"The call of tool {tool!r} failed. {sentence}")
                    return ToolResult(_content(list(result.content), result.structured_content), result.is_error)
        except TimeoutError:
            log.warning("call of %r on MCP server %r timed out after %g s", tool, endpoint.name, time_limit)
            return ToolResult.error(
                f"The call of tool {tool!r} failed: MCP server {endpoint.name!r} did not answer within "
                f"{time_limit:g} s. The call may or may not have taken effect upstream."
            )
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        """Closes every connection."""
        self._closed = True
        for connection in list(self._connections.values()):
            self._retire(connection)
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
