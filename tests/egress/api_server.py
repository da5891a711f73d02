"""A private HTTPS API for the tests, on a loopback address other than 127.0.0.1 (inside a sandbox, 127.0.0.1
is the sandbox's own loopback and never proxied): it answers only requests carrying its key, echoes what it
was sent on `/echo`, and records every request. Its certificate comes from a CA of the test's own, which the
mcp_proxy is told to trust."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from hands.egress_ca import CA_CERT, EgressCA


@dataclass
class ApiServer:
    """`https://<host>:<port>/` (or plain http): `/weather` needs `Authorization: Bearer <key>` (or
    `?key=<key>`), `/echo` answers with the request's headers and URL, `/redirect` sends the client elsewhere."""

    ca_dir: Path
    host: str = "127.0.0.2"
    tls: bool = True
    key: str = field(default_factory=lambda: "sk-live-" + secrets.token_urlsafe(24))
    port: int = 0
    requests: list[tuple[str, str, bool]] = field(default_factory=list)  # (method, path, key present)
    _runner: web.AppRunner | None = None

    @property
    def ca_file(self) -> Path:
        """The CA certificate to trust for this server."""
        return self.ca_dir / CA_CERT

    @property
    def base_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"

    @property
    def allowed_host(self) -> str:
        return f"{self.host}:{self.port}"

    def _authorized(self, request: web.Request) -> bool:
        return request.headers.get("Authorization") == f"Bearer {self.key}" or request.query.get("key") == self.key

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        authorized = self._authorized(request)
        self.requests.append((request.method, request.path, authorized or self.key in request.path_qs))
        if request.path == "/echo":
            return web.json_response(
                {"headers": dict(request.headers), "url": str(request.rel_url), "body": body.decode(errors="replace")},
                headers={"X-Seen-Authorization": request.headers.get("Authorization", "")},
            )
        if request.path == "/redirect":
            raise web.HTTPFound("https://example.invalid/elsewhere")
        if not authorized:
            return web.json_response({"error": "missing or wrong API key"}, status=401)
        if request.path == "/weather":
            return web.json_response({"city": request.query.get("city", "Lisbon"), "sky": "clear", "bytes": len(body)})
        return web.json_response({"error": "no such endpoint"}, status=404)

    async def start(self) -> ApiServer:
        context = EgressCA.load_or_create(self.ca_dir).server_context(self.host) if self.tls else None
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, 0, ssl_context=context)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
