"""The egress relay's core and RPC: values taken out of answers however the chunks fall, and `RelayHttp` fuzzed
with malformed and oversized input: clear statuses with a sentence, nothing written, the server up."""

from __future__ import annotations

import itertools
import string
from collections.abc import AsyncIterator

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from managed_agents.mesh.channel import dial
from managed_agents.v1 import mcp_proxy_pb2, mcp_proxy_pb2_grpc
from mcp_proxy.app import ProxyServer
from mcp_proxy.client import McpProxyClient
from mcp_proxy.egress import Scrubber
from tests.mcp_proxy.servers import free_port
from tests.mcp_proxy.test_fuzz import FUZZ, _mutations, names, texts

Code = grpc.StatusCode
KEY = "sk-live-ABCDEFGHIJKLMNOPQRSTUVWXYZ012345"
PLACEHOLDER = "ma_placeholder_0123456789abcdef0123456789abcdef"


@given(
    before=st.text(alphabet="sk-live-ABC xyz\n", max_size=80),
    after=st.text(alphabet="sk-live-ABC xyz\n", max_size=80),
    times=st.integers(0, 3),
    cuts=st.lists(st.integers(0, 400), max_size=8),
)
def test_values_are_taken_out_wherever_the_chunks_are_cut(before: str, after: str, times: int, cuts: list[int]) -> None:
    data = (before + (KEY + after) * times).encode()
    scrubber = Scrubber([(KEY.encode(), PLACEHOLDER.encode()), (b"short-key", b"ma_placeholder_short_placeholder")])
    points = sorted({min(c, len(data)) for c in cuts} | {0, len(data)})
    out = b"".join(scrubber.feed(data[a:b]) for a, b in itertools.pairwise(points)) + scrubber.finish()
    assert out == data.replace(KEY.encode(), PLACEHOLDER.encode())
    assert KEY.encode() not in out


def test_headers_are_scrubbed_and_a_scrubber_without_values_passes_everything() -> None:
    scrubber = Scrubber([(KEY.encode(), PLACEHOLDER.encode())])
    assert scrubber.text(f"Bearer {KEY}") == f"Bearer {PLACEHOLDER}"
    empty = Scrubber([])
    assert empty.feed(b"abc") == b"abc" and empty.finish() == b""


class Harness:
    def __init__(self, client: McpProxyClient, channel: grpc.aio.Channel, token: str) -> None:
        self.client = client
        self.proxy = mcp_proxy_pb2_grpc.McpProxyServiceStub(channel)
        self.token = token

    async def listing(self) -> list[bytes]:
        return [c.SerializeToString(deterministic=True) for c in await self.client.list_credentials()]


@pytest.fixture
async def harness(proxy_server: ProxyServer, proxy: McpProxyClient) -> AsyncIterator[Harness]:
    # The allowed host is a closed port: a request that passes every check ends UNAVAILABLE, reaching nothing.
    await proxy.put_credential(
        mcp_proxy_pb2.Credential(
            name="api", kind=mcp_proxy_pb2.CREDENTIAL_KIND_API_KEY, allowed_hosts=[f"127.0.0.1:{free_port()}"]
        ),
        mcp_proxy_pb2.CredentialSecret(token=KEY),
    )
    token = (await proxy.mint_session_token("egress-fuzz", ["api"])).token
    channel = dial(proxy_server.address)
    yield Harness(proxy, channel, token)
    await channel.close()


placeholders = st.one_of(
    st.just(PLACEHOLDER),
    st.text(alphabet=string.ascii_letters + string.digits + "_", min_size=10, max_size=140),
    texts,
)
header_lists = st.lists(
    st.tuples(st.one_of(st.sampled_from(["Authorization", "Host", "X-Key", "bad name", ""]), texts), texts),
    max_size=120,
)


@FUZZ
@given(
    data=st.data(),
    valid_token=st.booleans(),
    credentials=st.lists(st.tuples(st.one_of(st.just("api"), names), placeholders), max_size=18),
    url=st.one_of(
        st.sampled_from(["https://api.example.com/x", "http://127.0.0.1:1/", "ftp://x", "https://u:p@h/", ""]),
        st.text(max_size=60).map(lambda t: "https://" + t),
        st.just("https://h/" + "a" * 9000),
        texts,
    ),
    method=st.one_of(st.sampled_from(["GET", "POST", "CONNECT", "TRACE", "", "get"]), texts),
    headers=header_lists,
    head_first=st.booleans(),
    body=st.lists(st.binary(max_size=64), max_size=3),
)
async def test_relay_http_fuzz(
    harness: Harness,
    data: st.DataObject,
    valid_token: bool,
    credentials: list[tuple[str, str]],
    url: str,
    method: str,
    headers: list[tuple[str, str]],
    head_first: bool,
    body: list[bytes],
) -> None:
    token = harness.token if valid_token else data.draw(_mutations(harness.token))
    head = mcp_proxy_pb2.RelayHttpRequestHead(
        session_token=token,
        credentials=[mcp_proxy_pb2.PlaceholderCredential(credential=c, placeholder=p) for c, p in credentials],
        url=url,
        method=method,
        headers=[mcp_proxy_pb2.HttpHeader(name=k, value=v) for k, v in headers],
    )

    async def requests() -> AsyncIterator[mcp_proxy_pb2.RelayHttpRequest]:
        if head_first:
            yield mcp_proxy_pb2.RelayHttpRequest(head=head)
        for chunk in body:
            yield mcp_proxy_pb2.RelayHttpRequest(body=chunk)

    before = await harness.listing()
    call = harness.proxy.RelayHttp(requests(), timeout=30)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        answered = [part async for part in call]
        raise AssertionError(f"relayed {len(answered)} parts for a request that cannot pass every check")
    details = raised.value.details() or ""
    allowed = {Code.UNAUTHENTICATED, Code.INVALID_ARGUMENT, Code.PERMISSION_DENIED, Code.NOT_FOUND, Code.UNAVAILABLE}
    assert raised.value.code() in allowed, (raised.value.code(), details)
    assert details and "Traceback" not in details and KEY not in details, details
    assert await harness.listing() == before
