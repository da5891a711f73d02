"""A real upstream for the proxy's tests: an MCP server built with the `mcp` SDK (`MCPServer`) that demands a
bearer token, beside the OAuth token endpoint that issues those tokens, served by uvicorn on loopback.

Only the outermost boundary is stood up here; nothing of the proxy is faked. The server keeps score of what
reached it (tokens presented, refreshes granted) so tests can prove the proxy did what it says.
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import socket
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

import uvicorn
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp_types import ImageContent

from managed_agents.v1 import mcp_proxy_pb2

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

# The 8-byte PNG signature and nothing more: enough to tell image bytes from text on the way back.
PNG = b"\x89PNG\r\n\x1a\n"


def free_port() -> int:
    """A loopback port nobody listens on (bound, read, released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def build_mcp(name: str, calls: list[str] | None = None) -> MCPServer:
    """The MCP server's tools: arithmetic, echo, a slow one, a failing one and an image. The names of the
    tools called that count (add, echo, slow) are appended to `calls`, in order."""
    mcp = MCPServer(name)
    called = calls if calls is not None else []

    @mcp.tool()
    def add(a: int, b: int) -> int:
        """Adds two integers."""
        called.append("add")
        return a + b

    @mcp.tool()
    def echo(text: str) -> str:
        """Returns its input."""
        called.append("echo")
        return text

    @mcp.tool()
    async def slow(seconds: float) -> str:
        """Sleeps, then answers."""
        called.append("slow")
        await asyncio.sleep(seconds)
        return "finally"

    @mcp.tool()
    def fail() -> str:
        """Always fails."""
        raise ToolError("the tool failed on purpose")

    @mcp.tool()
    def picture() -> ImageContent:
        """Returns a (tiny) PNG."""
        return ImageContent(type="image", data=base64.b64encode(PNG).decode(), mime_type="image/png")

    return mcp


@dataclass
class Upstream:
    """An MCP server at `/mcp` requiring `Authorization: Bearer <accepted token>`, and its token endpoint."""

    name: str = "files"
    access_token: str = field(default_factory=lambda: "access-" + secrets.token_urlsafe(16))
    refresh_token: str = field(default_factory=lambda: "refresh-" + secrets.token_urlsafe(16))
    client_id: str = "proxy-client"
    client_secret: str = field(default_factory=lambda: "client-secret-" + secrets.token_urlsafe(16))
    rotate_refresh_tokens: bool = True
    port: int = 0
    accepted: set[str] = field(default_factory=set)
    presented: list[str] = field(default_factory=list)
    issued: list[str] = field(default_factory=list)
    refreshes: int = 0
    refused: int = 0
    calls: list[str] = field(default_factory=list)
    _server: uvicorn.Server | None = None
    _task: asyncio.Task[None] | None = None

    def __post_init__(self) -> None:
        self.accepted.add(self.access_token)
        self._valid_refresh = {self.refresh_token}

    @property
    def url(self) -> str:
        """The MCP endpoint."""
        return f"http://127.0.0.1:{self.port}/mcp"

    @property
    def token_endpoint(self) -> str:
        """The OAuth token endpoint."""
        return f"http://127.0.0.1:{self.port}/token"

    def expire_access_tokens(self) -> None:
        """Every access token issued so far stops working, as at expiry."""
        self.accepted.clear()

    async def _reply(self, send: Send, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
        if status == 401:
            headers.append((b"www-authenticate", b'Bearer error="invalid_token"'))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": data})

    async def _token(self, receive: Receive, send: Send) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        form = {k: v[0] for k, v in parse_qs(body.decode()).items()}
        if (
            form.get("grant_type") != "refresh_token"
            or form.get("client_id") != self.client_id
            or form.get("client_secret") != self.client_secret
            or form.get("refresh_token") not in self._valid_refresh
        ):
            await self._reply(send, 400, {"error": "invalid_grant"})
            return
        self.refreshes += 1
        new_access = f"access-{self.refreshes}-" + secrets.token_urlsafe(16)
        self.accepted.add(new_access)
        self.issued.append(new_access)
        grant: dict[str, Any] = {"access_token": new_access, "token_type": "Bearer", "expires_in": 3600}
        if self.rotate_refresh_tokens:
            new_refresh = f"refresh-{self.refreshes}-" + secrets.token_urlsafe(16)
            self._valid_refresh = {new_refresh}
            self.issued.append(new_refresh)
            grant["refresh_token"] = new_refresh
        await self._reply(send, 200, grant)

    def _app(self) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
        mcp_app = build_mcp(self.name, self.calls).streamable_http_app(host="127.0.0.1")

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http":
                await mcp_app(scope, receive, send)  # lifespan: runs the MCP session manager
                return
            if scope["path"] == "/token":
                await self._token(receive, send)
                return
            header = dict(scope["headers"]).get(b"authorization", b"").decode()
            token = header.removeprefix("Bearer ")
            self.presented.append(token)
            if not header.startswith("Bearer ") or token not in self.accepted:
                self.refused += 1
                await self._reply(send, 401, {"error": "invalid_token"})
                return
            await mcp_app(scope, receive, send)

        return app

    async def start(self) -> Upstream:
        """Serves on `port` (a free one if 0) until `stop()`."""
        config = uvicorn.Config(
            self._app(),
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
            lifespan="on",
            timeout_graceful_shutdown=1,
        )
        self._server = uvicorn.Server(config)
        self._task = asyncio.create_task(self._server.serve())
        while not self._server.started:
            if self._task.done():
                await self._task
                raise RuntimeError("the upstream MCP server did not start")
            await asyncio.sleep(0.01)
        self.port = int(self._server.servers[0].sockets[0].getsockname()[1])
        return self

    async def stop(self) -> None:
        """Stops serving (the port stays this upstream's, so `start()` serves there again)."""
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            await self._task
            self._server = self._task = None


def credential_for(
    upstream: Upstream, *, name: str = "", token: str | None = None, token_ttl: float = 0.0
) -> tuple[mcp_proxy_pb2.Credential, mcp_proxy_pb2.CredentialSecret]:
    """The vault entry that lets the proxy reach `upstream` (its current tokens unless told otherwise)."""
    credential = mcp_proxy_pb2.Credential(
        name=name or upstream.name,
        kind=mcp_proxy_pb2.CREDENTIAL_KIND_MCP_OAUTH,
        mcp_server_url=upstream.url,
        token_endpoint=upstream.token_endpoint,
        client_id=upstream.client_id,
    )
    secret = mcp_proxy_pb2.CredentialSecret(
        token=upstream.access_token if token is None else token,
        refresh_token=upstream.refresh_token,
        client_secret=upstream.client_secret,
    )
    if token_ttl:
        secret.token_ttl.FromNanoseconds(int(token_ttl * 1e9))
    return credential, secret
