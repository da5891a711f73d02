"""The MCP proxy end to end: session tokens in, real upstream MCP servers (bearer-protected, OAuth refresh)
out. Upstream trouble is a tool result with `is_error`; bad tokens and ungranted servers are RPC errors."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator

import pytest
from google.protobuf import json_format

from managed_agents.mesh.channel import dial
from managed_agents.mesh.errors import CredentialNotFound, InvalidArgument, NotGranted, TokenInvalid
from managed_agents.v1 import mcp_proxy_pb2, mcp_proxy_pb2_grpc
from mcp_proxy.app import ProxyServer
from mcp_proxy.client import McpProxyClient
from tests.mcp_proxy.servers import PNG, Upstream, credential_for, free_port


def text(response: mcp_proxy_pb2.McpProxyServiceCallToolResponse) -> str:
    return "\n".join(block.text.text for block in response.content if block.WhichOneof("block") == "text")


@pytest.fixture
async def second_upstream() -> AsyncIterator[Upstream]:
    upstream = await Upstream(name="tickets").start()
    yield upstream
    await upstream.stop()


async def test_list_tools_names_each_granted_servers_tools_after_it(
    proxy: McpProxyClient, mcp_upstream: Upstream, second_upstream: Upstream
) -> None:
    await proxy.put_credential(*credential_for(mcp_upstream))
    await proxy.put_credential(*credential_for(second_upstream))
    both = (await proxy.mint_session_token("sess-1", ["files", "tickets"])).token
    only_files = (await proxy.mint_session_token("sess-2", ["files"])).token

    tools = {t.name: t for t in await proxy.list_tools(both)}
    assert set(tools) == {
        f"{server}__{tool}" for server in ("files", "tickets") for tool in ("add", "echo", "slow", "fail", "picture")
    }
    add = tools["files__add"]
    assert add.description == "Adds two integers."
    schema = json_format.MessageToDict(add.input_schema)
    assert schema["type"] == "object" and set(schema["required"]) == {"a", "b"}
    assert schema["properties"]["a"]["type"] == "integer"
    assert not any(t.safe_to_retry for t in tools.values())

    assert {t.name.split("__")[0] for t in await proxy.list_tools(only_files)} == {"files"}
    assert set(mcp_upstream.presented) == {mcp_upstream.access_token}


async def test_call_tool_reaches_the_upstream_with_the_vaults_bearer_token(
    proxy: McpProxyClient, mcp_upstream: Upstream
) -> None:
    await proxy.put_credential(*credential_for(mcp_upstream))
    token = (await proxy.mint_session_token("sess-1", ["files"])).token

    result = await proxy.call_tool(token, server="files", tool="add", arguments={"a": 2, "b": 40})
    assert not result.is_error and text(result) == "42"
    echoed = await proxy.call_tool(token, server="files", tool="echo", arguments={"text": "héllo\nworld"})
    assert text(echoed) == "héllo\nworld"
    picture = await proxy.call_tool(token, server="files", tool="picture", arguments={})
    assert not picture.is_error
    assert picture.content[0].image.media_type == "image/png" and picture.content[0].image.data == PNG
    assert mcp_upstream.presented and set(mcp_upstream.presented) == {mcp_upstream.access_token}
    assert mcp_upstream.refused == 0


async def test_a_failing_tool_is_an_error_result(proxy: McpProxyClient, mcp_upstream: Upstream) -> None:
    await proxy.put_credential(*credential_for(mcp_upstream))
    token = (await proxy.mint_session_token("sess-1", ["files"])).token
    result = await proxy.call_tool(token, server="files", tool="fail", arguments={})
    assert result.is_error and "failed on purpose" in text(result)
    unknown = await proxy.call_tool(token, server="files", tool="no_such_tool", arguments={})
    assert unknown.is_error and "no_such_tool" in text(unknown)
    wrong = await proxy.call_tool(token, server="files", tool="add", arguments={"a": "two"})
    assert wrong.is_error


async def test_an_upstream_that_is_down_is_an_error_result_at_once(proxy: McpProxyClient) -> None:
    down = Upstream(name="gone", port=free_port())  # never started: nothing listens there
    await proxy.put_credential(*credential_for(down))
    token = (await proxy.mint_session_token("sess-1", ["gone"])).token
    started = time.monotonic()
    result = await proxy.call_tool(token, server="gone", tool="add", arguments={"a": 1, "b": 2}, timeout=20)
    assert result.is_error
    assert "'gone'" in text(result) and "refused or the host is unreachable" in text(result)
    assert time.monotonic() - started < 5
    # Its tools are left out of a listing rather than failing it.
    assert await proxy.list_tools(token) == []


async def test_a_slow_upstream_is_an_error_result_after_the_timeout(
    proxy: McpProxyClient, mcp_upstream: Upstream
) -> None:
    await proxy.put_credential(*credential_for(mcp_upstream))
    token = (await proxy.mint_session_token("sess-1", ["files"])).token
    await proxy.call_tool(token, server="files", tool="add", arguments={"a": 1, "b": 1})  # connected
    started = time.monotonic()
    result = await proxy.call_tool(token, server="files", tool="slow", arguments={"seconds": 30}, timeout=0.5)
    elapsed = time.monotonic() - started
    assert result.is_error and "did not answer within 0.5 s" in text(result)
    assert 0.4 < elapsed < 3
    # The connection survives a timed-out call.
    again = await proxy.call_tool(token, server="files", tool="add", arguments={"a": 1, "b": 1})
    assert text(again) == "2"


async def test_an_expired_access_token_is_refreshed_stored_and_used(
    proxy: McpProxyClient, mcp_upstream: Upstream
) -> None:
    before = await proxy.put_credential(*credential_for(mcp_upstream))
    token = (await proxy.mint_session_token("sess-1", ["files"])).token
    assert text(await proxy.call_tool(token, server="files", tool="add", arguments={"a": 1, "b": 2})) == "3"

    mcp_upstream.expire_access_tokens()
    result = await proxy.call_tool(token, server="files", tool="add", arguments={"a": 2, "b": 2})
    assert not result.is_error and text(result) == "4"
    assert mcp_upstream.refreshes == 1 and mcp_upstream.refused == 1
    assert mcp_upstream.presented[-1] == mcp_upstream.issued[0]

    # Stored: the new expiry is in the vault, and later calls use the new token without refreshing again.
    (after,) = await proxy.list_credentials()
    assert after.update_time.ToMicroseconds() > before.update_time.ToMicroseconds()
    assert 3500 < after.expire_time.ToSeconds() - time.time() <= 3600
    for _ in range(3):
        assert not (await proxy.call_tool(token, server="files", tool="echo", arguments={"text": "x"})).is_error
    assert mcp_upstream.refreshes == 1 and mcp_upstream.refused == 1


async def test_a_token_known_to_be_expired_is_refreshed_before_the_call(
    proxy: McpProxyClient, mcp_upstream: Upstream
) -> None:
    # Its recorded lifetime is already over (inside the refresh margin), so the proxy never sends it.
    await proxy.put_credential(*credential_for(mcp_upstream, token_ttl=1))
    token = (await proxy.mint_session_token("sess-1", ["files"])).token
    result = await proxy.call_tool(token, server="files", tool="add", arguments={"a": 5, "b": 5})
    assert text(result) == "10"
    assert mcp_upstream.refreshes == 1 and mcp_upstream.refused == 0
    assert mcp_upstream.access_token not in mcp_upstream.presented


async def test_concurrent_calls_share_one_refresh(proxy: McpProxyClient, mcp_upstream: Upstream) -> None:
    await proxy.put_credential(*credential_for(mcp_upstream))
    token = (await proxy.mint_session_token("sess-1", ["files"])).token
    assert not (await proxy.call_tool(token, server="files", tool="add", arguments={"a": 0, "b": 0})).is_error
    mcp_upstream.expire_access_tokens()
    results = await asyncio.gather(
        *(proxy.call_tool(token, server="files", tool="add", arguments={"a": i, "b": 1}) for i in range(8))
    )
    assert [text(r) for r in results] == [str(i + 1) for i in range(8)]
    # The refresh token rotates on every use, so a second refresh with the old one would have failed.
    assert mcp_upstream.refreshes == 1


async def test_a_refused_refresh_is_an_error_result_that_says_so(proxy: McpProxyClient, mcp_upstream: Upstream) -> None:
    credential, secret = credential_for(mcp_upstream)
    secret.client_secret = "not-the-client-secret"
    await proxy.put_credential(credential, secret)
    token = (await proxy.mint_session_token("sess-1", ["files"])).token
    mcp_upstream.expire_access_tokens()
    result = await proxy.call_tool(token, server="files", tool="add", arguments={"a": 1, "b": 1})
    assert result.is_error
    assert "refused the access token (HTTP 401)" in text(result)
    assert "HTTP 400 (invalid_grant)" in text(result)


async def test_an_upstream_restart_costs_no_failed_call(proxy: McpProxyClient, mcp_upstream: Upstream) -> None:
    await proxy.put_credential(*credential_for(mcp_upstream))
    token = (await proxy.mint_session_token("sess-1", ["files"])).token
    assert text(await proxy.call_tool(token, server="files", tool="add", arguments={"a": 1, "b": 1})) == "2"
    # The new process knows nothing of the proxy's MCP session; the proxy opens a new one and carries on.
    await mcp_upstream.stop()
    await mcp_upstream.start()
    assert text(await proxy.call_tool(token, server="files", tool="add", arguments={"a": 2, "b": 1})) == "3"
    # Down, the call fails; up again, the next one works.
    await mcp_upstream.stop()
    assert (await proxy.call_tool(token, server="files", tool="add", arguments={"a": 1, "b": 1})).is_error
    await mcp_upstream.start()
    assert text(await proxy.call_tool(token, server="files", tool="add", arguments={"a": 3, "b": 1})) == "4"


async def test_calls_outside_the_tokens_grants_are_refused(
    proxy: McpProxyClient, mcp_upstream: Upstream, second_upstream: Upstream
) -> None:
    await proxy.put_credential(*credential_for(mcp_upstream))
    await proxy.put_credential(*credential_for(second_upstream))
    await proxy.put_credential(
        mcp_proxy_pb2.Credential(name="git", kind=mcp_proxy_pb2.CREDENTIAL_KIND_GIT_TOKEN),
        mcp_proxy_pb2.CredentialSecret(token="ghp_abc"),
    )
    token = (await proxy.mint_session_token("sess-1", ["files", "git"])).token

    with pytest.raises(NotGranted, match="does not grant 'tickets'"):
        await proxy.call_tool(token, server="tickets", tool="add", arguments={})
    with pytest.raises(InvalidArgument, match="not an MCP server credential"):
        await proxy.call_tool(token, server="git", tool="add", arguments={})
    await proxy.delete_credential("files")
    with pytest.raises(CredentialNotFound, match="since been deleted"):
        await proxy.call_tool(token, server="files", tool="add", arguments={})
    with pytest.raises(CredentialNotFound, match="grants\\[0\\]"):
        await proxy.mint_session_token("sess-2", ["nope"])
    assert second_upstream.presented == []


async def test_a_replaced_credential_is_used_from_the_next_call(
    proxy: McpProxyClient, mcp_upstream: Upstream, second_upstream: Upstream
) -> None:
    await proxy.put_credential(*credential_for(mcp_upstream, name="work"))
    token = (await proxy.mint_session_token("sess-1", ["work"])).token
    assert not (await proxy.call_tool(token, server="work", tool="echo", arguments={"text": "a"})).is_error
    # Same name, now another server: the open connection to the first one must not be reused.
    await proxy.put_credential(*credential_for(second_upstream, name="work"))
    assert not (await proxy.call_tool(token, server="work", tool="echo", arguments={"text": "b"})).is_error
    assert second_upstream.presented


async def test_a_callers_short_deadline_gets_a_result_not_an_rpc_error(
    proxy_server: ProxyServer, mcp_upstream: Upstream
) -> None:
    # A caller's gRPC deadline shorter than the call's timeout: the proxy answers before it passes.
    async with McpProxyClient.connect(proxy_server.address) as client:
        await client.put_credential(*credential_for(mcp_upstream))
        token = (await client.mint_session_token("sess-1", ["files"])).token
        request = mcp_proxy_pb2.McpProxyServiceCallToolRequest(session_token=token, server="files", tool="slow")
        request.arguments.update({"seconds": 30})
        channel = dial(proxy_server.address)
        response = await mcp_proxy_pb2_grpc.McpProxyServiceStub(channel).CallTool(request, timeout=1.0)
        await channel.close()
    assert response.is_error and "did not answer" in text(response)


async def test_bad_tokens_are_unauthenticated_with_a_reason(proxy: McpProxyClient, mcp_upstream: Upstream) -> None:
    await proxy.put_credential(*credential_for(mcp_upstream))
    with pytest.raises(TokenInvalid, match="required"):
        await proxy.list_tools("")
    with pytest.raises(TokenInvalid, match="malformed"):
        await proxy.call_tool("garbage", server="files", tool="add", arguments={})
    token = (await proxy.mint_session_token("sess-1", ["files"], ttl=60)).token
    prefix, payload, signature = token.split(".")
    # A session widening its own grants and lifetime: the payload is readable, but not writable.
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    assert claims["g"] == ["files"]
    claims["g"], claims["e"] = ["files", "tickets"], claims["e"] + 10**12
    widened = base64.urlsafe_b64encode(json.dumps(claims).encode()).decode().rstrip("=")
    with pytest.raises(TokenInvalid, match="signature does not verify"):
        await proxy.list_tools(f"{prefix}.{widened}.{signature}")
    with pytest.raises(TokenInvalid, match="signature does not verify"):
        await proxy.call_tool(f"{prefix}.{payload}.{signature[::-1]}", server="files", tool="add", arguments={})
    assert mcp_upstream.presented == []
