"""The egress relay: HTTP requests a sandbox sends out, with its API keys put in on the way and taken out on
the way back.

A sandbox given `secrets` holds each API key only as a placeholder, an opaque string in an environment
variable. Its only way out is its proxy port, which hands relays here (`McpProxyService.RelayHttp`) with the
session's token. A request goes out only to a host that one of the sandbox's credentials allows, and only the
placeholders of the credentials that allow that host are replaced by their values, in the headers and the
URL (not in bodies). In the answer every value is replaced by its placeholder again, so an upstream that
echoes what it was sent cannot hand a key to the sandbox. Every other host is refused.
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

import aiohttp

from managed_agents.mesh.errors import InvalidArgument, NotGranted, Unavailable
from mcp_proxy.http_upstream import RelayedResponse, UpstreamHttp, host_allowed, host_of
from mcp_proxy.tokens import TokenAuthority
from mcp_proxy.vault import CredentialKind, Vault

log = logging.getLogger(__name__)

MAX_URL_CHARS = 8192
MAX_HEADERS = 100
MAX_HEADER_BYTES = 64 * 1024
MAX_CREDENTIALS = 16
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
PLACEHOLDER = re.compile(r"[A-Za-z0-9_]{16,128}")
# Hop-by-hop and proxy headers end at the relay; the proxy asks for an uncompressed answer, so that a value
# echoed in it can be found and taken out.
_DROPPED_REQUEST = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "accept-encoding",
    }
)
# The body may change length as values become placeholders, so length and framing are the relay's to set.
_DROPPED_RESPONSE = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "trailer", "transfer-encoding", "upgrade", "content-length"}
)
_TOKEN_CHARS = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


@dataclass(frozen=True, slots=True)
class Placeholder:
    """A credential of a sandbox and the text that stands for its value there."""

    credential: str
    placeholder: str


class Scrubber:
    """Replaces credential values by their placeholders in a byte stream that arrives in chunks, including a
    value cut in two by a chunk boundary."""

    def __init__(self, pairs: Sequence[tuple[bytes, bytes]]) -> None:
        pairs = [(value, placeholder) for value, placeholder in pairs if value]
        self._by_value = dict(pairs)
        # Longest first: a value that holds another is replaced whole.
        values = sorted(self._by_value, key=len, reverse=True)
        self._pattern = re.compile(b"|".join(re.escape(v) for v in values)) if values else None
        self._keep = max((len(v) for v in values), default=1) - 1
        self._carry = b""

    def _replace(self, data: bytes) -> bytes:
        assert self._pattern is not None
        return self._pattern.sub(lambda m: self._by_value[m.group(0)], data)

    def feed(self, chunk: bytes) -> bytes:
        """What can be passed on of `chunk`; the end that might begin a value waits for the next chunk."""
        if self._pattern is None:
            return chunk
        data = self._carry + chunk
        last_end = max((m.end() for m in self._pattern.finditer(data)), default=0)
        cut = max(0, len(data) - self._keep, last_end)
        self._carry = data[cut:]
        return self._replace(data[:cut])

    def finish(self) -> bytes:
        """Whatever was held back, once the stream has ended."""
        rest, self._carry = self._carry, b""
        return self._replace(rest) if self._pattern is not None and rest else rest

    def text(self, value: str) -> str:
        """`value` with every credential value replaced (for headers)."""
        if self._pattern is None:
            return value
        return self._replace(value.encode("latin-1", "replace")).decode("latin-1")


def check_request(
    url: str, method: str, headers: Sequence[tuple[str, str]], credentials: Sequence[Placeholder], *, allow_http: bool
) -> None:
    """Refuses a malformed relay request with a sentence naming the field."""
    if not credentials:
        raise InvalidArgument.field("head.credentials", "names no credential: this sandbox has no egress")
    if len(credentials) > MAX_CREDENTIALS:
        raise InvalidArgument.field("head.credentials", f"at most {MAX_CREDENTIALS} credentials")
    for index, item in enumerate(credentials):
        if not PLACEHOLDER.fullmatch(item.placeholder):
            raise InvalidArgument.field(
                f"head.credentials[{index}].placeholder", "must be 16 to 128 characters of [A-Za-z0-9_]"
            )
    if not url or len(url) > MAX_URL_CHARS or not url.isascii() or not url.isprintable() or " " in url:
        raise InvalidArgument.field("head.url", f"must be an ASCII URL of 1 to {MAX_URL_CHARS} characters")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  # raises ValueError on a malformed port
    except ValueError:
        raise InvalidArgument.field("head.url", "is not a URL") from None
    if parts.scheme not in ("https", "http") or not parts.hostname or parts.username or parts.password:
        raise InvalidArgument.field("head.url", "must be an absolute https:// URL with a host and no user")
    if parts.scheme == "http" and not allow_http:
        raise InvalidArgument.field(
            "head.url",
            "plain http:// is refused: keys go out over https only (the proxy runs without --egress-allow-http)",
        )
    if method not in METHODS:
        raise InvalidArgument.field("head.method", f"must be one of {', '.join(sorted(METHODS))}")
    if len(headers) > MAX_HEADERS or sum(len(k) + len(v) for k, v in headers) > MAX_HEADER_BYTES:
        raise InvalidArgument.field("head.headers", f"at most {MAX_HEADERS} headers and 64 KiB")
    for name, value in headers:
        if not _TOKEN_CHARS.fullmatch(name) or "\r" in value or "\n" in value or not value.isascii():
            raise InvalidArgument.field("head.headers", f"{name[:64]!r} is not a valid header")


class EgressRelay:
    """Relays sandboxes' HTTP requests for holders of session tokens."""

    def __init__(
        self, vault: Vault, tokens: TokenAuthority, upstream: UpstreamHttp, *, allow_http: bool = False
    ) -> None:
        self._vault = vault
        self._tokens = tokens
        self._upstream = upstream
        self._allow_http = allow_http

    async def relay(
        self,
        *,
        session_token: str,
        credentials: Sequence[Placeholder],
        url: str,
        method: str,
        headers: Sequence[tuple[str, str]],
        body: AsyncIterator[bytes],
    ) -> RelayedResponse:
        """Checks the request, puts the allowed values in and forwards it; the caller must drain the body."""
        grant = self._tokens.verify(session_token)
        check_request(url, method, headers, credentials, allow_http=self._allow_http)
        host = host_of(url)
        swaps: list[tuple[str, str]] = []  # (placeholder, value) of the credentials that allow this host
        scrub: list[tuple[bytes, bytes]] = []  # (value, placeholder) of every credential of the sandbox
        for item in credentials:
            if not grant.allows(item.credential):
                raise NotGranted(f"the session's token does not grant credential {item.credential!r}")
            record, secret = await self._vault.secret(item.credential)
            if record.spec.kind is not CredentialKind.API_KEY:
                raise NotGranted(f"credential {item.credential!r} is not an API key")
            scrub.append((secret.token.encode(), item.placeholder.encode()))
            if host_allowed(url, record.spec.allowed_hosts):
                swaps.append((item.placeholder, secret.token))
        if not swaps:
            names = ", ".join(sorted(c.credential for c in credentials))
            raise NotGranted(f"egress to {host} is refused: no credential of this sandbox ({names}) allows that host")

        def put_in(text: str) -> str:
            for placeholder, value in swaps:
                text = text.replace(placeholder, value)
            return text

        # The host was checked above and holds no placeholder (it is an allowed host), so what is put in lands in
        # the path or query and cannot move the request elsewhere.
        target = put_in(url)
        outgoing = [(k, put_in(v)) for k, v in headers if k.lower() not in _DROPPED_REQUEST]
        outgoing.append(("Accept-Encoding", "identity"))
        scrubber = Scrubber(scrub)
        first = await anext(aiter(body), None)

        async def rest() -> AsyncIterator[bytes]:
            assert first is not None
            yield first
            async for chunk in body:
                yield chunk

        try:
            response = await self._upstream.session().request(
                method,
                target,
                headers=outgoing,
                data=None if first is None else rest(),
                # A redirect is answered to the sandbox, whose next request comes through here and is checked.
                allow_redirects=False,
            )
        except (aiohttp.ClientError, TimeoutError, ValueError) as error:
            # Not the error's text: it may quote the URL, and with it a value put in.
            raise Unavailable(f"{host} could not be reached ({type(error).__name__})") from None
        log.info(
            "relayed %s %s%s for session %s: HTTP %d",
            method,
            host,
            urlsplit(url).path[:200],
            grant.session_id,
            response.status,
        )

        async def chunks() -> AsyncIterator[bytes]:
            try:
                async for chunk in response.content.iter_any():
                    if out := scrubber.feed(chunk):
                        yield out
                if out := scrubber.finish():
                    yield out
            finally:
                response.release()

        kept = [(k, scrubber.text(v)) for k, v in response.headers.items() if k.lower() not in _DROPPED_RESPONSE]
        return RelayedResponse(response.status, kept, chunks())
