"""The rules every event store backend applies, whatever its database, so that SQLite and PostgreSQL cannot
drift apart: the commands a writer executes, the guards of an append (idempotency, lease fencing,
expected_seq), how new events get their sequence numbers and encoding, and how leases change hands.

Backends load a session's row, apply these functions to it under whatever lock their database offers (the
single writer thread for SQLite, `SELECT ... FOR UPDATE` for PostgreSQL), and write the result back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from managed_agents.mesh.errors import IdempotencyKeyReused, LeaseFenced, LeaseHeld, SequenceMismatch
from managed_agents.mesh.ids import EVENT_PREFIX, new_id
from session_store import wire
from session_store.store import AppendRequest, Lease, SessionRecord, SessionStatus, StoredEvent

# Column order of a session row, shared by every backend's SELECT and INSERT.
SESSION_COLUMNS = (
    "session_id, status, last_seq, create_time, update_time, lease_holder, lease_epoch, lease_expire, spec, log_bytes"
)


@dataclass(slots=True)
class SessionRow:
    """A writer's mutable copy of one session's row."""

    session_id: str
    status: SessionStatus
    last_seq: int
    create_time_us: int
    update_time_us: int
    holder: str
    epoch: int
    expire_us: int
    spec: bytes
    log_bytes: int
    dirty: bool = False

    @classmethod
    def from_values(cls, values: Sequence[Any]) -> SessionRow:
        """A row from its columns in `SESSION_COLUMNS` order."""
        sid, status, last_seq, create, update, holder, epoch, expire, spec, log_bytes = values
        return cls(
            str(sid),
            SessionStatus(int(status)),
            int(last_seq),
            int(create),
            int(update),
            str(holder),
            int(epoch),
            int(expire),
            bytes(spec),
            int(log_bytes),
        )

    @classmethod
    def new(cls, session_id: str, spec: bytes, now: int) -> SessionRow:
        """The row of a session just created."""
        return cls(session_id, SessionStatus.IDLE, 0, now, now, "", 0, 0, spec, 0)

    def values(self) -> tuple[Any, ...]:
        """The columns in `SESSION_COLUMNS` order."""
        return (
            self.session_id,
            int(self.status),
            self.last_seq,
            self.create_time_us,
            self.update_time_us,
            self.holder,
            self.epoch,
            self.expire_us,
            self.spec,
            self.log_bytes,
        )

    def record(self) -> SessionRecord:
        """The public record of this row."""
        return SessionRecord(
            session_id=self.session_id,
            status=self.status,
            last_seq=self.last_seq,
            create_time_us=self.create_time_us,
            update_time_us=self.update_time_us,
            lease=Lease(holder=self.holder, epoch=self.epoch, expire_time_us=self.expire_us),
            spec=self.spec,
        )


def record_from_values(values: Sequence[Any]) -> SessionRecord:
    """A session record from a row's columns."""
    return SessionRow.from_values(values).record()


# Commands a writer executes, in the order they were submitted.
@dataclass(frozen=True, slots=True)
class Create:
    session_id: str
    spec: bytes


@dataclass(frozen=True, slots=True)
class Append:
    request: AppendRequest


@dataclass(frozen=True, slots=True)
class Acquire:
    session_id: str
    holder: str
    ttl_us: int


@dataclass(frozen=True, slots=True)
class Renew:
    session_id: str
    holder: str
    epoch: int
    ttl_us: int


@dataclass(frozen=True, slots=True)
class Release:
    session_id: str
    holder: str
    epoch: int


Command = Create | Append | Acquire | Renew | Release


def command_session(command: Command) -> str:
    """The session a command touches."""
    return command.request.session_id if isinstance(command, Append) else command.session_id


def check_replay(request: AppendRequest, stored_digest: bytes) -> None:
    """A key seen before must come with the same request, or it is a mistake, not a retry."""
    if stored_digest != request.request_digest:
        raise IdempotencyKeyReused(
            f"idempotency key {request.idempotency_key!r} was already used in session {request.session_id} for a "
            "different request; use a new key for a new append"
        )


def check_guards(row: SessionRow, request: AppendRequest) -> None:
    """Fencing and optimistic concurrency: raises `LeaseFenced` or `SequenceMismatch`."""
    if request.lease_epoch and request.lease_epoch != row.epoch:
        raise LeaseFenced(
            f"lease epoch {request.lease_epoch} is stale: session {row.session_id} is at epoch {row.epoch} "
            f"(holder {row.holder or 'none'}); this writer no longer owns the session",
            metadata={"epoch": str(row.epoch), "holder": row.holder},
        )
    if request.expected_seq is not None and request.expected_seq != row.last_seq + 1:
        raise SequenceMismatch(
            f"expected_seq {request.expected_seq} does not match: the next event of session {row.session_id} "
            f"would be {row.last_seq + 1}",
            metadata={"last_seq": str(row.last_seq)},
        )


def append_events(row: SessionRow, request: AppendRequest, now: int) -> list[tuple[StoredEvent, int]]:
    """The new events with their sequence numbers, complete encodings and end offsets; updates `row`."""
    stored = []
    for event in request.events:
        row.last_seq += 1
        event_id = new_id(EVENT_PREFIX)
        body = wire.event_bytes(
            event.body,
            event_id=event_id,
            session_id=row.session_id,
            seq=row.last_seq,
            type=event.type,
            create_time_us=now,
        )
        row.log_bytes += len(body)
        stored.append((StoredEvent(row.session_id, row.last_seq, event_id, event.type, now, body), row.log_bytes))
        if event.status is not None:
            row.status = event.status
    row.dirty = True
    return stored


def acquire(row: SessionRow, holder: str, ttl_us: int, now: int) -> None:
    """Takes or extends the lease; a new holder gets a higher epoch, fencing every earlier writer."""
    if row.holder and row.expire_us > now:
        if row.holder != holder:
            raise LeaseHeld(
                f"session {row.session_id} is leased to {row.holder} (epoch {row.epoch}) for another "
                f"{(row.expire_us - now) / 1e6:.1f} s",
                metadata={"holder": row.holder, "epoch": str(row.epoch), "expire_time_us": str(row.expire_us)},
            )
    else:
        row.epoch += 1
        row.holder = holder
    row.expire_us = now + ttl_us
    row.dirty = True


def _check_holder(row: SessionRow, holder: str, epoch: int) -> None:
    if row.holder != holder or row.epoch != epoch:
        raise LeaseFenced(
            f"lease of session {row.session_id} moved on: it is at epoch {row.epoch} held by "
            f"{row.holder or 'nobody'}, not epoch {epoch} held by {holder}",
            metadata={"epoch": str(row.epoch), "holder": row.holder},
        )


def renew(row: SessionRow, holder: str, epoch: int, ttl_us: int, now: int) -> None:
    """Extends a lease its holder still has."""
    _check_holder(row, holder, epoch)
    row.expire_us = now + ttl_us
    row.dirty = True


def release(row: SessionRow, holder: str, epoch: int) -> None:
    """Gives a lease up, keeping its epoch."""
    _check_holder(row, holder, epoch)
    row.holder, row.expire_us, row.dirty = "", 0, True
