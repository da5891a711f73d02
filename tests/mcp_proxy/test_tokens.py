"""Session tokens: bound to a session, its grants and an expiry; refused when forged, expired or revoked."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from managed_agents.mesh.errors import TokenInvalid
from mcp_proxy.tokens import SqliteTokenLedger, TokenAuthority

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
