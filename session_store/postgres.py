"""The shared event store: PostgreSQL through asyncpg, for many store servers over one database.

Appends stay linearizable per session across servers: each group of commands runs in one transaction that
first locks the rows of the sessions it touches (`SELECT ... FOR UPDATE`, in a fixed order, so two servers
cannot deadlock), applies the same rules as SQLite to them (`session_store.rules`), and relies on the
`(session_id, seq)` primary key as a last line of defence. Lease times come from the database's clock, so
servers with skewed clocks agree on who holds a session.

The live tail crosses servers through LISTEN/NOTIFY: a committing transaction notifies `session_id:last_seq`,
and every server's listener reads the new events of the sessions its watchers follow and hands them to its
`Tail`. The schema is versioned; `python -m session_store migrate --store-url URL` applies it.

PostgreSQL's own corruption errors (`data_corrupted`, `index_corrupted`) answer `DATA_LOSS`, never a retryable
code. Unlike SQLite's single file, the damage is the cluster operator's to find (`pg_amcheck`) and is not
assumed to spread to every call.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg

from managed_agents.mesh.errors import MeshError, SessionAlreadyExists, SessionNotFound
from session_store import rules
from session_store.errors import DataLoss
from session_store.group_commit import GroupCommitter
from session_store.store import (
    AppendRequest,
    AppendResult,
    SessionCursor,
    SessionPage,
    SessionRecord,
    SessionStatus,
    StoredEvent,
    sessions_that_fit,
)
from session_store.tail import MAX_PENDING_BYTES, Tail

log = logging.getLogger(__name__)

CHANNEL = "managed_agents_events"
_NOW = "(extract(epoch from clock_timestamp()) * 1000000)::bigint"

# Versioned schema: each entry is applied once, in order, recorded in schema_migrations.
MIGRATIONS: tuple[tuple[int, str], ...] = (
    (
        1,
        """
        CREATE TABLE sessions (
            session_id   text PRIMARY KEY,
            status       smallint NOT NULL,
            last_seq     bigint NOT NULL,
            create_time  bigint NOT NULL,
            update_time  bigint NOT NULL,
            lease_holder text NOT NULL DEFAULT '',
            lease_epoch  bigint NOT NULL DEFAULT 0,
            lease_expire bigint NOT NULL DEFAULT 0,
            spec         bytea NOT NULL,
            log_bytes    bigint NOT NULL DEFAULT 0
        );
        CREATE INDEX sessions_newest ON sessions (create_time DESC, session_id DESC);
        CREATE INDEX sessions_by_status ON sessions (status, create_time DESC, session_id DESC);
        CREATE TABLE events (
            session_id  text NOT NULL,
            seq         bigint NOT NULL,
            end_offset  bigint NOT NULL,
            event_id    text NOT NULL,
            type        text NOT NULL,
            create_time bigint NOT NULL,
            body        bytea NOT NULL,
            PRIMARY KEY (session_id, seq)
        );
        CREATE TABLE idempotency (
            session_id text NOT NULL,
            key        text NOT NULL,
            digest     bytea NOT NULL,
            first_seq  bigint NOT NULL,
            count      integer NOT NULL,
            PRIMARY KEY (session_id, key)
        );
        """,
    ),
)
LATEST = MIGRATIONS[-1][0]
_CORRUPTION = (asyncpg.DataCorruptedError, asyncpg.IndexCorruptedError)


@contextlib.contextmanager
def _corruption_is_data_loss(outcome: str) -> Iterator[None]:
    """Re-raises PostgreSQL's corruption errors (SQLSTATE XX001, XX002) as `DataLoss`."""
    try:
        yield
    except _CORRUPTION as error:
        log.error("PostgreSQL reports corruption: %s (SQLSTATE %s); %s", error, error.sqlstate, outcome)
        raise DataLoss(
            f"the session store's PostgreSQL database reports corruption ({error}); {outcome}. An operator must "
            "repair the database (check it with pg_amcheck, restore from a backup)"
        ) from None


async def migrate(url: str) -> list[int]:
    """Applies pending migrations (under an advisory lock, so concurrent runs are safe); returns those applied."""
    connection = await asyncpg.connect(url)
    try:
        await connection.execute("SELECT pg_advisory_lock(7301)")
        await connection.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations "
            "(version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {r["version"] for r in await connection.fetch("SELECT version FROM schema_migrations")}
        applied = []
        for version, sql in MIGRATIONS:
            if version in done:
                continue
            async with connection.transaction():
                await connection.execute(sql)
                await connection.execute("INSERT INTO schema_migrations (version) VALUES ($1)", version)
            applied.append(version)
        return applied
    finally:
        with contextlib.suppress(Exception):
            await connection.execute("SELECT pg_advisory_unlock(7301)")
        await connection.close()


async def schema_version(connection: asyncpg.Connection) -> int:
    """The newest migration applied to the database, 0 for none."""
    exists = await connection.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
    if not exists:
        return 0
    return int(await connection.fetchval("SELECT coalesce(max(version), 0) FROM schema_migrations"))


class PostgresEventStore:
    """`EventStore` on PostgreSQL; see the module docstring."""

    def __init__(self, pool: asyncpg.Pool, listener: asyncpg.Connection, url: str) -> None:
        self._pool = pool
        self._listener = listener
        self._url = url
        self._tail = Tail()
        self._published: dict[str, int] = {}
        self._notices: asyncio.Queue[tuple[str, int, tuple[StoredEvent, ...]] | None] = asyncio.Queue()
        self._publisher = asyncio.create_task(self._publish_loop(), name="postgres-tail")
        self._commits = GroupCommitter(self._run_group, on_committed=self._committed)
        self._closing = False

    @classmethod
    async def open(cls, url: str, *, pool_size: int = 8) -> PostgresEventStore:
        """Connects; refuses with a sentence if the schema is missing or older than this server."""
        pool = await asyncpg.create_pool(url, min_size=1, max_size=pool_size)
        try:
            async with pool.acquire() as connection:
                version = await schema_version(connection)
            if version < LATEST:
                raise RuntimeError(
                    f"the database at {_redacted(url)} has schema version {version}, this store needs {LATEST}: "
                    f"run `python -m session_store migrate --store-url URL` first"
                )
            listener = await asyncpg.connect(url)
        except BaseException:
            await pool.close()
            raise
        store = cls(pool, listener, url)
        await listener.add_listener(CHANNEL, store._on_notify)
        return store

    @property
    def tail(self) -> Tail:
        """The live fan-out (exposed so tests and metrics can count watchers)."""
        return self._tail

    # Writes ------------------------------------------------------------------------------------------------

    async def _run_group(self, commands: list[rules.Command]) -> list[object]:
        with _corruption_is_data_loss("this write was not committed"):
            return await self._run_group_unguarded(commands)

    async def _run_group_unguarded(self, commands: list[rules.Command]) -> list[object]:
        sessions = sorted({rules.command_session(c) for c in commands})
        async with self._pool.acquire() as connection, connection.transaction():
            now = int(await connection.fetchval(f"SELECT {_NOW}"))
            locked = await connection.fetch(
                f"SELECT {rules.SESSION_COLUMNS} FROM sessions WHERE session_id = ANY($1::text[]) "
                "ORDER BY session_id FOR UPDATE",
                sessions,
            )
            rows = {r["session_id"]: rules.SessionRow.from_values(tuple(r)) for r in locked}
            keys = [
                (c.request.session_id, c.request.idempotency_key)
                for c in commands
                if isinstance(c, rules.Append) and c.request.idempotency_key
            ]
            seen: dict[tuple[str, str], tuple[bytes, int, int]] = {}
            if keys:
                for r in await connection.fetch(
                    "SELECT session_id, key, digest, first_seq, count FROM idempotency "
                    "WHERE (session_id, key) IN (SELECT * FROM unnest($1::text[], $2::text[]))",
                    [k[0] for k in keys],
                    [k[1] for k in keys],
                ):
                    seen[(r["session_id"], r["key"])] = (bytes(r["digest"]), r["first_seq"], r["count"])
            new_events: list[tuple[StoredEvent, int]] = []
            new_keys: list[tuple[str, str, bytes, int, int]] = []
            results: list[object] = []
            for command in commands:
                try:
                    results.append(await self._apply(connection, command, rows, seen, new_events, new_keys, now))
                except MeshError as error:
                    results.append(error)
            if new_events:
                await connection.executemany(
                    "INSERT INTO events (session_id, seq, end_offset, event_id, type, create_time, body) "
                    "VALUES ($1, $2, $3, $4, $5, $6, $7)",
                    [(e.session_id, e.seq, end, e.event_id, e.type, e.create_time_us, e.body) for e, end in new_events],
                )
            if new_keys:
                await connection.executemany(
                    "INSERT INTO idempotency (session_id, key, digest, first_seq, count) VALUES ($1, $2, $3, $4, $5)",
                    new_keys,
                )
            dirty = [row for row in rows.values() if row.dirty]
            if dirty:
                await connection.executemany(
                    "UPDATE sessions SET status = $1, last_seq = $2, log_bytes = $3, update_time = $4, "
                    "lease_holder = $5, lease_epoch = $6, lease_expire = $7 WHERE session_id = $8",
                    [
                        (int(r.status), r.last_seq, r.log_bytes, now, r.holder, r.epoch, r.expire_us, r.session_id)
                        for r in dirty
                    ],
                )
            appended = {e.session_id: e.seq for e, _ in new_events}
            for session_id, last_seq in appended.items():
                # Delivered to every listener when (and only if) this transaction commits.
                await connection.execute("SELECT pg_notify($1, $2)", CHANNEL, f"{session_id}:{last_seq}")
        return results

    async def _apply(
        self,
        connection: asyncpg.Connection,
        command: rules.Command,
        rows: dict[str, rules.SessionRow],
        seen: dict[tuple[str, str], tuple[bytes, int, int]],
        new_events: list[tuple[StoredEvent, int]],
        new_keys: list[tuple[str, str, bytes, int, int]],
        now: int,
    ) -> object:
        if isinstance(command, rules.Create):
            fresh = rules.SessionRow.new(command.session_id, command.spec, now)
            # Inserted at once (not batched): another server may be creating the same id right now.
            status = await connection.execute(
                f"INSERT INTO sessions ({rules.SESSION_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) "
                "ON CONFLICT (session_id) DO NOTHING",
                *fresh.values(),
            )
            if command.session_id in rows or status.endswith(" 0"):
                raise SessionAlreadyExists(f"session {command.session_id} already exists")
            rows[fresh.session_id] = fresh
            return fresh.record()
        session_id = rules.command_session(command)
        row = rows.get(session_id)
        if row is None:
            raise SessionNotFound(f"session {session_id} does not exist")
        match command:
            case rules.Append(request=request):
                key = (request.session_id, request.idempotency_key)
                if request.idempotency_key and key in seen:
                    digest, first_seq, count = seen[key]
                    rules.check_replay(request, digest)
                    earlier = [
                        e
                        for e, _ in new_events
                        if e.session_id == session_id and first_seq <= e.seq < first_seq + count
                    ]
                    if len(earlier) < count:
                        earlier = await self._read(connection, session_id, first_seq - 1, first_seq + count - 1)
                    return AppendResult(events=tuple(earlier), replayed=True)
                rules.check_guards(row, request)
                stored = rules.append_events(row, request, now)
                new_events.extend(stored)
                if request.idempotency_key:
                    seen[key] = (request.request_digest, stored[0][0].seq, len(stored))
                    new_keys.append(
                        (session_id, request.idempotency_key, request.request_digest, stored[0][0].seq, len(stored))
                    )
                return AppendResult(events=tuple(e for e, _ in stored))
            case rules.Acquire():
                rules.acquire(row, command.holder, command.ttl_us, now)
            case rules.Renew():
                rules.renew(row, command.holder, command.epoch, command.ttl_us, now)
            case rules.Release():
                rules.release(row, command.holder, command.epoch)
        return row.record()

    def _committed(self, result: object) -> None:
        if isinstance(result, AppendResult) and not result.replayed:
            last = result.events[-1]
            self._notices.put_nowait((last.session_id, last.seq, result.events))

    async def create_session(self, session_id: str, *, spec: bytes) -> SessionRecord:
        result = await self._commits.submit(rules.Create(session_id, spec), len(spec))
        assert isinstance(result, SessionRecord)
        return result

    async def append(self, request: AppendRequest) -> AppendResult:
        result = await self._commits.submit(rules.Append(request), sum(len(e.body) for e in request.events))
        assert isinstance(result, AppendResult)
        return result

    async def acquire_lease(self, session_id: str, *, holder: str, ttl_us: int) -> SessionRecord:
        result = await self._commits.submit(rules.Acquire(session_id, holder, ttl_us))
        assert isinstance(result, SessionRecord)
        return result

    async def renew_lease(self, session_id: str, *, holder: str, epoch: int, ttl_us: int) -> SessionRecord:
        result = await self._commits.submit(rules.Renew(session_id, holder, epoch, ttl_us))
        assert isinstance(result, SessionRecord)
        return result

    async def release_lease(self, session_id: str, *, holder: str, epoch: int) -> SessionRecord:
        result = await self._commits.submit(rules.Release(session_id, holder, epoch))
        assert isinstance(result, SessionRecord)
        return result

    # The live tail -----------------------------------------------------------------------------------------

    def _on_notify(self, _connection: Any, _pid: int, _channel: str, payload: str) -> None:
        session_id, _, seq = payload.rpartition(":")
        if session_id and seq.isdigit():
            self._notices.put_nowait((session_id, int(seq), ()))

    async def _publish_loop(self) -> None:
        """Hands new events of watched sessions to the tail, in order, whichever server appended them."""
        while True:
            notice = await self._notices.get()
            if notice is None:
                return
            session_id, last_seq, events = notice
            if not self._tail.subscriber_count(session_id):
                self._published.pop(session_id, None)
                continue
            published = self._published.get(session_id, last_seq - len(events) if events else last_seq - 1)
            if last_seq <= published:
                continue
            if not events or events[0].seq != published + 1:
                try:
                    # At most one watcher's queue of bytes: past that, the watchers read the rest themselves.
                    events = tuple(
                        await self.read_events(
                            session_id,
                            after_seq=published,
                            until_seq=last_seq,
                            limit=10_000,
                            max_bytes=MAX_PENDING_BYTES,
                        )
                    )
                except (OSError, asyncpg.PostgresError, DataLoss) as error:
                    log.warning("tail of %s: cannot read new events (%s); watchers will re-read", session_id, error)
                    self._tail.resync(session_id)
                    continue
                if not events or events[-1].seq != last_seq:
                    self._tail.resync(session_id)
                    self._published[session_id] = last_seq
                    continue
            self._tail.publish(session_id, events)
            self._published[session_id] = last_seq

    # Reads -------------------------------------------------------------------------------------------------

    async def _read(self, connection: asyncpg.Connection, session_id: str, after: int, until: int) -> list[StoredEvent]:
        rows = await connection.fetch(
            "SELECT seq, event_id, type, create_time, body FROM events "
            "WHERE session_id = $1 AND seq > $2 AND seq <= $3 ORDER BY seq",
            session_id,
            after,
            until,
        )
        return [
            StoredEvent(session_id, r["seq"], r["event_id"], r["type"], r["create_time"], bytes(r["body"]))
            for r in rows
        ]

    async def get_session(self, session_id: str) -> SessionRecord:
        with _corruption_is_data_loss("nothing was read"):
            async with self._pool.acquire() as connection:
                row = await connection.fetchrow(
                    f"SELECT {rules.SESSION_COLUMNS} FROM sessions WHERE session_id = $1", session_id
                )
        if row is None:
            raise SessionNotFound(f"session {session_id} does not exist")
        return rules.record_from_values(tuple(row))

    async def list_sessions(
        self,
        *,
        limit: int,
        max_bytes: int,
        status: SessionStatus | None = None,
        orphaned_only: bool = False,
        after: SessionCursor | None = None,
    ) -> SessionPage:
        where: list[str] = []
        params: list[object] = []

        def param(value: object) -> str:
            params.append(value)
            return f"${len(params)}"

        if status is not None:
            where.append(f"status = {param(int(status))}")
        if orphaned_only:
            running = (int(SessionStatus.RUNNING), int(SessionStatus.RESCHEDULING))
            where.append(
                f"status IN ({param(running[0])}, {param(running[1])}) AND (lease_holder = '' OR lease_expire < {_NOW})"
            )
        if after is not None:
            t, sid = param(after.create_time_us), param(after.session_id)
            where.append(f"(create_time < {t} OR (create_time = {t} AND session_id < {sid}))")
        tail = " WHERE " + " AND ".join(where) if where else ""
        tail += f" ORDER BY create_time DESC, session_id DESC LIMIT ${len(params) + 1}"
        with _corruption_is_data_loss("nothing was read"):
            async with (
                self._pool.acquire() as connection,
                connection.transaction(isolation="repeatable_read", readonly=True),
            ):
                # Sizes first (octet_length reads a TOASTed value's header only), then as many rows as fit, from
                # one snapshot.
                sizes = await connection.fetch("SELECT octet_length(spec) FROM sessions" + tail, *params, limit + 1)
                count = sessions_that_fit([int(r[0]) for r in sizes], limit, max_bytes)
                rows = await connection.fetch(f"SELECT {rules.SESSION_COLUMNS} FROM sessions" + tail, *params, count)
        return SessionPage(tuple(rules.record_from_values(tuple(r)) for r in rows), more=len(sizes) > count)

    async def read_events(
        self, session_id: str, *, after_seq: int, until_seq: int, limit: int, max_bytes: int
    ) -> list[StoredEvent]:
        # As in SQLite: a row fits the byte budget if the log grew by at most max_bytes since the cursor.
        with _corruption_is_data_loss("nothing was read"):
            async with self._pool.acquire() as connection:
                rows = await connection.fetch(
                    "SELECT seq, event_id, type, create_time, body FROM events "
                    "WHERE session_id = $1 AND seq > $2 AND seq <= $3 AND (seq = $2 + 1 OR end_offset <= $5 + "
                    "coalesce((SELECT end_offset FROM events WHERE session_id = $1 AND seq = $2), 0)) "
                    "ORDER BY seq LIMIT $4",
                    session_id,
                    after_seq,
                    until_seq,
                    limit,
                    max_bytes,
                )
        return [
            StoredEvent(session_id, r["seq"], r["event_id"], r["type"], r["create_time"], bytes(r["body"]))
            for r in rows
        ]

    async def watch(self, session_id: str, *, after_seq: int) -> AsyncIterator[StoredEvent]:
        async def read_page(cursor: int) -> list[StoredEvent]:
            return await self.read_events(
                session_id, after_seq=cursor, until_seq=2**62, limit=1000, max_bytes=4 * 1024 * 1024
            )

        async for event in self._tail.follow(session_id, after_seq, read_page):
            yield event

    # Lifecycle ---------------------------------------------------------------------------------------------

    async def aclose(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._tail.close()
        await self._commits.aclose()
        self._notices.put_nowait(None)
        await self._publisher
        with contextlib.suppress(Exception):
            await self._listener.close()
        await self._pool.close()


def _redacted(url: str) -> str:
    """The URL without its password, for messages."""
    scheme, sep, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")
    if not at:
        return url
    user = credentials.split(":", 1)[0]
    return f"{scheme}{sep}{user}:***@{host}"


def is_postgres_url(value: str) -> bool:
    """True for `postgresql://` and `postgres://` URLs."""
    return value.startswith(("postgresql://", "postgres://"))
