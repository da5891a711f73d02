"""The egress relay: HTTP requests a sandbox sends out, with its API keys put in on the way and taken out on
the way back.

A sandbox given `secrets` holds each API key only as a placeholder, an opaque string in an environment
variable. Its only way out is its proxy port, which hands relays here (`McpProxyService.RelayHttp`) with the
session's token. A request goes out only to a host that one of the sandbox's credentials allows, and only the
placeholders of the credentials that allow that host are replaced by their values, in the headers and the
URL (not in bodies). In the answer every value is replaced by its placeholder again, so an upstream that
echoes what it was sent cannot hand a key to the sandbox. Every other host is refused.

Values can only be taken out of bytes the relay can read, so the relay asks for an uncompressed answer and
undoes whatever coding comes anyway: gzip (and x-gzip) and deflate (zlib-wrapped or raw), stacked up to
`MAX_CODINGS` deep, as content codings or as transfer codings before `chunked`. It decodes as the answer
streams, a bounded piece at a time, and the sandbox gets the decoded, scrubbed body without
`Content-Encoding`. An answer in any other coding (br, zstd, compress, anything unknown) is refused whole
(the sandbox's relay answers 502 with the reason); an encoded body that turns out corrupt, truncated, or to
decode past `DecodeLimits` is cut off there with an error, never passed on raw.
"""

from __future__ import annotations

import logging
import re
import zlib
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
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
# echoed in it can be found and taken out. The request's own `Content-Encoding` passes: values are put in the
# headers and the URL only, so a compressed request body holds none of them, and it goes to the upstream.
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
# The body may change length as values become placeholders, so length and framing are the relay's to set; it
# is always sent decoded, so no coding is named either.
_DROPPED_RESPONSE = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
        "content-encoding",
    }
)
_TOKEN_CHARS = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
# The codings the relay can undo, by the names HTTP gives them (x-gzip is gzip's old name, RFC 9110 8.4.1.3).
_DECODABLE = {"gzip": "gzip", "x-gzip": "gzip", "deflate": "deflate"}
# More layers than any server has a reason to stack: past this, an answer is refused rather than unwrapped.
MAX_CODINGS = 4
_GZIP_WBITS = 16 + zlib.MAX_WBITS


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


@dataclass(frozen=True, slots=True)
class DecodeLimits:
    """How far the relay follows an encoded answer. A small encoded body may unpack into gigabytes (a
    decompression bomb), so decoding stops once more than `max_bytes` have come out, or more than `ratio_floor`
    and `max_ratio` times the encoded bytes fed in so far. zlib is fed `fed` encoded bytes and asked for `piece`
    decoded bytes at a time, so no chunk, however small, becomes more than that in memory at once."""

    max_bytes: int = 256 << 20
    max_ratio: int = 200
    ratio_floor: int = 16 << 20
    piece: int = 64 << 10
    fed: int = 16 << 10


class EncodingRefused(ValueError):
    """The answer is in codings the relay cannot undo; the message completes "the upstream answered in ..."."""


class BrokenEncoding(ValueError):
    """The encoded body cannot be decoded (further): corrupt, truncated, or past a `DecodeLimits` bound."""


def _tokens(values: Iterable[str]) -> list[str]:
    """The codings named by every header of one name, in order (`gzip, deflate` and repeated headers alike)."""
    return [token for value in values for token in (t.strip().lower() for t in value.split(",")) if token]


def codings_to_undo(content_encoding: Iterable[str], transfer_encoding: Iterable[str]) -> list[str]:
    """The codings (`gzip` or `deflate`) applied to an answer's body, in the order they were applied, from its
    `Content-Encoding` and `Transfer-Encoding` headers (a final `chunked` excepted: the HTTP client undid it).
    Raises `EncodingRefused` for any coding the relay cannot undo, and for too many."""
    transfer = _tokens(transfer_encoding)
    if transfer and transfer[-1] == "chunked":
        transfer.pop()
    # Content codings are the representation's; transfer codings were applied on top, for the trip.
    applied = [token for token in _tokens(content_encoding) + transfer if token != "identity"]
    unknown = sorted({token for token in applied if token not in _DECODABLE})
    if unknown:
        raise EncodingRefused(f"an encoding the egress relay cannot check for secrets ({', '.join(unknown)[:100]})")
    if len(applied) > MAX_CODINGS:
        raise EncodingRefused(
            f"{len(applied)} stacked encodings, more than the {MAX_CODINGS} the egress relay checks for secrets"
        )
    return [_DECODABLE[token] for token in applied]


def _zlib_header(first: bytes) -> bool:
    """True if a deflate body starts with zlib's two-byte header (RFC 1950) rather than raw deflate data: HTTP
    says deflate means zlib-wrapped, but servers send both."""
    cmf, flg = first[0], first[1]
    return cmf & 0x0F == 8 and cmf >> 4 <= 7 and (cmf << 8 | flg) % 31 == 0


class _Inflater:
    """Undoes one gzip or deflate layer as its bytes stream in, `piece` bytes of output at a time."""

    def __init__(self, coding: str, piece: int) -> None:
        self._coding = coding
        self._piece = piece
        self._inflate: zlib._Decompress | None = None
        self._head = b""  # the first bytes of a deflate body, until there are two to tell its kind by
        self._received = False
        self._held_back = False  # zlib filled the last piece and may hold more output without new input

    def _open(self, data: bytes) -> zlib._Decompress | None:
        """The decompressor, once `data` is enough to choose it."""
        if self._coding == "gzip":
            return zlib.decompressobj(_GZIP_WBITS)
        if len(data) < 2:
            return None
        return zlib.decompressobj(zlib.MAX_WBITS if _zlib_header(data) else -zlib.MAX_WBITS)

    def feed(self, data: bytes) -> Iterator[bytes]:
        """The decoded pieces `data` yields; raises `BrokenEncoding`."""
        if not data:
            return
        self._received = True
        if self._inflate is None:
            self._head += data
            self._inflate = self._open(self._head)
            if self._inflate is None:
                return
            data, self._head = self._head, b""
        pending = data
        while pending or self._held_back:
            if self._inflate.eof:
                if self._coding != "gzip":
                    raise BrokenEncoding("data follows the end of its deflate stream")
                # Another gzip member: RFC 1952 lets a gzip body be several, one after another.
                self._inflate = zlib.decompressobj(_GZIP_WBITS)
            try:
                out = self._inflate.decompress(pending, self._piece)
            except zlib.error as error:
                raise BrokenEncoding(f"its {self._coding} stream is corrupt ({error})") from None
            self._held_back = len(out) == self._piece and not self._inflate.eof
            left = self._inflate.unused_data if self._inflate.eof else self._inflate.unconsumed_tail
            if pending and not out and not self._inflate.eof and len(left) == len(pending):
                raise BrokenEncoding(f"its {self._coding} stream stopped making progress")  # rather than spin
            pending = left
            if out:
                yield out

    def finish(self) -> None:
        """Checks, once the body has ended, that its stream ended too (no body at all is fine: HEAD, 304)."""
        if self._received and (self._inflate is None or not self._inflate.eof):
            raise BrokenEncoding(f"the body ended before its {self._coding} stream did")


def _through(layer: _Inflater, pieces: Iterable[bytes]) -> Iterator[bytes]:
    for piece in pieces:
        yield from layer.feed(piece)


class ContentDecoder:
    """Undoes an answer's codings (as `codings_to_undo` lists them) as its body streams in, within `limits`."""

    def __init__(self, codings: Sequence[str], limits: DecodeLimits | None = None) -> None:
        self._limits = limits or DecodeLimits()
        # Applied first, undone last.
        self._layers = [_Inflater(coding, self._limits.piece) for coding in reversed(codings)]
        self._received = 0
        self._decoded = 0

    def feed(self, chunk: bytes) -> Iterator[bytes]:
        """The decoded pieces of the next chunk of the encoded body; raises `BrokenEncoding`. Lazy: each piece
        is decoded only when asked for, so the caller holds at most one per layer."""
        # In slices, so that the ratio is of bytes decoded to bytes fed in, not to bytes still waiting.
        for start in range(0, len(chunk), self._limits.fed):
            fed = chunk[start : start + self._limits.fed]
            self._received += len(fed)
            pieces: Iterable[bytes] = (fed,)
            for layer in self._layers:
                pieces = _through(layer, pieces)
            for piece in pieces:
                self._count(len(piece))
                yield piece

    def finish(self) -> None:
        """Checks that every layer's stream ended with the body; raises `BrokenEncoding`."""
        for layer in self._layers:
            layer.finish()

    def _count(self, size: int) -> None:
        limits, decoded = self._limits, self._decoded + size
        if decoded > limits.max_bytes:
            raise BrokenEncoding(f"it decodes to more than {limits.max_bytes:,} bytes, the most the relay passes on")
        if decoded > limits.ratio_floor and decoded > limits.max_ratio * self._received:
            raise BrokenEncoding(
                f"it decodes to more than {limits.max_ratio} times its encoded size (a decompression bomb?)"
            )
        self._decoded = decoded


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
        outgoing.append(("Accept-Encoding", "identity"))  # a request only: answers are decoded whatever comes
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
        return _answer(response, scrubber, host, grant.session_id)


def _answer(response: aiohttp.ClientResponse, scrubber: Scrubber, host: str, session_id: str) -> RelayedResponse:
    """The upstream's answer as the sandbox gets it: decoded, with every value taken out; raises `Unavailable` for
    an answer in codings the relay cannot undo."""
    try:
        # Scrubbed first: a refusal quotes the codings it does not know, and the upstream chose their names.
        codings = codings_to_undo(
            [scrubber.text(v) for v in response.headers.getall("Content-Encoding", ())],
            [scrubber.text(v) for v in response.headers.getall("Transfer-Encoding", ())],
        )
    except EncodingRefused as refusal:
        # Not a byte of it: what the relay cannot read, it cannot take a value out of.
        response.close()
        log.warning("refused the answer of %s for session %s: %s", host, session_id, refusal)
        raise Unavailable(f"{host} answered in {refusal}, so its answer was not passed on") from None
    decoder = ContentDecoder(codings) if codings else None

    async def chunks() -> AsyncIterator[bytes]:
        # A body that breaks off ends the answer with an error, however much of it was sent; the reason is the
        # relay's own sentence (an exception's text could quote the upstream).
        try:
            async for chunk in response.content.iter_any():
                for piece in decoder.feed(chunk) if decoder is not None else (chunk,):
                    if out := scrubber.feed(piece):
                        yield out
            if decoder is not None:
                decoder.finish()
            if out := scrubber.finish():
                yield out
        except BrokenEncoding as error:
            log.warning("cut off the answer of %s for session %s: %s", host, session_id, error)
            raise Unavailable(f"the answer of {host} was cut off: {error}") from None
        except (aiohttp.ClientError, TimeoutError) as error:
            log.warning("the answer of %s broke off for session %s: %s", host, session_id, type(error).__name__)
            raise Unavailable(f"the answer of {host} broke off ({type(error).__name__})") from None
        finally:
            response.release()

    kept = [(k, scrubber.text(v)) for k, v in response.headers.items() if k.lower() not in _DROPPED_RESPONSE]
    return RelayedResponse(response.status, kept, chunks())
