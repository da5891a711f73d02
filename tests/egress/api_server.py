"""A private HTTPS API for the tests, on a loopback address other than 127.0.0.1 (inside a sandbox, 127.0.0.1
is the sandbox's own loopback and never proxied): it answers only requests carrying its key, echoes what it
was sent on `/echo`, and records every request. Its certificate comes from a CA of the test's own, which the
mcp_proxy is told to trust."""

from __future__ import annotations

import asyncio
import itertools
import json
import secrets
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from hands.egress_ca import CA_CERT, EgressCA


@dataclass
class ApiServer:
    """`https://<host>:<port>/` (or plain http): `/weather` needs `Authorization: Bearer <key>` (or
    `?key=<key>`), `/echo` answers with the request's headers and URL, `/encoded` does the same in a chosen
    Content-Encoding whatever the request accepts (see `_encoded`), `/redirect` sends the client elsewhere."""

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
        if request.path == "/encoded":
            return await _encoded(request, body)
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


def _encoder(coding: str, raw: bool) -> zlib._Compress | None:
    """A compressor for a coding this server can apply, or None for one it only names."""
    coding = coding.lower()
    if coding in ("gzip", "x-gzip"):
        return zlib.compressobj(wbits=16 + zlib.MAX_WBITS)
    if coding == "deflate":
        return zlib.compressobj(wbits=-zlib.MAX_WBITS if raw else zlib.MAX_WBITS)
    return None


def _encode(plain: Iterable[bytes], codings: list[str], raw: bool) -> Iterator[bytes]:
    """`plain`'s blocks with `codings` applied in order, each block flushed out as it comes (a gigabyte is never
    held at once, and the client gets it as it is made)."""
    layers = [encoder for encoder in (_encoder(c, raw) for c in codings) if encoder is not None]
    for block in plain:
        for layer in layers:
            block = layer.compress(block) + layer.flush(zlib.Z_SYNC_FLUSH)
        if block:
            yield block
    for index, layer in enumerate(layers):
        tail = layer.flush()
        for later in layers[index + 1 :]:
            tail = later.compress(tail)
        if tail:
            yield tail


def _zeros(count: int) -> Iterator[bytes]:
    block = bytes(1 << 20)
    for start in range(0, count, len(block)):
        yield block[: count - start]


async def _encoded(request: web.Request, body: bytes) -> web.StreamResponse:
    """`/echo`'s JSON sent encoded whatever the request's Accept-Encoding says. The query's `encoding` is the
    Content-Encoding (`deflate, gzip`: deflate applied first); the codings this server knows (gzip, x-gzip,
    deflate) are applied, deflate as raw deflate with `raw=1`, any other is only named. The JSON comes after
    `pad` dots and before `zeros` zero bytes, and is written in pieces of `piece` bytes, a little apart.
    `split=1` sends each coding in a Content-Encoding header of its own; `corrupt=garble` overwrites the middle
    of the encoded body, `corrupt=truncate` sends only its first half."""
    query = request.query
    codings = [c.strip() for c in query.get("encoding", "").split(",") if c.strip()]
    piece = int(query.get("piece", str(64 << 10)))
    echo = {"headers": dict(request.headers), "url": str(request.rel_url), "body": body.decode(errors="replace")}
    head = b"." * int(query.get("pad", "0")) + json.dumps(echo).encode()
    plain = itertools.chain([head], _zeros(int(query.get("zeros", "0"))))
    encoded: Iterable[bytes] = _encode(plain, codings, query.get("raw") == "1")
    if corrupt := query.get("corrupt"):
        whole = b"".join(encoded)
        middle = len(whole) // 2
        garbled = whole[:middle] + b"\xff" * 16 + whole[middle + 16 :]
        encoded = [garbled if corrupt == "garble" else whole[:middle]]
    response = web.StreamResponse(headers={"X-Seen-Authorization": request.headers.get("Authorization", "")})
    response.content_type = "application/json"
    if codings and query.get("split") == "1":
        for coding in codings:
            response.headers.add("Content-Encoding", coding)
    elif codings:
        response.headers["Content-Encoding"] = ", ".join(codings)
    await response.prepare(request)
    if request.method == "HEAD":
        return response  # aiohttp would send what is written, HEAD or not
    try:
        for block in encoded:
            for start in range(0, len(block), piece):
                await response.write(block[start : start + piece])
                # A little apart, and giving way to the client (in this process, in the tests), which then hangs
                # up on a bomb soon after it has had enough.
                await asyncio.sleep(0.001)
        await response.write_eof()
    except ConnectionError:
        pass  # the client hung up (the relay stops reading a bomb), which is no failure of this server
    return response
