"""Session tokens: signed grants of named credentials to one session until an expiry, revocable per session.

A token is `mst1.<payload>.<signature>`, both base64url: the payload names the session, the granted
credentials, the expiry, the issue time and a token id, and the signature is HMAC-SHA256 under a key derived
from the vault key. Verifying one is a pure computation (no database round trip), which keeps it off the
latency of every call. Revocation is a per-session watermark: tokens of that session issued at or before it
are refused. Watermarks and the ids of issued tokens (to count what a revocation revoked) persist in
`DATA_DIR/tokens.sqlite3`, so revocation survives a restart. Rotating the vault key changes the signing key,
which invalidates every outstanding token; sessions mint new ones.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import aiosqlite

from managed_agents.mesh.errors import TokenInvalid

PREFIX = "mst1"
SIGNING_PURPOSE = b"managed-agents mcp_proxy session tokens v1"
MAX_TOKEN_CHARS = 4096
DATABASE_NAME = "tokens.sqlite3"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS issued (
    token_id    TEXT PRIMARY KEY,
    session_id  TEXT NOT NULL,
    issue_time  INTEGER NOT NULL,
    expire_time INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS issued_by_session ON issued (session_id, issue_time);
CREATE TABLE IF NOT EXISTS revocations (
    session_id  TEXT PRIMARY KEY,
    revoke_time INTEGER NOT NULL
) WITHOUT ROWID;
"""


@dataclass(frozen=True, slots=True)
class SessionGrant:
    """What a valid token says: the session, the credentials it may use, and when the token dies."""

    session_id: str
    grants: tuple[str, ...]
    issue_time_us: int
    expire_time_us: int
    token_id: str

    def allows(self, name: str) -> bool:
        """True if the token grants credential `name`."""
        return name in self.grants


class TokenLedger(Protocol):
    """Durable record of issued tokens and per-session revocation watermarks."""

    async def record(self, grant: SessionGrant) -> None:
        """Notes an issued token (never the token itself)."""
        ...

    async def revoke(self, session_id: str, *, now_us: int) -> int:
        """Sets the session's watermark to `now_us`; returns how many unexpired tokens it revoked."""
        ...

    async def watermarks(self) -> dict[str, int]:
        """Every session's revocation watermark."""
        ...


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _utc(micros: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(micros / 1e6))


class TokenAuthority:
    """Mints, verifies and revokes session tokens."""

    def __init__(self, signing_key: bytes, ledger: TokenLedger, *, clock: Callable[[], float] = time.time) -> None:
        self._key = signing_key
        self._ledger = ledger
        self._clock = clock
        self._watermarks: dict[str, int] = {}

    async def load(self) -> None:
        """Reads the revocation watermarks; call once before serving."""
        self._watermarks = await self._ledger.watermarks()

    def _now_us(self) -> int:
        return int(self._clock() * 1_000_000)

    def _sign(self, signed_part: str) -> str:
        return _b64(hmac.new(self._key, signed_part.encode(), hashlib.sha256).digest())

    async def mint(self, session_id: str, grants: Sequence[str], *, ttl_us: int) -> tuple[str, SessionGrant]:
        """A new token for `session_id` granting `grants` for `ttl_us`, and what it says."""
        now = self._now_us()
        # Issued strictly after any revocation of the session, even within the same microsecond.
        issued = max(now, self._watermarks.get(session_id, 0) + 1)
        grant = SessionGrant(
            session_id=session_id,
            grants=tuple(grants),
            issue_time_us=issued,
            expire_time_us=now + ttl_us,
            token_id=_b64(os.urandom(12)),
        )
        payload = json.dumps(
            {
                "s": grant.session_id,
                "g": list(grant.grants),
                "i": grant.issue_time_us,
                "e": grant.expire_time_us,
                "j": grant.token_id,
            },
            separators=(",", ":"),
        )
        signed_part = f"{PREFIX}.{_b64(payload.encode())}"
        await self._ledger.record(grant)
        return f"{signed_part}.{self._sign(signed_part)}", grant

    def verify(self, token: str) -> SessionGrant:
        """What `token` grants; raises `TokenInvalid` with a sentence (never quoting the token) if nothing."""
        if not token:
            raise TokenInvalid("session_token is required: mint one with MintSessionToken")
        if len(token) > MAX_TOKEN_CHARS or token.count(".") != 2:
            raise TokenInvalid("session_token is malformed: it is not a token this proxy issues")
        prefix, payload, signature = token.split(".")
        if prefix != PREFIX:
            raise TokenInvalid("session_token is malformed: it is not a token this proxy issues")
        if not hmac.compare_digest(self._sign(f"{prefix}.{payload}"), signature):
            raise TokenInvalid(
                "session_token's signature does not verify: this proxy did not issue it, it was altered, or "
                "the vault key was rotated since; mint a new one"
            )
        try:
            data = json.loads(_unb64(payload))
            grant = SessionGrant(
                session_id=str(data["s"]),
                grants=tuple(str(g) for g in data["g"]),
                issue_time_us=int(data["i"]),
                expire_time_us=int(data["e"]),
                token_id=str(data["j"]),
            )
        except (binascii.Error, ValueError, KeyError, TypeError):
            # Only reachable with the signing key: a bug, not an attack. Say so without details.
            raise TokenInvalid("session_token is malformed: its signed payload cannot be read") from None
        now = self._now_us()
        if now >= grant.expire_time_us:
            raise TokenInvalid(
                f"session_token expired at {_utc(grant.expire_time_us)}; mint a new one with MintSessionToken"
            )
        if grant.issue_time_us <= self._watermarks.get(grant.session_id, 0):
            raise TokenInvalid(
                f"session_token was revoked: RevokeSessionToken was called for session {grant.session_id!r}"
            )
        return grant

    async def revoke(self, session_id: str) -> int:
        """Revokes every token of `session_id` issued so far; returns how many were still unexpired."""
        # Past every token issued so far, including those minted just after an earlier revocation (which get
        # the old watermark + 1 when the clock has not moved on).
        now = max(self._now_us(), self._watermarks.get(session_id, 0) + 1)
        count = await self._ledger.revoke(session_id, now_us=now)
        self._watermarks[session_id] = now
        return count


class SqliteTokenLedger:
    """`TokenLedger` in `DATA_DIR/tokens.sqlite3` (the vault's directory, whose lock covers it)."""

    def __init__(self, conn: aiosqlite.Connection, *, max_ttl_us: int) -> None:
        self._conn = conn
        self._max_ttl_us = max_ttl_us

    @classmethod
    async def open(cls, data_dir: Path, *, max_ttl_us: int) -> SqliteTokenLedger:
        """Opens (creating if needed) the ledger; watermarks older than the longest token life are dropped."""
        conn = await aiosqlite.connect(data_dir / DATABASE_NAME, isolation_level=None)
        try:
            for pragma in ("journal_mode = WAL", "synchronous = FULL"):
                await conn.execute(f"PRAGMA {pragma}")
            await conn.executescript(_SCHEMA)
        except BaseException:
            await conn.close()
            raise
        return cls(conn, max_ttl_us=max_ttl_us)

    async def aclose(self) -> None:
        """Closes the database."""
        await self._conn.close()

    async def record(self, grant: SessionGrant) -> None:
        await self._conn.execute(
            "INSERT INTO issued (token_id, session_id, issue_time, expire_time) VALUES (?, ?, ?, ?)",
            (grant.token_id, grant.session_id, grant.issue_time_us, grant.expire_time_us),
        )

    async def revoke(self, session_id: str, *, now_us: int) -> int:
        await self._conn.execute("BEGIN IMMEDIATE")
        try:
            async with self._conn.execute(
                "SELECT count(*) FROM issued WHERE session_id = ? AND expire_time > ? AND issue_time > "
                "coalesce((SELECT revoke_time FROM revocations WHERE session_id = ?), 0)",
                (session_id, now_us, session_id),
            ) as cursor:
                row = await cursor.fetchone()
            await self._conn.execute(
                "INSERT OR REPLACE INTO revocations (session_id, revoke_time) VALUES (?, ?)",
                (session_id, now_us),
            )
            # Expired tokens need no record any more: nothing can present them successfully.
            await self._conn.execute("DELETE FROM issued WHERE expire_time <= ?", (now_us,))
            await self._conn.execute("COMMIT")
        except BaseException:
            await self._conn.execute("ROLLBACK")
            raise
        return int(row[0]) if row else 0

    async def watermarks(self) -> dict[str, int]:
        # A watermark older than the longest token life can no longer refuse anything.
        oldest = time.time_ns() // 1000 - self._max_ttl_us
        await self._conn.execute("DELETE FROM revocations WHERE revoke_time < ?", (oldest,))
        async with self._conn.execute("SELECT session_id, revoke_time FROM revocations") as cursor:
            rows = await cursor.fetchall()
        return {str(session): int(when) for session, when in rows}
