"""A corrupt database is never served (issue 13: writes answered UNAVAILABLE "retry" for a permanent fault, and
once ListSessions returned 3 of 8 sessions with OK). Real database files are damaged here: a store refuses to
start on one, naming the file and how to recover; damage found while serving is DATA_LOSS for that call and
every later one. PostgreSQL's own corruption errors are DATA_LOSS too."""

from __future__ import annotations

import json
import os
import sqlite3
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import grpc
import pytest

from managed_agents import events
from managed_agents.mesh.channel import dial
from managed_agents.v1 import session_pb2, session_pb2_grpc
from session_store import app
from session_store.client import SessionStoreClient
from session_store.config import StoreConfig
from session_store.errors import DataLoss
from session_store.sqlite import DATABASE_NAME, CorruptDatabase
from tests.helpers import ServiceProcess

PAGE = 4096


async def _fill(data_dir: Path) -> None:
    """A stopped store in `data_dir`: sessions `a` (300 events, one of them marked) and `b` (marked title)."""
    server = await app.start(StoreConfig(listen="127.0.0.1:0", data_dir=data_dir), None)
    async with SessionStoreClient.connect(server.address) as store:
        await store.create_session(session_id="a", title="first")
        await store.create_session(session_id="b", title="MARKER-SESSION-B")
        for start in range(0, 300, 100):
            batch = [events.user_message(f"event {i} " + "z" * 150) for i in range(start, start + 100)]
            await store.emit_batch("a", batch)
        await store.emit("a", events.user_message("MARKER-EVENT-A"))
        for i in range(6):
            await store.create_session(session_id=f"s{i}")
    await server.aclose(grace=1)


def _smash_page_with(path: Path, marker: bytes) -> int:
    """Overwrites the page holding `marker` with 0xFF bytes, as a failing disk might; returns its number."""
    data = path.read_bytes()
    offset = data.find(marker)
    assert offset > PAGE, f"{marker!r} not found past the first page"
    number = offset // PAGE
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, b"\xff" * PAGE, number * PAGE)
        os.fsync(fd)
    finally:
        os.close(fd)
    return number


@pytest.fixture
async def serving(tmp_path: Path) -> AsyncIterator[tuple[app.StoreServer, session_pb2_grpc.SessionServiceStub]]:
    """A store started on a sound database (so it passes its check), with cold caches."""
    await _fill(tmp_path / "store")
    server = await app.start(StoreConfig(listen="127.0.0.1:0", data_dir=tmp_path / "store"), None)
    channel = dial(server.address)
    yield server, session_pb2_grpc.SessionServiceStub(channel)
    await channel.close()
    await server.aclose(grace=1)


async def _code(call: object) -> tuple[grpc.StatusCode, str]:
    try:
        if hasattr(call, "read"):  # a stream
            async for _ in call:  # type: ignore[attr-defined]
                pass
        else:
            await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as error:
        return error.code(), error.details() or ""
    raise AssertionError("the call succeeded on a corrupt database")


async def _every_call_is_data_loss(stub: session_pb2_grpc.SessionServiceStub) -> None:
    calls = {
        "ListSessions": stub.ListSessions(session_pb2.ListSessionsRequest()),
        "GetSession": stub.GetSession(session_pb2.GetSessionRequest(session_id="s1")),
        "GetEvents": stub.GetEvents(session_pb2.GetEventsRequest(session_id="a", last=1)),
        "EmitEvent": stub.EmitEvent(session_pb2.EmitEventRequest(session_id="s2", event=events.user_message("x"))),
        "CreateSession": stub.CreateSession(session_pb2.CreateSessionRequest(session_id="new")),
        "AcquireLease": stub.AcquireLease(session_pb2.AcquireLeaseRequest(session_id="s3", holder="h")),
        "WatchSession": stub.WatchSession(session_pb2.WatchSessionRequest(session_id="s4")),
    }
    for name, call in calls.items():
        code, details = await _code(call)
        assert code == grpc.StatusCode.DATA_LOSS, f"{name}: {code} {details}"
        assert "corrupt" in details and "restore" in details, f"{name}: {details}"


async def test_a_store_refuses_to_start_on_pages_of_garbage(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    await _fill(data_dir)
    process = ServiceProcess("session_store", ["--data-dir", str(data_dir)], tmp_path)
    process.start()
    assert "integrity check of" in process.log() and " ms" in process.log()
    process.stop()
    path = data_dir / DATABASE_NAME
    size = path.stat().st_size
    with path.open("r+b") as database:  # two pages in the middle of the file
        database.seek((size // PAGE // 2) * PAGE)
        database.write(os.urandom(2 * PAGE))
    with pytest.raises(RuntimeError, match="exited with code 2"):
        process.start()
    errors = [json.loads(line) for line in process.log().splitlines() if '"level": "error"' in line]
    assert len(errors) == 1, process.log()
    message = errors[0]["message"]
    assert message.startswith(f"cannot start: {path} is corrupt and will not be served"), message
    assert "restore" in message and "backup" in message and f'sqlite3 {path} ".recover"' in message
    assert "Traceback" not in message


async def test_a_file_that_is_not_a_database_is_refused(tmp_path: Path) -> None:
    await _fill(tmp_path / "store")
    path = tmp_path / "store" / DATABASE_NAME
    with path.open("r+b") as database:
        database.write(b"this is no longer an SQLite header" + b"\0" * 66)
    with pytest.raises(CorruptDatabase, match=f"{path} is corrupt"):
        await app.start(StoreConfig(listen="127.0.0.1:0", data_dir=tmp_path / "store"), None)


async def test_an_index_that_lost_sessions_is_refused_rather_than_listing_3_of_8(tmp_path: Path) -> None:
    """Damage `quick_check` alone misses: the listing index's b-tree holds only some of the sessions."""
    await _fill(tmp_path / "store")
    path = tmp_path / "store" / DATABASE_NAME
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("CREATE INDEX decoy ON sessions (create_time DESC, session_id DESC) WHERE session_id < 's1'")
    roots = dict(conn.execute("SELECT name, rootpage FROM sqlite_schema WHERE name IN ('decoy', 'sessions_newest')"))
    version = conn.execute("PRAGMA schema_version").fetchone()[0]
    conn.execute("PRAGMA writable_schema = ON")
    conn.execute("UPDATE sqlite_schema SET rootpage = ? WHERE name = 'sessions_newest'", (roots["decoy"],))
    conn.execute("UPDATE sqlite_schema SET rootpage = ? WHERE name = 'decoy'", (roots["sessions_newest"],))
    conn.execute(f"PRAGMA schema_version = {version + 1}")
    conn.close()
    check = sqlite3.connect(path)
    assert check.execute("PRAGMA quick_check").fetchall() == [("ok",)]
    assert len(check.execute("SELECT 1 FROM sessions ORDER BY create_time DESC, session_id DESC").fetchall()) == 3
    check.close()
    with pytest.raises(CorruptDatabase, match=r"session indexes do not match the sessions table \(rows: \(8, 3, 8\)\)"):
        await app.start(StoreConfig(listen="127.0.0.1:0", data_dir=tmp_path / "store"), None)


async def test_corruption_found_by_a_read_is_data_loss_then_nothing_is_served(
    serving: tuple[app.StoreServer, session_pb2_grpc.SessionServiceStub], tmp_path: Path
) -> None:
    server, stub = serving
    assert len((await stub.ListSessions(session_pb2.ListSessionsRequest())).sessions) == 8
    _smash_page_with(tmp_path / "store" / DATABASE_NAME, b"MARKER-EVENT-A")
    code, details = await _code(stub.GetEvents(session_pb2.GetEventsRequest(session_id="a")))
    assert code == grpc.StatusCode.DATA_LOSS, details
    assert "database disk image is malformed" in details
    await _every_call_is_data_loss(stub)
    # The typed error on the client: not retryable.
    async with SessionStoreClient.connect(server.address) as store:
        with pytest.raises(DataLoss) as raised:
            await store.get_session("b")
        assert not raised.value.retryable


async def test_corruption_found_by_a_write_is_data_loss_not_a_retry(
    serving: tuple[app.StoreServer, session_pb2_grpc.SessionServiceStub], tmp_path: Path
) -> None:
    _, stub = serving
    _smash_page_with(tmp_path / "store" / DATABASE_NAME, b"MARKER-SESSION-B")
    code, details = await _code(
        stub.EmitEvent(session_pb2.EmitEventRequest(session_id="b", event=events.user_message("lost?")))
    )
    assert code == grpc.StatusCode.DATA_LOSS, details
    assert "was not committed" in details and "retry" not in details
    await _every_call_is_data_loss(stub)


async def test_postgres_corruption_errors_are_data_loss(postgres_url: str, tmp_path: Path) -> None:
    """PostgreSQL reports damage as SQLSTATE XX001/XX002; a trigger and a row policy raise exactly those."""
    role = f"store_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(postgres_url)
    await admin.execute(f"CREATE ROLE {role} LOGIN")
    await admin.execute(f"GRANT ALL ON ALL TABLES IN SCHEMA public TO {role}")
    await admin.execute(
        "CREATE TABLE damaged (on_read boolean NOT NULL, on_write boolean NOT NULL); "
        "INSERT INTO damaged VALUES (false, false); "
        f"GRANT SELECT ON damaged TO {role}; "
        "CREATE FUNCTION damage_check(kind text) RETURNS boolean LANGUAGE plpgsql AS $$ BEGIN "
        "IF (kind = 'read' AND (SELECT on_read FROM damaged)) OR (kind = 'write' AND (SELECT on_write FROM damaged)) "
        "THEN RAISE EXCEPTION 'could not read block 7 in file \"base/16384/16390\"' USING ERRCODE = 'data_corrupted'; "
        "END IF; RETURN true; END $$; "
        "CREATE FUNCTION damage_trigger() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        "PERFORM damage_check('write'); RETURN NEW; END $$; "
        "CREATE TRIGGER damage BEFORE INSERT ON events FOR EACH ROW EXECUTE FUNCTION damage_trigger(); "
        "ALTER TABLE sessions ENABLE ROW LEVEL SECURITY; "
        "CREATE POLICY damage ON sessions USING (damage_check('read')) WITH CHECK (true)"
    )
    url = postgres_url.replace("postgres@", f"{role}@", 1)
    server = await app.start(StoreConfig(listen="127.0.0.1:0", store_url=url), None)
    try:
        async with SessionStoreClient.connect(server.address) as store:
            await store.create_session(session_id="pg")
            await admin.execute("UPDATE damaged SET on_write = true")
            with pytest.raises(DataLoss, match="reports corruption") as raised:
                await store.emit("pg", events.user_message("x"))
            assert "was not committed" in str(raised.value)
            await admin.execute("UPDATE damaged SET on_write = false, on_read = true")
            for read in (store.get_session("pg"), store.list_sessions()):
                with pytest.raises(DataLoss, match="could not read block 7"):
                    await read
            await admin.execute("UPDATE damaged SET on_read = false")
            assert (await store.get_session("pg")).session.last_seq == 0
    finally:
        await server.aclose(grace=1)
        await admin.execute(f"DROP OWNED BY {role}; DROP ROLE {role}")
        await admin.close()
