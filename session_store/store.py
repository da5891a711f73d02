"""The `EventStore` interface every backend implements, and the plain records it speaks.

The store core knows nothing of gRPC or protobuf: an event is an opaque `body` (the serialized payload the
servicer hands it) plus the indexed columns the store itself assigns (`seq`, `event_id`, time).
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Protocol


class SessionStatus(enum.IntEnum):
    """Session status; the numbers match `managed_agents.v1.SessionStatus`."""

    IDLE = 1
    RUNNING = 2
    RESCHEDULING = 3
    TERMINATED = 4


@dataclass(frozen=True, slots=True)
class NewEvent:
    """An event to append: its dotted type, opaque body, and the status it moves the session to, if any."""

    type: str
    body: bytes
    status: SessionStatus | None = None


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """An event as committed."""

    session_id: str
    seq: int
    event_id: str
    type: str
    create_time_us: int
    body: bytes


@dataclass(frozen=True, slots=True)
class Lease:
    """A session's lease; `holder` is empty when nobody holds it."""

    holder: str = ""
    epoch: int = 0
    expire_time_us: int = 0


@dataclass(frozen=True, slots=True)
class SessionRecord:
    """A session's row: status, log length, times, lease and the opaque spec (title, metadata, agent)."""

    session_id: str
    status: SessionStatus
    last_seq: int
    create_time_us: int
    update_time_us: int
    lease: Lease
    spec: bytes


@dataclass(frozen=True, slots=True)
class AppendRequest:
    """One atomic append of `events` to a session, with its optional guards."""

    session_id: str
    events: Sequence[NewEvent]
    idempotency_key: str = ""
    # Digest of the request, so a key reused for a different request is told apart from a retry.
    request_digest: bytes = b""
    expected_seq: int | None = None
    lease_epoch: int = 0


@dataclass(frozen=True, slots=True)
class AppendResult:
    """The committed events and whether they were stored by an earlier attempt with the same key."""

    events: tuple[StoredEvent, ...]
    replayed: bool = False


@dataclass(frozen=True, slots=True)
class SessionCursor:
    """Position in the newest-first session listing: after this (create time, id)."""

    create_time_us: int
    session_id: str


@dataclass(frozen=True, slots=True)
class SessionPage:
    """One page of the session listing, and whether more sessions follow it."""

    records: tuple[SessionRecord, ...]
    more: bool


LISTED_ROW_BYTES = 512
"""What a listed session costs beyond its spec, for `list_sessions`' byte budget: the output-only fields of a
`Session` message (id, status, times, lease holder) and its framing take less."""


def sessions_that_fit(spec_sizes: Sequence[int], limit: int, max_bytes: int) -> int:
    """How many of the sessions with these spec sizes (in listing order) a page holds: at most `limit`, and past
    the first only while their specs and `LISTED_ROW_BYTES` each total at most `max_bytes`."""
    total = 0
    for count, size in enumerate(spec_sizes[:limit]):
        total += size + LISTED_ROW_BYTES
        if count and total > max_bytes:
            return count
    return min(len(spec_sizes), limit)


class EventStore(Protocol):
    """A durable event log of many sessions. Appends to one session are totally ordered with dense `seq`."""

    async def create_session(self, session_id: str, *, spec: bytes) -> SessionRecord:
        """Creates an idle, empty session. Raises `SessionAlreadyExists`."""
        ...

    async def get_session(self, session_id: str) -> SessionRecord:
        """Raises `SessionNotFound`."""
        ...

    async def list_sessions(
        self,
        *,
        limit: int,
        max_bytes: int,
        status: SessionStatus | None = None,
        orphaned_only: bool = False,
        after: SessionCursor | None = None,
    ) -> SessionPage:
        """Sessions newest first, after `after`: at most `limit`, and past the first only as many as
        `sessions_that_fit` in `max_bytes`, read from one snapshot; `more` if others follow."""
        ...

    async def append(self, request: AppendRequest) -> AppendResult:
        """Appends atomically once durable. Raises `SessionNotFound`, `SequenceMismatch`, `LeaseFenced`,
        `IdempotencyKeyReused` or `ShuttingDown`."""
        ...

    async def read_events(
        self, session_id: str, *, after_seq: int, until_seq: int, limit: int, max_bytes: int
    ) -> list[StoredEvent]:
        """Events with `after_seq < seq <= until_seq`, at most `limit` of them and, past the first, at most
        `max_bytes` of bodies. Does not check that the session exists. Raises `DataLoss` if the database is
        corrupt (as every method may)."""
        ...

    def watch(self, session_id: str, *, after_seq: int) -> AsyncIterator[StoredEvent]:
        """Events after `after_seq`: the stored backlog, then live ones, gap-free and without duplicates.
        Raises `ShuttingDown` when the store closes."""
        ...

    async def acquire_lease(self, session_id: str, *, holder: str, ttl_us: int) -> SessionRecord:
        """Takes or extends the lease. Raises `LeaseHeld` if another holder's lease has not expired."""
        ...

    async def renew_lease(self, session_id: str, *, holder: str, epoch: int, ttl_us: int) -> SessionRecord:
        """Extends a held lease. Raises `LeaseFenced` if the lease moved on."""
        ...

    async def release_lease(self, session_id: str, *, holder: str, epoch: int) -> SessionRecord:
        """Gives the lease up, keeping its epoch. Raises `LeaseFenced` if the lease moved on."""
        ...

    async def aclose(self) -> None:
        """Finishes queued appends, ends watches and closes the database."""
        ...
