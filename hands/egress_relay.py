"""Outbound HTTP for sandboxes that hold API keys only as placeholders.

A sandbox provisioned with `secrets` gets, for each, an environment variable holding an opaque placeholder,
and `HTTP_PROXY`/`HTTPS_PROXY` pointing at a door on its own loopback (`EGRESS_PORT`), its only way out. The
door leads here: an HTTP proxy on a Unix socket of the hands server. Plain requests arrive in absolute form;
HTTPS arrives as `CONNECT`, whose TLS this relay ends with a certificate from the `EgressCA` the sandbox
trusts, so that it can read each request. Every request then goes to the mcp_proxy's `RelayHttp` with the
session's token and the sandbox's placeholders; the proxy refuses hosts no credential allows, puts the values
in, makes the request (checking the real host's certificate) and takes the values out of the answer again.
Nothing here holds a key; the sandbox holds neither a key nor the session token.

Each connection carries one request (`Connection: close`), which every HTTP client handles.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets as random
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from urllib.parse import urlsplit

from hands.backend import EGRESS_CA_FILE
from hands.doors import EGRESS_PORT
from hands.egress_ca import EgressCA
from managed_agents.mesh.errors import FailedPrecondition, InvalidArgument, MeshError
from managed_agents.v1 import mcp_proxy_pb2, sandbox_pb2
from mcp_proxy.client import McpProxyClient

log = logging.getLogger(__name__)

MAX_SECRETS = 16
MAX_HEAD_BYTES = 64 * 1024
_ENV = re.compile(r"[A-Z_][A-Z0-9_]{0,63}")
_NAME = re.compile(r"[a-z0-9_-]{1,64}")
# Names a sandbox must not shadow: the relay's own variables, and what the shell needs to work.
_RESERVED_ENV = frozenset(
    {"PATH", "HOME", "PWD", "SHELL", "USER", "LANG", "TERM", "HOSTNAME", "NO_PROXY", "HTTP_PROXY", "HTTPS_PROXY"}
    | {"SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "NODE_EXTRA_CA_CERTS", "GIT_SSL_CAINFO", "PIP_CERT"}
)
# Headers that end here: this relay frames the request anew (and answers `Expect` itself).
_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "proxy-authorization", "te", "trailer", "upgrade", "expect"}
    | {"transfer-encoding"}
)
# How a refusal by the proxy reaches the sandbox's program; anything else is the relay failing (502).
_REFUSAL_STATUS = {"PERMISSION_DENIED": 403, "UNAUTHENTICATED": 403, "INVALID_ARGUMENT": 400}


@dataclass(frozen=True, slots=True)
class SecretPlaceholder:
    """An API key a sandbox may use: the variable that holds its placeholder, the vault credential, and the
    placeholder itself (random, made at provisioning, and no secret)."""

    env: str
    credential: str
    placeholder: str


def secrets_from(resources: sandbox_pb2.Resources) -> list[SecretPlaceholder]:
    """The checked secrets of a `Provision`, each with a fresh placeholder; raises `InvalidArgument`."""
    if len(resources.secrets) > MAX_SECRETS:
        raise InvalidArgument.field("resources.secrets", f"at most {MAX_SECRETS} secrets")
    if resources.secrets and resources.network == sandbox_pb2.NETWORK_POLICY_NONE:
        raise InvalidArgument.field(
            "resources.network", "NETWORK_POLICY_NONE leaves no way to use resources.secrets; leave it unset"
        )
    if not resources.secrets and resources.network == sandbox_pb2.NETWORK_POLICY_EGRESS_RELAY:
        raise InvalidArgument.field(
            "resources.network",
            "NETWORK_POLICY_EGRESS_RELAY reaches only the hosts of resources.secrets, and there are none",
        )
    found: list[SecretPlaceholder] = []
    for index, given in enumerate(resources.secrets):
        field = f"resources.secrets[{index}]"
        if not _ENV.fullmatch(given.env):
            raise InvalidArgument.field(
                f"{field}.env", "must be 1 to 64 characters of [A-Z0-9_], not starting with a digit"
            )
        if given.env in _RESERVED_ENV:
            raise InvalidArgument.field(f"{field}.env", f"{given.env} is set by the sandbox itself")
        if any(s.env == given.env for s in found):
            raise InvalidArgument.field(f"{field}.env", f"{given.env} is named twice")
        if not _NAME.fullmatch(given.credential):
            raise InvalidArgument.field(
                f"{field}.credential", "must name an API-key credential of the vault ([a-z0-9_-])"
            )
        found.append(SecretPlaceholder(given.env, given.credential, f"ma_placeholder_{random.token_hex(16)}"))
    return found


def sandbox_environment(secrets: Sequence[SecretPlaceholder], control_inside: str) -> dict[str, str]:
    """What a sandbox with secrets has in its environment: the placeholders, the way out and the CA to trust."""
    if not secrets:
        return {}
    proxy = f"http://127.0.0.1:{EGRESS_PORT}"
    ca = f"{control_inside}/{EGRESS_CA_FILE}"
    environment = {s.env: s.placeholder for s in secrets}
    # The sandbox's own loopback (the git relay's door among it) is not a way out.
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        environment[name] = proxy
    environment["NO_PROXY"] = environment["no_proxy"] = "127.0.0.1,localhost,::1"
    for name in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "NODE_EXTRA_CA_CERTS", "GIT_SSL_CAINFO"):
        environment[name] = ca
    environment["PIP_CERT"] = ca
    return environment


class _BadRequest(Exception):
    """The sandbox sent something that is not an HTTP request this relay understands."""


@dataclass(slots=True)
class _Request:
    method: str
    target: str
    headers: list[tuple[str, str]]

    def header(self, name: str) -> str:
        return next((v for k, v in self.headers if k.lower() == name), "")


async def _read_request(reader: asyncio.StreamReader) -> _Request | None:
    """The request line and headers; None if the connection closed before any."""
    try:
        raw = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as error:
        if not error.partial.strip():
            return None
        raise _BadRequest("the request ended inside its head") from None
    except asyncio.LimitOverrunError:
        raise _BadRequest(f"the request head is longer than {MAX_HEAD_BYTES} bytes") from None
    lines = raw.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise _BadRequest(f"{lines[0][:100]!r} is not an HTTP/1.x request line")
    headers = []
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise _BadRequest(f"{line[:100]!r} is not a header")
        headers.append((name, value.strip()))
    return _Request(parts[0].upper(), parts[1], headers)


async def _body(reader: asyncio.StreamReader, request: _Request) -> AsyncIterator[bytes]:
    """The request body as it arrives: by `Content-Length`, or chunked."""
    if "chunked" in request.header("transfer-encoding").lower():
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                # Trailers, if any, end with an empty line.
                trailer = await reader.readuntil(b"\r\n")
                while trailer != b"\r\n":
                    trailer = await reader.readuntil(b"\r\n")
                return
            async for piece in _pieces(reader, size):
                yield piece
            await reader.readexactly(2)
    length = request.header("content-length")
    async for piece in _pieces(reader, int(length) if length.isdigit() else 0):
        yield piece


async def _pieces(reader: asyncio.StreamReader, size: int) -> AsyncIterator[bytes]:
    """The next `size` bytes, in pieces of at most 256 KiB (a body is never held whole)."""
    while size > 0:
        piece = await reader.read(min(size, 256 * 1024))
        if not piece:
            raise _BadRequest("the request body ended early")
        size -= len(piece)
        yield piece


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


async def _answer(writer: asyncio.StreamWriter, status: int, text: str) -> None:
    """An answer of the relay's own, with a sentence the sandbox's program (and so the model) can read."""
    body = text.encode()
    writer.write(
        f"HTTP/1.1 {status} {_reason(status)}\r\nContent-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
        + body
    )
    with contextlib.suppress(ConnectionError):
        await writer.drain()


class SandboxEgress:
    """The egress relay of one sandbox: an HTTP proxy on a Unix socket here, which the sandbox's door on
    `EGRESS_PORT` leads to."""

    def __init__(
        self, proxy: McpProxyClient, secrets: Sequence[SecretPlaceholder], ca: EgressCA, socket_path: Path
    ) -> None:
        self.secrets = list(secrets)
        self.socket = socket_path
        self._proxy = proxy
        self._ca = ca
        self._token = ""
        self._server: asyncio.Server | None = None

    def update_token(self, token: str) -> None:
        """Uses `token` for the sandbox's requests from now on."""
        if token:
            self._token = token

    async def start(self) -> None:
        """Serves the Unix socket."""
        self.socket.unlink(missing_ok=True)
        self._server = await asyncio.start_unix_server(self._connection, path=str(self.socket), limit=MAX_HEAD_BYTES)

    async def aclose(self) -> None:
        """Stops serving."""
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
        self.socket.unlink(missing_ok=True)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await _read_request(reader)
            if request is None:
                return
            if request.method == "CONNECT":
                host, _, port = request.target.rpartition(":")
                if not host or not port.isdigit():
                    await _answer(writer, 400, f"CONNECT needs host:port, not {request.target[:100]!r}\n")
                    return
                context = await asyncio.to_thread(self._ca.server_context, host.strip("[]"))
                # No await between the answer and the switch to TLS: the client's first TLS bytes must reach
                # the TLS layer, not the plain reader's buffer (where the handshake would wait for them forever).
                writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
                await writer.start_tls(context)
                inner = await _read_request(reader)
                if inner is None:
                    return
                if not inner.target.startswith("/"):
                    await _answer(writer, 400, "inside a CONNECT tunnel, requests name a path (/...), not a URL\n")
                    return
                origin = f"https://{request.target}" if port != "443" else f"https://{host}"
                await self._relay(inner, origin + inner.target, reader, writer)
            elif request.target.startswith("http://"):
                await self._relay(request, request.target, reader, writer)
            else:
                await _answer(
                    writer,
                    400,
                    "this is the sandbox's egress relay: send requests through it as a proxy "
                    "(HTTP_PROXY/HTTPS_PROXY are set), not to it\n",
                )
        except (_BadRequest, ValueError) as error:
            with contextlib.suppress(Exception):
                await _answer(writer, 400, f"the egress relay could not read the request: {error}\n")
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError) as error:
            # The sandbox's program went away, or refused the relay's TLS (it does not trust the CA).
            log.info("egress relay: connection ended early: %r", error)
        except Exception:
            log.exception("egress relay: unexpected failure")
            with contextlib.suppress(Exception):
                await _answer(writer, 502, "the egress relay failed; see the hands server's log\n")
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _relay(
        self, request: _Request, url: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        if not self._token:
            await _answer(
                writer,
                503,
                "the egress relay has no session token yet (the hands server restarted); retry after the next "
                "tool call\n",
            )
            return
        if request.header("expect").lower() == "100-continue":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            await writer.drain()
        head = mcp_proxy_pb2.RelayHttpRequestHead(
            session_token=self._token,
            credentials=[
                mcp_proxy_pb2.PlaceholderCredential(credential=s.credential, placeholder=s.placeholder)
                for s in self.secrets
            ],
            url=url,
            method=request.method,
            headers=[
                mcp_proxy_pb2.HttpHeader(name=k, value=v) for k, v in request.headers if k.lower() not in _HOP_BY_HOP
            ],
        )
        try:
            answer, chunks = await self._proxy.relay_http(head, _body(reader, request))
        except MeshError as error:
            status = _REFUSAL_STATUS.get(error.code.name, 502)
            log.warning("egress relay refused %s %s: %s", request.method, urlsplit(url).netloc, error)
            await _answer(writer, status, f"refused by the egress relay: {error}\n")
            return
        lines = [f"HTTP/1.1 {answer.status} {_reason(answer.status)}"]
        lines += [f"{h.name}: {h.value}" for h in answer.headers]
        lines.append("Connection: close")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace"))
        try:
            async for chunk in chunks:
                if request.method != "HEAD":
                    writer.write(chunk)
                    await writer.drain()
        except MeshError as error:
            log.warning("egress relay: the answer from %s broke off: %s", urlsplit(url).netloc, error)


class EgressRelays:
    """Makes the egress relays of this server's sandboxes; they share one CA and reach one mcp_proxy."""

    def __init__(self, proxy: McpProxyClient | None, ca_dir: Path) -> None:
        self._proxy = proxy
        self._ca_dir = ca_dir
        self._ca: EgressCA | None = None

    def ca(self) -> EgressCA:
        """The CA, loaded (or made) on first use."""
        if self._ca is None:
            self._ca = EgressCA.load_or_create(self._ca_dir)
        return self._ca

    async def open(self, secrets: Sequence[SecretPlaceholder], control: Path, socket_path: Path) -> SandboxEgress:
        """A started relay for a sandbox's secrets, the CA it must trust written to its control directory."""
        if self._proxy is None:
            raise FailedPrecondition(
                "this hands server has no mcp_proxy (--proxy is empty), so it cannot relay a sandbox's secrets"
            )
        ca = await asyncio.to_thread(self.ca)
        (control / EGRESS_CA_FILE).write_bytes(ca.cert_pem)
        relay = SandboxEgress(self._proxy, secrets, ca, socket_path)
        await relay.start()
        return relay
