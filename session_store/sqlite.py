"""The embedded event store: one SQLite file in WAL mode.

Writes go through one writer thread that owns the only write connection. Appends, session creations and
lease changes are queued and committed in groups: whatever arrived while the previous transaction was being
committed goes into the next one (group commit), so throughput grows with concurrency instead of collapsing.
Each group costs one hop into the writer thread and one commit. A caller is answered only after its
group's COMMIT returned. Reads use separate aiosqlite connections; WAL lets them run beside the writer and
shows them only committed transactions.

The writer keeps the sessions it touched in memory (last seq, status, lease), which is sound because it is the
only writer: the data directory is locked, so a second store process on the same files refuses to start.

A corrupt database is never served. Opening runs `PRAGMA quick_check` and checks that the session indexes
hold every session (`check_integrity`), and refuses to start with a sentence that names the file and how to
recover it. Connections check each page's cells as they read it (`cell_size_check`). Corruption found while
serving (SQLITE_CORRUPT, SQLITE_NOTADB) answers that call, and every later one, `DATA_LOSS`: a file with one
bad page may have others that read as valid but short, so nothing more is served from it.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import sqlite3
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import aiosqlite

from managed_agents.mesh.errors import (
    MeshError,
    SessionAlreadyExists,
    SessionNotFound,
)
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
from session_store.tail import Tail

log = logging.getLogger(__name__)

Synchronous = Literal["normal", "full"]

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS sessions (
    session_id   TEXT PRIMARY KEY,
    status       INTEGER NOT NULL,
    last_seq     INTEGER NOT NULL,
    create_time  INTEGER NOT NULL,
    update_time  INTEGER NOT NULL,
    lease_holder TEXT NOT NULL DEFAULT '',
    lease_epoch  INTEGER NOT NULL DEFAULT 0,
    lease_expire INTEGER NOT NULL DEFAULT 0,
    spec         BLOB NOT NULL,
    log_bytes    INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS sessions_newest ON sessions (create_time DESC, session_id DESC);
CREATE INDEX IF NOT EXISTS sessions_by_status ON sessions (status, create_time DESC, session_id DESC);
-- Clustered by (session, seq): a slice of one session's log is one contiguous range, cheap at any position.
-- `body` is the complete serialized Event. `end_offset` is the session's log size in bytes up to and
-- including this event, so a page can stop at a byte budget with a range predicate, without reading the
-- bodies it leaves out.
CREATE TABLE IF NOT EXISTS events (
    session_id  TEXT NOT NULL,
    seq         INTEGER NOT NULL,
    end_offset  INTEGER NOT NULL,
    event_id    TEXT NOT NULL,
    type        TEXT NOT NULL,
    create_time INTEGER NOT NULL,
    body        BLOB NOT NULL,
    PRIMARY KEY (session_id, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS idempotency (
    session_id TEXT NOT NULL,
    key        TEXT NOT NULL,
    digest     BLOB NOT NULL,
    first_seq  INTEGER NOT NULL,
    count      INTEGER NOT NULL,
    PRIMARY KEY (session_id, key)
) WITHOUT ROWID;
"""


_MAX_CACHED_SESSIONS = 50_000
DATABASE_NAME = "sessions.sqlite3"
# Primary result codes of a damaged file (extended codes carry them in their low byte).
_SQLITE_CORRUPT, _SQLITE_NOTADB = 11, 26


def _now_us() -> int:
    return time.time_ns() // 1000


class CorruptDatabase(RuntimeError):
    """The database file failed its integrity check; the store refuses to serve it."""


def is_corruption(error: BaseException) -> bool:
    """True for SQLite's errors that mean the file is damaged (SQLITE_CORRUPT and SQLITE_NOTADB, with their
    extended codes), as opposed to a busy, full or read-only database."""
    if not isinstance(error, sqlite3.DatabaseError):
        return False
    code = getattr(error, "sqlite_errorcode", None)
    if isinstance(code, int):
        return code & 0xFF in (_SQLITE_CORRUPT, _SQLITE_NOTADB)
    text = str(error)
    return "malformed" in text or "not a database" in text


def recovery_advice(path: Path) -> str:
    """How an operator gets a sound database back, for messages naming `path`."""
    return (
        f"stop the store and restore {path} from a backup, or salvage what is readable with "
        f'`sqlite3 {path} ".recover" | sqlite3 {path.name}.recovered` and move the result into place '
        "(keep the damaged file; its -wal file, if any, belongs to it)"
    )


def check_integrity(path: Path) -> float:
    """Runs SQLite's `quick_check` on `path` and checks that both session indexes hold exactly the sessions of
    the table (ListSessions reads them); returns the seconds it took. Raises `CorruptDatabase` with a sentence
    naming the file and how to recover it. A file that does not exist yet passes."""
    if not path.exists():
        return 0.0
    started = time.perf_counter()
    problems: list[str] = []
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA busy_timeout=5000")
        problems = [str(row[0]) for row in conn.execute("PRAGMA quick_check(10)").fetchall()]
        if problems == ["ok"]:
            problems = []
            tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_schema WHERE type IN ('table', 'index')")}
            if {"sessions", "sessions_newest", "sessions_by_status"} <= tables:
                # A range on each index's first column makes SQLite read that index (a bare count(*) reads
                # whichever is smallest, INDEXED BY or not); every value of a NOT NULL column is in the range.
                counts = conn.execute(
                    "SELECT (SELECT count(*) FROM sessions NOT INDEXED), "
                    "(SELECT count(*) FROM sessions INDEXED BY sessions_newest WHERE create_time >= ?1), "
                    "(SELECT count(*) FROM sessions INDEXED BY sessions_by_status WHERE status >= ?1)",
                    (-(2**63),),
                ).fetchone()
                if len(set(counts)) != 1:
                    problems = [f"the session indexes do not match the sessions table (rows: {counts})"]
    except sqlite3.DatabaseError as error:
        if not is_corruption(error):
            raise RuntimeError(f"cannot check the integrity of {path}: {error}") from None
        problems = [str(error)]
    finally:
        conn.close()
    if problems:
        raise CorruptDatabase(
            f"{path} is corrupt and will not be served (integrity check: {'; '.join(problems)[:500]}); "
            f"{recovery_advice(path)}"
        )
    return time.perf_counter() - started


class _Writer:
    """Everything that happens in the writer thread: synchronous methods that never touch the event loop."""

    def __init__(self, path: Path, synchronous: Synchronous) -> None:
        self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute(f"PRAGMA synchronous={synchronous.upper()}")
        self._conn.execute("PRAGMA busy_timeout=5000")
        self._conn.execute("PRAGMA cell_size_check=ON")
        self._conn.executescript(_SCHEMA)
        self._conn.execute(
            "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
        )
        (version,) = self._conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        if int(version) != SCHEMA_VERSION:
            raise RuntimeError(f"{path} has schema version {version}; this store understands {SCHEMA_VERSION}")
        # The writer is the only one: rows it touched stay cached (last seq, status, lease).
        self._cache: OrderedDict[str, rules.SessionRow] = OrderedDict()

    def close(self) -> None:
        self._conn.close()

    def run(self, commands: Sequence[rules.Command]) -> list[object]:
        """Applies `commands` in one transaction; returns each one's result or `MeshError`."""
        now = _now_us()
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            results = [self._apply(command, now) for command in commands]
            self._flush(now)
            self._conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("ROLLBACK")
            # The cache may hold changes that never committed.
            self._cache.clear()
            raise
        while len(self._cache) > _MAX_CACHED_SESSIONS:
            self._cache.popitem(last=False)
        return results

    def _apply(self, command: rules.Command, now: int) -> object:
        try:
            if isinstance(command, rules.Create):
                return self._create(command, now)
            row = self._row(command.request.session_id if isinstance(command, rules.Append) else command.session_id)
            match command:
                case rules.Append():
                    return self._append(row, command.request, now)
                case rules.Acquire():
                    rules.acquire(row, command.holder, command.ttl_us, now)
                case rules.Renew():
                    rules.renew(row, command.holder, command.epoch, command.ttl_us, now)
                case rules.Release():
                    rules.release(row, command.holder, command.epoch)
            return row.record()
        except MeshError as error:
            return error

    def _row(self, session_id: str) -> rules.SessionRow:
        row = self._cache.get(session_id)
        if row is None:
            values = self._conn.execute(
                f"SELECT {rules.SESSION_COLUMNS} FROM sessions WHERE session_id = ?", (session_id,)
            ).fetchone()
            if values is None:
                raise SessionNotFound(f"session {session_id} does not exist")
            row = rules.SessionRow.from_values(values)
            self._cache[session_id] = row
        else:
            self._cache.move_to_end(session_id)
        return row

    def _create(self, command: rules.Create, now: int) -> SessionRecord:
        row = rules.SessionRow.new(command.session_id, command.spec, now)
        try:
            self._conn.execute(
                f"INSERT INTO sessions ({rules.SESSION_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", row.values()
            )
        except sqlite3.IntegrityError:
            raise SessionAlreadyExists(f"session {command.session_id} already exists") from None
        self._cache[row.session_id] = row
        return row.record()

    def _append(self, row: rules.SessionRow, request: AppendRequest, now: int) -> AppendResult:
        if request.idempotency_key:
            earlier = self._conn.execute(
                "SELECT digest, first_seq, count FROM idempotency WHERE session_id = ? AND key = ?",
                (request.session_id, request.idempotency_key),
            ).fetchone()
            if earlier is not None:
                digest, first_seq, count = earlier
                rules.check_replay(request, bytes(digest))
                return AppendResult(events=tuple(self._events(row.session_id, first_seq, count)), replayed=True)
        rules.check_guards(row, request)
        stored = rules.append_events(row, request, now)
        self._conn.executemany(
            "INSERT INTO events (session_id, seq, end_offset, event_id, type, create_time, body) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            [(e.session_id, e.seq, end, e.event_id, e.type, e.create_time_us, e.body) for e, end in stored],
        )
        if request.idempotency_key:
            self._conn.execute(
                "INSERT INTO idempotency (session_id, key, digest, first_seq, count) VALUES (?, ?, ?, ?, ?)",
                (row.session_id, request.idempotency_key, request.request_digest, stored[0][0].seq, len(stored)),
            )
        return AppendResult(events=tuple(e for e, _ in stored))

    def _events(self, session_id: str, first_seq: int, count: int) -> list[StoredEvent]:
        rows = self._conn.execute(
            "SELECT seq, event_id, type, create_time, body FROM events "
            "WHERE session_id = ? AND seq >= ? AND seq < ? ORDER BY seq",
            (session_id, first_seq, first_seq + count),
        ).fetchall()
        return [StoredEvent(session_id, seq, eid, typ, ct, bytes(body)) for seq, eid, typ, ct, body in rows]

    def _flush(self, now: int) -> None:
        dirty = [row for row in self._cache.values() if row.dirty]
        if not dirty:
            return
        self._conn.executemany(
            "UPDATE sessions SET status = ?, last_seq = ?, log_bytes = ?, update_time = ?, lease_holder = ?, "
            "lease_epoch = ?, lease_expire = ? WHERE session_id = ?",
            [
                (int(r.status), r.last_seq, r.log_bytes, now, r.holder, r.epoch, r.expire_us, r.session_id)
                for r in dirty
            ],
        )
        for row in dirty:
            row.update_time_us = now
            row.dirty = False


def _lock(data_dir: Path) -> int:
    """Creates and locks `data_dir` for this process; the lock dies with the process, kill -9 included."""
    data_dir.mkdir(parents=True, exist_ok=True)
    lock_fd = os.open(data_dir / "LOCK", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(lock_fd)
        raise RuntimeError(
            f"{data_dir} is in use by another session store process; "
            "give each store its own --data-dir (or use PostgreSQL to share one log)"
        ) from None
    return lock_fd


class SqliteEventStore:
    """`EventStore` on one SQLite file; see the module docstring for how writes are grouped."""

    def __init__(
        self,
        writer: _Writer,
        executor: ThreadPoolExecutor,
        readers: list[aiosqlite.Connection],
        lock_fd: int,
        path: Path,
    ) -> None:
        self._path = path
        self._corrupt = ""
        self._writer = writer
        self._executor = executor
        self._readers: asyncio.Queue[aiosqlite.Connection] = asyncio.Queue()
        self._all_readers = readers
        for reader in readers:
            self._readers.put_nowait(reader)
        self._lock_fd = lock_fd
        self._tail = Tail()
        self._closing = False
        self._commits = GroupCommitter(self._run_group, on_committed=self._committed)

    @classmethod
    async def open(cls, data_dir: Path, *, synchronous: Synchronous = "normal", readers: int = 2) -> SqliteEventStore:
        """Opens (creating if needed) the store in `data_dir`, which it locks for itself."""
        lock_fd = _lock(data_dir)
        path = data_dir / DATABASE_NAME
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-writer")
        loop = asyncio.get_running_loop()
        connections: list[aiosqlite.Connection] = []
        try:
            # On a connection of its own, closed after, so the writer's and readers' caches start cold.
            took = await loop.run_in_executor(executor, check_integrity, path)
            log.info("integrity check of %s took %d ms", path, round(took * 1000))
            writer = await loop.run_in_executor(executor, _Writer, path, synchronous)
            for _ in range(readers):
                conn = await aiosqlite.connect(path, isolation_level=None)
                connections.append(conn)
                await conn.execute("PRAGMA query_only = ON")
                await conn.execute("PRAGMA cell_size_check = ON")
        except BaseException as error:
            for conn in connections:
                await conn.close()
            executor.shutdown(wait=False)
            os.close(lock_fd)
            if is_corruption(error):
                raise CorruptDatabase(
                    f"{path} is corrupt and will not be served ({error}); {recovery_advice(path)}"
                ) from None
            raise
        return cls(writer, executor, connections, lock_fd, path)

    @property
    def tail(self) -> Tail:
        """The live fan-out (exposed so tests and metrics can count watchers)."""
        return self._tail

    # Writes ------------------------------------------------------------------------------------------------

    def _committed(self, result: object) -> None:
        if isinstance(result, AppendResult) and not result.replayed:
            self._tail.publish(result.events[0].session_id, result.events)

    def _data_loss(self, outcome: str, found: sqlite3.DatabaseError | None = None) -> DataLoss:
        """The error of a call on a corrupt database; the first corruption `found` marks the store corrupt (and is
        logged with the file and how to recover it)."""
        if found is not None and not self._corrupt:
            self._corrupt = str(found)
            log.error(
                "%s is corrupt (%s); every call now answers DATA_LOSS. To recover: %s",
                self._path,
                found,
                recovery_advice(self._path),
            )
            self._tail.resync_all()  # watchers re-read, and so learn it too
        return DataLoss(
            f"the session store's database is corrupt ({self._corrupt}); {outcome}. This store serves nothing "
            "more until an operator restores the database (the store's log names the file and how)"
        )

    def _check_sound(self, outcome: str) -> None:
        if self._corrupt:
            raise self._data_loss(outcome)

    async def _run_group(self, commands: list[rules.Command]) -> list[object]:
        self._check_sound("this write was not committed")
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, self._writer.run, commands)
        except sqlite3.DatabaseError as error:
            if is_corruption(error):
                raise self._data_loss("this write was not committed", error) from None
            raise

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

    # Reads -------------------------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _reader(self) -> AsyncIterator[aiosqlite.Connection]:
        self._check_sound("nothing was read")
        conn = await self._readers.get()
        try:
            yield conn
        except sqlite3.DatabaseError as error:
            if is_corruption(error):
                raise self._data_loss("nothing was read", error) from None
            raise
        finally:
            self._readers.put_nowait(conn)

    async def get_session(self, session_id: str) -> SessionRecord:
        async with self._reader() as conn:
            rows = await conn.execute_fetchall(
                f"SELECT {rules.SESSION_COLUMNS} FROM sessions WHERE session_id = ?", (session_id,)
            )
        rows = list(rows)
        if not rows:
            raise SessionNotFound(f"session {session_id} does not exist")
        return rules.record_from_values(rows[0])

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
        if status is not None:
            where.append("status = ?")
            params.append(int(status))
        if orphaned_only:
            where.append("status IN (?, ?) AND (lease_holder = '' OR lease_expire < ?)")
            params += [int(SessionStatus.RUNNING), int(SessionStatus.RESCHEDULING), _now_us()]
        if after is not None:
            where.append("(create_time < ? OR (create_time = ? AND session_id < ?))")
            params += [after.create_time_us, after.create_time_us, after.session_id]
        tail = (
            " WHERE " + " AND ".join(where) if where else ""
        ) + " ORDER BY create_time DESC, session_id DESC LIMIT ?"
        async with self._reader() as conn:
            # Sizes first (SQLite reads a blob's length without its pages), then as many rows as fit, in one
            # read transaction so both see the same sessions.
            await conn.execute("BEGIN")
            try:
                found = await conn.execute_fetchall("SELECT length(spec) FROM sessions" + tail, [*params, limit + 1])
                sizes = [int(r[0]) for r in found]
                count = sessions_that_fit(sizes, limit, max_bytes)
                rows = await conn.execute_fetchall(
                    f"SELECT {rules.SESSION_COLUMNS} FROM sessions" + tail, [*params, count]
                )
            finally:
                await conn.execute("COMMIT")
        return SessionPage(tuple(rules.record_from_values(r) for r in rows), more=len(sizes) > count)

    async def read_events(
        self, session_id: str, *, after_seq: int, until_seq: int, limit: int, max_bytes: int
    ) -> list[StoredEvent]:
        # A row fits the byte budget if the log up to it has grown by at most `max_bytes` since the cursor.
        # The first row always fits, so a page with events left is never empty.
        sql = (
            "SELECT seq, event_id, type, create_time, body FROM events "
            "WHERE session_id = ?1 AND seq > ?2 AND seq <= ?3 AND (seq = ?2 + 1 OR end_offset <= ?5 + "
            "COALESCE((SELECT end_offset FROM events WHERE session_id = ?1 AND seq = ?2), 0)) "
            "ORDER BY seq LIMIT ?4"
        )
        async with self._reader() as conn:
            rows = await conn.execute_fetchall(sql, (session_id, after_seq, until_seq, limit, max_bytes))
        return [StoredEvent(session_id, seq, eid, typ, ct, bytes(body)) for seq, eid, typ, ct, body in rows]

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
        for conn in self._all_readers:
            await conn.close()
        await asyncio.get_running_loop().run_in_executor(self._executor, self._writer.close)
        self._executor.shutdown(wait=True)
        os.close(self._lock_fd)
