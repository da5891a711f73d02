"""Fuzzing the vault's and the proxy's RPCs with malformed and oversized input (hypothesis): every answer is a
clear status with a sentence (never INTERNAL, never a traceback), the server stays up, and a refused
request writes nothing."""

from __future__ import annotations

import string
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from managed_agents.mesh.channel import dial
from managed_agents.v1 import mcp_proxy_pb2, mcp_proxy_pb2_grpc
from mcp_proxy.app import ProxyServer
from mcp_proxy.client import McpProxyClient
from tests.mcp_proxy.servers import Upstream, credential_for, free_port

FUZZ = settings(
    max_examples=120,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
Code = grpc.StatusCode

# Text that is sometimes valid, sometimes nearly valid, sometimes nothing like it.
names = st.one_of(
    st.sampled_from(["files", "git", "srv", "", "a__b", "UPPER", "x" * 64, "x" * 65]),
    st.text(alphabet=string.ascii_lowercase + string.digits + "_-", max_size=70),
    st.text(max_size=80),
)
texts = st.one_of(st.text(max_size=300), st.text(alphabet="ab\r\n\x00 ", max_size=40))
big_texts = st.one_of(texts, st.integers(16 * 1024 - 2, 16 * 1024 + 2).map(lambda n: "s" * n))
urls = st.one_of(
    st.sampled_from(["https://mcp.example.com/mcp", "http://127.0.0.1:1/mcp", "ftp://x", "https://u:p@x/", ""]),
    st.text(max_size=100).map(lambda t: "https://" + t),
    texts,
)
durations = st.builds(
    lambda s, n: {"seconds": s, "nanos": n},
    st.one_of(st.integers(-(2**40), 2**40), st.integers(-5, 10**6)),
    st.one_of(st.integers(-(10**9), 10**9), st.just(0)),
)
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.floats(allow_nan=True), st.text(max_size=50)),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)


def _duration(value: dict[str, int]) -> duration_pb2.Duration:
    return duration_pb2.Duration(seconds=value["seconds"], nanos=value["nanos"])


class Harness:
    """A proxy with one MCP credential (pointing at a closed port) and one git token, and a raw stub."""

    def __init__(self, server: ProxyServer, client: McpProxyClient, channel: grpc.aio.Channel, token: str) -> None:
        self.server = server
        self.client = client
        self.vault = mcp_proxy_pb2_grpc.VaultServiceStub(channel)
        self.proxy = mcp_proxy_pb2_grpc.McpProxyServiceStub(channel)
        self.token = token

    async def listing(self) -> list[bytes]:
        return [c.SerializeToString(deterministic=True) for c in await self.client.list_credentials()]

    async def expect(self, call: Any, allowed: set[grpc.StatusCode]) -> Any:
        """Runs a call: it must succeed or fail with an allowed code and a sentence. Returns the response."""
        try:
            return await call
        except grpc.aio.AioRpcError as error:
            details = error.details() or ""
            assert error.code() in allowed, (error.code(), details)
            assert details and "Traceback" not in details, details
            return None


@pytest.fixture
async def harness(proxy_server: ProxyServer, proxy: McpProxyClient) -> AsyncIterator[Harness]:
    down = Upstream(name="files", port=free_port())
    await proxy.put_credential(*credential_for(down))
    await proxy.put_credential(
        mcp_proxy_pb2.Credential(name="git", kind=mcp_proxy_pb2.CREDENTIAL_KIND_GIT_TOKEN),
        mcp_proxy_pb2.CredentialSecret(token="ghp_fuzz"),
    )
    token = (await proxy.mint_session_token("fuzz", ["files", "git"])).token
    channel = dial(proxy_server.address)
    yield Harness(proxy_server, proxy, channel, token)
    await channel.close()


@FUZZ
@given(
    name=names,
    kind=st.integers(-3, 6),
    url=urls,
    endpoint=urls,
    client_id=st.one_of(texts, st.just("x" * 300)),
    hosts=st.lists(st.one_of(st.sampled_from(["api.example.com", "h:443", "h:0", "a..b"]), texts), max_size=40),
    token=big_texts,
    refresh=big_texts,
    client_secret=big_texts,
    ttl=durations,
    has_credential=st.booleans(),
    has_secret=st.booleans(),
)
async def test_put_credential_fuzz(
    harness: Harness,
    name: str,
    kind: int,
    url: str,
    endpoint: str,
    client_id: str,
    hosts: list[str],
    token: str,
    refresh: str,
    client_secret: str,
    ttl: dict[str, int],
    has_credential: bool,
    has_secret: bool,
) -> None:
    if name in ("files", "git"):
        name = "new"  # replacing the fixtures' credentials is allowed, but would spoil "nothing written"
    request = mcp_proxy_pb2.PutCredentialRequest()
    if has_credential:
        request.credential.CopyFrom(
            mcp_proxy_pb2.Credential(
                name=name,
                kind=kind,  # type: ignore[arg-type]
                mcp_server_url=url,
                token_endpoint=endpoint,
                client_id=client_id,
                allowed_hosts=hosts,
            )
        )
    if has_secret:
        request.secret.CopyFrom(
            mcp_proxy_pb2.CredentialSecret(
                token=token, refresh_token=refresh, client_secret=client_secret, token_ttl=_duration(ttl)
            )
        )
    before = await harness.listing()
    response = await harness.expect(harness.vault.PutCredential(request), {Code.INVALID_ARGUMENT})
    after = await harness.listing()
    if response is None:
        assert after == before, "a refused PutCredential changed the vault"
    else:
        assert response.credential.name == name
        assert len(after) == len(before) + 1
        await harness.client.delete_credential(name)
        # No secret ever comes back in a response.
        raw = response.SerializeToString()
        for secret in (token, refresh, client_secret):
            if len(secret) >= 4:
                assert secret.encode() not in raw


@FUZZ
@given(
    name=names,
    page_size=st.integers(-(2**31), 2**31 - 1),
    page_token=st.one_of(texts, st.just("eyJwIjp7fX0")),
)
async def test_list_and_delete_credential_fuzz(harness: Harness, name: str, page_size: int, page_token: str) -> None:
    if name in ("files", "git"):
        name = "absent"
    before = await harness.listing()
    await harness.expect(
        harness.vault.ListCredentials(mcp_proxy_pb2.ListCredentialsRequest(page_size=page_size, page_token=page_token)),
        {Code.INVALID_ARGUMENT},
    )
    response = await harness.expect(
        harness.vault.DeleteCredential(mcp_proxy_pb2.DeleteCredentialRequest(name=name)),
        {Code.INVALID_ARGUMENT},
    )
    assert response is None or response.existed is False
    assert await harness.listing() == before


@FUZZ
@given(
    session_id=names,
    grants=st.lists(names, max_size=25),
    ttl=durations,
    revoke=st.booleans(),
)
async def test_mint_and_revoke_fuzz(
    harness: Harness, session_id: str, grants: list[str], ttl: dict[str, int], revoke: bool
) -> None:
    if session_id == "fuzz":
        session_id = "other"  # revoking the harness's own session would spoil the next examples
    request = mcp_proxy_pb2.MintSessionTokenRequest(session_id=session_id, grants=grants, ttl=_duration(ttl))
    minted = await harness.expect(harness.proxy.MintSessionToken(request), {Code.INVALID_ARGUMENT, Code.NOT_FOUND})
    if minted is not None:
        assert set(grants) <= {"files", "git"}
        assert minted.token.count(".") == 2
    if revoke:
        await harness.expect(
            harness.proxy.RevokeSessionToken(mcp_proxy_pb2.RevokeSessionTokenRequest(session_id=session_id)),
            {Code.INVALID_ARGUMENT},
        )


def _mutations(token: str) -> st.SearchStrategy[str]:
    return st.one_of(
        texts,
        st.just(token + "x"),
        st.integers(0, len(token) - 1).map(lambda i: token[:i] + chr((ord(token[i]) + 1) % 128) + token[i + 1 :]),
        st.integers(0, len(token)).map(lambda i: token[:i]),
        st.just("." * 3000),
        st.just("mst1." + "A" * 5000 + ".x"),
    )


@FUZZ
@given(data=st.data())
async def test_list_tools_with_mangled_tokens_is_unauthenticated(harness: Harness, data: st.DataObject) -> None:
    token = data.draw(_mutations(harness.token))
    response = await harness.expect(
        harness.proxy.ListTools(mcp_proxy_pb2.McpProxyServiceListToolsRequest(session_token=token)),
        {Code.UNAUTHENTICATED},
    )
    assert response is None or token == harness.token


@FUZZ
@given(
    data=st.data(),
    valid_token=st.booleans(),
    server=names,
    tool=st.one_of(st.sampled_from(["add", "", "x" * 129, "a b"]), texts),
    arguments=st.dictionaries(st.text(max_size=12), json_values, max_size=5),
    oversized=st.booleans(),
    timeout=st.one_of(durations, st.just({"seconds": 0, "nanos": 50_000_000})),
)
async def test_call_tool_fuzz(
    harness: Harness,
    data: st.DataObject,
    valid_token: bool,
    server: str,
    tool: str,
    arguments: dict[str, Any],
    oversized: bool,
    timeout: dict[str, int],
) -> None:
    token = harness.token if valid_token else data.draw(_mutations(harness.token))
    request = mcp_proxy_pb2.McpProxyServiceCallToolRequest(
        session_token=token, server=server, tool=tool, timeout=_duration(timeout)
    )
    request.arguments.update(arguments)
    if oversized:
        request.arguments.update({"blob": "b" * (1024 * 1024)})
    before = await harness.listing()
    response = await harness.expect(
        harness.proxy.CallTool(request, timeout=30),
        {Code.UNAUTHENTICATED, Code.INVALID_ARGUMENT, Code.PERMISSION_DENIED, Code.NOT_FOUND},
    )
    if response is not None:
        # Only the one granted MCP server can be called, and it is down: always an error result.
        assert server == "files" and response.is_error and response.content
    assert await harness.listing() == before


async def test_undecodable_request_bytes_do_not_bring_the_server_down(harness: Harness) -> None:
    channel = dial(harness.server.address)
    for method in (
        "VaultService/PutCredential",
        "McpProxyService/CallTool",
        "McpProxyService/MintSessionToken",
    ):
        call = channel.unary_unary(f"/managed_agents.v1.{method}")
        for payload in (b"\xff\xff\xff", b"\x0a\x05ab", bytes(range(256))):
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await call(payload)
            # Bytes that do not decode are refused before any servicer runs (managed_agents/mesh/decoding.py).
            assert raised.value.code() is Code.INVALID_ARGUMENT
            assert "could not be decoded as managed_agents.v1." in (raised.value.details() or "")
            assert "Traceback" not in (raised.value.details() or "")
    await channel.close()
    assert len(await harness.client.list_credentials()) == 2
