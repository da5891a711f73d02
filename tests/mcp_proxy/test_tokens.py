"""Session tokens: bound to a session, its grants and an expiry; refused when missing, forged, expired or
revoked, each with a sentence saying which; revocation survives a restart."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from managed_agents.mesh.errors import InvalidArgument, TokenInvalid
from mcp_proxy import app
from mcp_proxy.client import McpProxyClient
from mcp_proxy.config import ProxyConfig
from mcp_proxy.tokens import SIGNING_PURPOSE, SqliteTokenLedger, TokenAuthority
from mcp_proxy.vault import VaultKey
from tests.mcp_proxy.servers import Upstream, credential_for

WEEK_US = 7 * 86_400_000_000


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


async def test_a_token_says_what_it_was_minted_for_until_it_expires(tmp_path: Path) -> None:
    clock = Clock()
    ledger = await SqliteTokenLedger.open(tmp_path, max_ttl_us=WEEK_US)
    tokens = TokenAuthority(b"k" * 32, ledger, clock=clock)
    token, grant = await tokens.mint("sess-1", ["files", "tickets"], ttl_us=60_000_000)
    verified = tokens.verify(token)
    assert verified == grant
    assert verified.session_id == "sess-1" and verified.allows("tickets") and not verified.allows("git")
    clock.now += 59.9
    tokens.verify(token)
    clock.now += 0.1
    with pytest.raises(TokenInvalid, match="expired at"):
        tokens.verify(token)
    # Another key did not sign it.
    with pytest.raises(TokenInvalid, match="signature"):
        TokenAuthority(b"o" * 32, ledger, clock=clock).verify(token)
    await ledger.aclose()


async def test_revocation_counts_live_tokens_and_spares_later_ones(tmp_path: Path) -> None:
    clock = Clock()
    ledger = await SqliteTokenLedger.open(tmp_path, max_ttl_us=WEEK_US)
    tokens = TokenAuthority(b"k" * 32, ledger, clock=clock)
    first, _ = await tokens.mint("sess-1", ["files"], ttl_us=60_000_000)
    second, _ = await tokens.mint("sess-1", ["files"], ttl_us=3_600_000_000)
    other, _ = await tokens.mint("sess-2", ["files"], ttl_us=3_600_000_000)
    clock.now += 120  # the first has expired: it is not counted
    assert await tokens.revoke("sess-1") == 1
    for token in (first, second):
        with pytest.raises(TokenInvalid, match=r"revoked|expired"):
            tokens.verify(token)
    assert tokens.verify(other).session_id == "sess-2"  # another session's token is untouched
    later, _ = await tokens.mint("sess-1", ["files"], ttl_us=60_000_000)
    assert tokens.verify(later).session_id == "sess-1"
    assert await tokens.revoke("sess-1") == 1
    assert await tokens.revoke("sess-1") == 0
    await ledger.aclose()


async def test_minted_tokens_work_over_grpc_and_bad_ones_say_why(
    proxy: McpProxyClient, mcp_upstream: Upstream, tmp_path: Path, vault_key: VaultKey
) -> None:
    await proxy.put_credential(*credential_for(mcp_upstream))
    minted = await proxy.mint_session_token("sess-1", ["files"], ttl=120)
    assert 110 < minted.expire_time.ToSeconds() - time.time() <= 120
    assert len(await proxy.list_tools(minted.token)) == 5

    # A token minted an hour ago by this proxy's key, for one minute: signed right, but expired.
    ledger = await SqliteTokenLedger.open(tmp_path, max_ttl_us=WEEK_US)
    past = TokenAuthority(vault_key.derive(SIGNING_PURPOSE), ledger, clock=lambda: time.time() - 3600)
    expired, _ = await past.mint("sess-1", ["files"], ttl_us=60_000_000)
    await ledger.aclose()
    with pytest.raises(TokenInvalid, match="expired at"):
        await proxy.list_tools(expired)
    with pytest.raises(TokenInvalid, match="expired at"):
        await proxy.call_tool(expired, server="files", tool="add", arguments={"a": 1, "b": 1})

    assert await proxy.revoke_session_token("sess-1") == 1
    with pytest.raises(TokenInvalid, match="revoked: RevokeSessionToken was called for session 'sess-1'"):
        await proxy.call_tool(minted.token, server="files", tool="add", arguments={"a": 1, "b": 1})
    fresh = await proxy.mint_session_token("sess-1", ["files"])
    assert len(await proxy.list_tools(fresh.token)) == 5
    assert set(mcp_upstream.presented) == {mcp_upstream.access_token}


async def test_revocation_survives_a_restart(tmp_path: Path, vault_key: VaultKey, mcp_upstream: Upstream) -> None:
    config = ProxyConfig(listen="127.0.0.1:0", data_dir=tmp_path / "proxy")
    server = await app.start(config, vault_key, None)
    async with McpProxyClient.connect(server.address) as proxy:
        await proxy.put_credential(*credential_for(mcp_upstream))
        revoked = (await proxy.mint_session_token("sess-1", ["files"])).token
        kept = (await proxy.mint_session_token("sess-2", ["files"])).token
        assert await proxy.revoke_session_token("sess-1") == 1
    await server.aclose(grace=1.0)

    server = await app.start(config, vault_key, None)
    async with McpProxyClient.connect(server.address) as proxy:
        with pytest.raises(TokenInvalid, match="revoked"):
            await proxy.list_tools(revoked)
        assert len(await proxy.list_tools(kept)) == 5
    await server.aclose(grace=1.0)


@pytest.mark.parametrize(
    ("session_id", "grants", "ttl", "expected"),
    [
        ("", ["files"], 0, "session_id: is required"),
        ("has space", ["files"], 0, "session_id"),
        ("s", [], 0, "grants: must name 1 to 20"),
        ("s", [f"g{i}" for i in range(21)], 0, "grants: must name 1 to 20"),
        ("s", ["files", "files"], 0, "listed twice"),
        ("s", ["Files"], 0, "grants[0]"),
        ("s", ["files"], 30, "ttl: must be between 1 min and 7 days"),
        ("s", ["files"], 8 * 86400, "ttl: must be between 1 min and 7 days"),
    ],
)
async def test_mint_refuses_bad_requests(
    proxy: McpProxyClient,
    mcp_upstream: Upstream,
    session_id: str,
    grants: list[str],
    ttl: float,
    expected: str,
) -> None:
    await proxy.put_credential(*credential_for(mcp_upstream))
    with pytest.raises(InvalidArgument) as raised:
        await proxy.mint_session_token(session_id, grants, ttl=ttl)
    assert expected in str(raised.value)
