"""The egress relay and answers compressed anyway: an allowed host that ignores `Accept-Encoding: identity` and
echoes the request gzip- or deflate-compressed (stacked, in several headers, or as a transfer coding) still
hands the sandbox only the placeholder, decoded; an answer in a coding the relay cannot read is refused whole;
a corrupt, truncated or bomb-sized stream is cut off without a raw byte passed on.

Real parts only: a real HTTPS API on 127.0.0.2 (and a bare TLS server for transfer codings) and a real
mcp_proxy in this process, called over gRPC as hands calls it (`RelayHttp`), so no sandbox is needed."""

from __future__ import annotations

import asyncio
import gzip
import itertools
import json
import logging
import random
import re
import zlib
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hands.egress_ca import EgressCA
from managed_agents.mesh.errors import MeshError, Unavailable
from managed_agents.v1 import mcp_proxy_pb2
from mcp_proxy import app as proxy_app
from mcp_proxy.client import McpProxyClient
from mcp_proxy.config import ProxyConfig
from mcp_proxy.egress import BrokenEncoding, ContentDecoder, DecodeLimits, Scrubber, codings_to_undo
from mcp_proxy.vault import VaultKey
from tests.egress.api_server import ApiServer

PLACEHOLDER = "ma_placeholder_" + "0123456789abcdef" * 2
PAD = 200_000  # dots before the echoed JSON, so that the answer takes several decoded pieces


@dataclass
class Answer:
    """What the relay answered: the head, the body (its first `keep` bytes), its size, and the error that
    ended it early, if one did."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes
    size: int
    error: MeshError | None

    def header(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def echoed(self) -> dict[str, str]:
        """The request headers the API echoed (after the padding)."""
        headers: dict[str, str] = json.loads(self.body.lstrip(b"."))["headers"]
        return headers


@dataclass
class Relay:
    api: ApiServer
    client: McpProxyClient
    token: str

    def encoded(self, **query: str | int) -> str:
        return f"{self.api.base_url}/encoded?{urlencode(query)}"

    async def fetch(self, url: str, *, method: str = "GET", keep: int = 1 << 30) -> Answer:
        """Relays a request carrying the placeholder as a sandbox's would; refusals raise `MeshError`."""
        head = mcp_proxy_pb2.RelayHttpRequestHead(
            session_token=self.token,
            credentials=[mcp_proxy_pb2.PlaceholderCredential(credential="weather", placeholder=PLACEHOLDER)],
            url=url,
            method=method,
            headers=[mcp_proxy_pb2.HttpHeader(name="Authorization", value=f"Bearer {PLACEHOLDER}")],
        )
        answer, chunks = await self.client.relay_http(head, _no_body())
        kept, size, error = bytearray(), 0, None
        try:
            async for chunk in chunks:
                size += len(chunk)
                kept += chunk[: max(0, keep - len(kept))]
        except MeshError as ended:
            error = ended
        return Answer(answer.status, [(h.name, h.value) for h in answer.headers], bytes(kept), size, error)


async def _no_body() -> AsyncIterator[bytes]:
    return
    yield


@pytest.fixture
async def relay(tmp_path: Path) -> AsyncIterator[Relay]:
    api = await ApiServer(tmp_path / "api-ca").start()
    proxy = await proxy_app.start(
        ProxyConfig(listen="127.0.0.1:0", data_dir=tmp_path / "proxy", upstream_ca_file=api.ca_file),
        VaultKey.generate(),
        None,
    )
    async with McpProxyClient.connect(proxy.address) as client:
        # The bare host: any port of it, so the bare TLS server below is allowed too.
        await client.put_credential(
            mcp_proxy_pb2.Credential(
                name="weather", kind=mcp_proxy_pb2.CREDENTIAL_KIND_API_KEY, allowed_hosts=[api.host]
            ),
            mcp_proxy_pb2.CredentialSecret(token=api.key),
        )
        token = (await client.mint_session_token("encodings", ["weather"])).token
        yield Relay(api, client, token)
    await proxy.aclose(grace=1.0)
    await api.stop()


def assert_scrubbed(relay: Relay, answer: Answer) -> None:
    """The key reached the API and the API echoed it, yet only the placeholder came back."""
    assert relay.api.requests and all(authorized for _, _, authorized in relay.api.requests), "the key went out"
    assert relay.api.key.encode() not in answer.body
    assert relay.api.key not in str(answer.headers) and relay.api.key not in str(answer.error)


@pytest.mark.parametrize(
    "query",
    [
        pytest.param({"encoding": "gzip"}, id="gzip"),
        pytest.param({"encoding": "x-gzip"}, id="x-gzip"),
        pytest.param({"encoding": "deflate"}, id="deflate-zlib"),
        pytest.param({"encoding": "deflate", "raw": 1}, id="deflate-raw"),
        pytest.param({"encoding": "gzip, gzip"}, id="gzip-gzip"),
        pytest.param({"encoding": "deflate, gzip"}, id="deflate-then-gzip"),
        pytest.param({"encoding": "gzip, deflate", "raw": 1}, id="gzip-then-raw-deflate"),
        pytest.param({"encoding": "gzip, deflate", "split": 1}, id="two-content-encoding-headers"),
        pytest.param({"encoding": "identity, GZIP"}, id="identity-and-upper-case"),
        pytest.param({"encoding": "gzip", "piece": 5}, id="gzip-in-5-byte-writes"),
    ],
)
async def test_an_answer_compressed_anyway_reaches_the_sandbox_decoded_with_the_placeholder(
    relay: Relay, query: dict[str, str | int]
) -> None:
    answer = await relay.fetch(relay.encoded(pad=PAD, **query))
    assert answer.error is None and answer.status == 200, answer.error
    assert answer.body.startswith(b"." * PAD), "decoded, not passed on compressed"
    echoed = answer.echoed()
    assert echoed["Accept-Encoding"] == "identity", "the relay asked for no compression; it came anyway"
    assert echoed["Authorization"] == f"Bearer {PLACEHOLDER}"
    assert answer.header("X-Seen-Authorization") == [f"Bearer {PLACEHOLDER}"]
    # The body is sent decoded: no coding named, and no length of the compressed body.
    assert answer.header("Content-Encoding") == [] and answer.header("Content-Length") == []
    assert_scrubbed(relay, answer)


async def test_a_head_request_and_an_empty_compressed_body_pass(relay: Relay) -> None:
    answer = await relay.fetch(relay.encoded(encoding="gzip"), method="HEAD")
    assert (answer.status, answer.body, answer.error) == (200, b"", None)
    assert answer.header("Content-Encoding") == []


@pytest.mark.parametrize(
    ("encoding", "named"),
    [
        ("br", "br"),
        ("zstd", "zstd"),
        ("compress", "compress"),
        ("x-secret-sauce", "x-secret-sauce"),
        ("gzip, br", "br"),
        ("chunked", "chunked"),
    ],
)
async def test_an_answer_in_a_coding_the_relay_cannot_read_is_refused_whole(
    relay: Relay, encoding: str, named: str
) -> None:
    # The API only names these codings: the body it sends is the plain echo, key and all.
    with pytest.raises(Unavailable) as refused:
        await relay.fetch(relay.encoded(encoding=encoding))
    assert str(refused.value) == (
        f"{relay.api.allowed_host} answered in an encoding the egress relay cannot check for secrets ({named}), "
        "so its answer was not passed on"
    )
    assert relay.api.requests == [("GET", "/encoded", True)]


async def test_more_stacked_codings_than_the_relay_unwraps_are_refused(relay: Relay) -> None:
    with pytest.raises(Unavailable, match="answered in 5 stacked encodings, more than the 4 the egress relay checks"):
        await relay.fetch(relay.encoded(encoding=", ".join(["gzip"] * 5)))
    four = await relay.fetch(relay.encoded(encoding=", ".join(["gzip"] * 4)))
    assert four.echoed()["Authorization"] == f"Bearer {PLACEHOLDER}"
    assert_scrubbed(relay, four)


async def test_a_refusal_quotes_no_key_the_upstream_put_in_its_content_encoding(relay: Relay) -> None:
    # An upstream that echoes the request in its headers can echo it into Content-Encoding too.
    echoing = await bare_upstream(relay.api, lambda head: [("Content-Encoding", _authorization(head))], b"x")
    async with echoing:
        with pytest.raises(Unavailable) as refused:
            await relay.fetch(f"https://{relay.api.host}:{_port(echoing)}/")
    assert relay.api.key not in str(refused.value) and PLACEHOLDER in str(refused.value)


@pytest.mark.parametrize(
    ("transfer_encoding", "compressed"),
    [
        ("gzip, chunked", gzip.compress),
        ("gzip", gzip.compress),  # framed by closing the connection
        ("gzip, gzip, chunked", lambda data: gzip.compress(gzip.compress(data))),
        ("deflate, chunked", zlib.compress),
    ],
)
async def test_an_answer_with_a_compressing_transfer_coding_is_decoded_too(
    relay: Relay, transfer_encoding: str, compressed: Callable[[bytes], bytes]
) -> None:
    # aiohttp undoes only `chunked`: a transfer coding before it used to pass through compressed.
    server = await bare_upstream(relay.api, lambda _: [("Transfer-Encoding", transfer_encoding)], compressed)
    async with server:
        answer = await relay.fetch(f"https://{relay.api.host}:{_port(server)}/echo-head")
    assert answer.error is None, answer.error
    assert f"Authorization: Bearer {PLACEHOLDER}\r\n" in answer.body.decode()
    assert relay.api.key.encode() not in answer.body and answer.header("Transfer-Encoding") == []


@pytest.mark.parametrize("transfer_encoding", ["br, chunked", "chunked, gzip"])
async def test_an_unreadable_transfer_coding_is_refused(relay: Relay, transfer_encoding: str) -> None:
    server = await bare_upstream(relay.api, lambda _: [("Transfer-Encoding", transfer_encoding)], lambda h: h)
    async with server:
        with pytest.raises(Unavailable, match="cannot check for secrets"):
            await relay.fetch(f"https://{relay.api.host}:{_port(server)}/")


@pytest.mark.parametrize("corrupt", ["garble", "truncate"])
@pytest.mark.parametrize("query", [{"encoding": "gzip"}, {"encoding": "deflate"}, {"encoding": "gzip, gzip"}])
async def test_a_corrupt_or_truncated_stream_ends_the_answer_and_passes_no_raw_byte(
    relay: Relay, query: dict[str, str], corrupt: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    answer = await relay.fetch(relay.encoded(pad=PAD, corrupt=corrupt, **query))
    assert isinstance(answer.error, Unavailable), answer.error
    assert re.fullmatch(
        rf"the answer of {re.escape(relay.api.allowed_host)} was cut off: "
        r"(its (gzip|deflate) stream is corrupt \(.*\)|the body ended before its (gzip|deflate) stream did)",
        str(answer.error),
    ), answer.error
    if corrupt == "truncate":
        assert answer.body.startswith(b"." * 1000), "what came before the end was decoded and passed on"
    assert b"\x1f\x8b" not in answer.body and b"\xff" * 16 not in answer.body, "no raw compressed bytes"
    assert_scrubbed(relay, answer)
    # A sentence in the log, no traceback.
    assert any("cut off the answer of" in r.getMessage() for r in caplog.records)
    assert not [r for r in caplog.records if r.exc_info], [r.getMessage() for r in caplog.records if r.exc_info]


@pytest.mark.parametrize("piece", [pytest.param(7, id="7-byte-writes"), pytest.param(1 << 20, id="one-write")])
@pytest.mark.parametrize("encoding", ["gzip", "deflate, gzip"])
async def test_a_key_cut_across_compressed_chunks_and_decoded_pieces_is_still_taken_out(
    relay: Relay, encoding: str, piece: int
) -> None:
    # Where the key lands in the echo, found from an uncompressed answer (the placeholder stands in its place).
    plain = await relay.fetch(relay.encoded(encoding=encoding, pad=0, piece=piece))
    offset = plain.body.index(PLACEHOLDER.encode())
    # Padded so the key straddles the end of the first decoded piece, in the middle.
    pad = DecodeLimits().piece - offset - len(relay.api.key) // 2
    answer = await relay.fetch(relay.encoded(encoding=encoding, pad=pad, piece=piece))
    assert answer.error is None, answer.error
    assert answer.echoed()["Authorization"] == f"Bearer {PLACEHOLDER}"
    assert answer.body.index(PLACEHOLDER.encode()) == pad + offset
    assert_scrubbed(relay, answer)


def _reset_peak_memory() -> int:
    """Starts this process's peak resident memory (VmHWM) again from its current size, and returns that."""
    Path("/proc/self/clear_refs").write_text("5")
    return _memory_kib("VmHWM")


def _memory_kib(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    assert match, field
    return int(match.group(1))


@pytest.mark.parametrize("encoding", ["gzip", "gzip, gzip"])
async def test_a_decompression_bomb_is_cut_off_at_the_bound_in_bounded_memory(relay: Relay, encoding: str) -> None:
    # A gibibyte of zeros: about 1 MB gzipped once, a few KB twice. The proxy runs in this process, so this
    # process's peak resident memory (reset here) bounds what decoding it took.
    before = _reset_peak_memory()
    answer = await relay.fetch(relay.encoded(encoding=encoding, zeros=1 << 30), keep=1 << 16)
    grown = _memory_kib("VmHWM") - before
    limits = DecodeLimits()
    assert isinstance(answer.error, Unavailable), answer.error
    assert str(answer.error) == (
        f"the answer of {relay.api.allowed_host} was cut off: it decodes to more than {limits.max_ratio} times its "
        "encoded size (a decompression bomb?)"
    )
    assert limits.ratio_floor - limits.piece - len(relay.api.key) <= answer.size <= limits.ratio_floor
    assert grown < 100 << 10, f"the proxy's process grew by {grown} KiB"
    assert json.loads(answer.body[: answer.body.index(b"\0")])["headers"]["Authorization"] == f"Bearer {PLACEHOLDER}"


# The decoder on its own ------------------------------------------------------------------------------------

KEY = b"sk-live-ABCDEFGHIJKLMNOPQRSTUVWXYZ012345"


def _apply(data: bytes, coding: str) -> bytes:
    if coding == "gzip":
        return gzip.compress(data)
    compressor = zlib.compressobj(wbits=-zlib.MAX_WBITS if coding == "raw" else zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush()


def _decode(encoded: bytes, codings: list[str], cuts: list[int], limits: DecodeLimits) -> Iterator[bytes]:
    decoder = ContentDecoder(codings, limits)
    points = sorted({min(c, len(encoded)) for c in cuts} | {0, len(encoded)})
    for start, end in itertools.pairwise(points):
        yield from decoder.feed(encoded[start:end])
    decoder.finish()


@given(
    before=st.binary(max_size=300),
    after=st.binary(max_size=300),
    times=st.integers(1, 3),
    stack=st.lists(st.sampled_from(["gzip", "zlib", "raw"]), min_size=1, max_size=4),
    cuts=st.lists(st.integers(0, 2000), max_size=10),
    piece=st.integers(1, 64),
)
def test_a_key_is_taken_out_however_the_encoded_and_decoded_chunks_fall(
    before: bytes, after: bytes, times: int, stack: list[str], cuts: list[int], piece: int
) -> None:
    plain = before + (KEY + after) * times
    encoded = plain
    for coding in stack:
        encoded = _apply(encoded, coding)
    scrubber = Scrubber([(KEY, PLACEHOLDER.encode())])
    codings = ["gzip" if c == "gzip" else "deflate" for c in stack]
    pieces = list(_decode(encoded, codings, cuts, DecodeLimits(piece=piece)))
    assert all(len(p) <= piece for p in pieces)
    out = b"".join(scrubber.feed(p) for p in pieces) + scrubber.finish()
    assert out == plain.replace(KEY, PLACEHOLDER.encode())


def test_decoding_stops_at_the_size_bound_before_passing_it() -> None:
    plain = bytes(range(256)) * (16 << 10)  # 4 MiB that compress well, but not like a bomb
    limits = DecodeLimits(max_bytes=1 << 20, max_ratio=1 << 30)
    passed = 0
    with pytest.raises(BrokenEncoding, match="it decodes to more than 1,048,576 bytes, the most the relay passes on"):
        for piece in _decode(gzip.compress(plain), ["gzip"], [], limits):
            passed += len(piece)
    assert passed == 1 << 20


def test_the_ratio_bound_spares_what_is_small_or_compresses_like_text() -> None:
    limits = DecodeLimits(max_ratio=20, ratio_floor=1 << 20)
    small = bytes(1 << 20)  # far past the ratio, but not past the floor
    assert b"".join(_decode(gzip.compress(small), ["gzip"], [], limits)) == small
    text = random.Random(7).randbytes(2 << 20).hex().encode()  # 4 MiB that compress about 2:1
    assert b"".join(_decode(gzip.compress(text), ["gzip"], [], limits)) == text
    with pytest.raises(BrokenEncoding, match="it decodes to more than 20 times its encoded size"):
        list(_decode(gzip.compress(bytes(4 << 20)), ["gzip"], [], limits))


def test_a_stream_that_stops_on_a_piece_boundary_waits_for_the_rest() -> None:
    # The first chunk decodes to exactly four whole pieces and leaves zlib nothing: that is no stall.
    plain = random.Random(3).randbytes(4096)
    compressor = zlib.compressobj()
    first = compressor.compress(plain) + compressor.flush(zlib.Z_SYNC_FLUSH)
    decoder = ContentDecoder(["deflate"], DecodeLimits(piece=1024))
    assert [len(p) for p in decoder.feed(first)] == [1024] * 4
    assert list(decoder.feed(compressor.flush())) == []
    decoder.finish()


def test_gzip_members_are_all_decoded_and_what_follows_a_deflate_stream_is_refused() -> None:
    assert b"".join(_decode(gzip.compress(b"one ") + gzip.compress(b"two"), ["gzip"], [5], DecodeLimits())) == (
        b"one two"
    )
    with pytest.raises(BrokenEncoding, match="data follows the end of its deflate stream"):
        list(_decode(zlib.compress(b"one") + b"raw bytes", ["deflate"], [], DecodeLimits()))
    with pytest.raises(BrokenEncoding, match="the body ended before its gzip stream did"):
        list(_decode(gzip.compress(b"x" * 1000)[:-8], ["gzip"], [], DecodeLimits()))
    with pytest.raises(BrokenEncoding, match="the body ended before its deflate stream did"):
        list(_decode(b"\x78", ["deflate"], [], DecodeLimits()))
    assert list(_decode(b"", ["gzip", "deflate"], [], DecodeLimits())) == []


def test_which_codings_are_undone_and_which_refused() -> None:
    assert codings_to_undo(["gzip, X-Gzip", "deflate"], ["gzip, chunked"]) == ["gzip", "gzip", "deflate", "gzip"]
    assert codings_to_undo(["identity", ""], ["chunked"]) == []
    for content, transfer in [(["br"], []), (["gzip"] * 5, []), ([], ["chunked, gzip"]), ([], ["gzip, chunked, x"])]:
        with pytest.raises(ValueError, match="egress relay"):
            codings_to_undo(content, transfer)


# A bare HTTPS server, for what aiohttp's server will not send ------------------------------------------------


def _authorization(head: bytes) -> str:
    match = re.search(rb"^authorization: (.*?)\r$", head, re.MULTILINE | re.IGNORECASE)
    return match.group(1).decode() if match else ""


def _port(server: asyncio.Server) -> int:
    return int(server.sockets[0].getsockname()[1])


async def bare_upstream(
    api: ApiServer, headers: Callable[[bytes], list[tuple[str, str]]], body: bytes | Callable[[bytes], bytes]
) -> asyncio.Server:
    """Serves on the API's host, with a certificate of the API's CA, one answer per connection: the headers
    `headers(request head)` gives and `body(request head)` (or `body` itself, if bytes), framed as chunked
    when the last transfer coding says so, else ended by closing."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            extra = headers(head)
            data = body if isinstance(body, bytes) else body(head)
            chunked = any(k == "Transfer-Encoding" and v.endswith("chunked") for k, v in extra)
            lines = ["HTTP/1.1 200 OK", "Content-Type: text/plain", "Connection: close"]
            lines += [f"{k}: {v}" for k, v in extra]
            writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
            writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(data), data) if chunked else data)
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the relay hung up, having refused the answer
        finally:
            writer.close()

    context = EgressCA.load_or_create(api.ca_dir).server_context(api.host)
    return await asyncio.start_server(answer, api.host, 0, ssl=context)
