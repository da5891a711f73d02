"""Several store servers over one PostgreSQL database: one linear log per session, leases that fence across
servers, a live tail that sees appends made through any server, and versioned migrations."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator

import pytest

from managed_agents import events
from managed_agents.mesh.errors import LeaseFenced, LeaseHeld
from session_store import app
from session_store.client import SessionStoreClient
from session_store.config import StoreConfig
from tests.helpers import ROOT
from tests.pg import fresh_database


@pytest.fixture
async def two_stores(postgres_url: str) -> AsyncIterator[tuple[SessionStoreClient, SessionStoreClient]]:
    servers = [await app.start(StoreConfig(listen="127.0.0.1:0", store_url=postgres_url), None) for _ in range(2)]
    clients = [SessionStoreClient.connect(s.address) for s in servers]
    yield clients[0], clients[1]
    for client in clients:
        await client.aclose()
    for server in servers:
        await server.aclose(grace=1)


async def test_a_watcher_on_one_server_sees_appends_made_through_another(
    two_stores: tuple[SessionStoreClient, SessionStoreClient],
) -> None:
    a, b = two_stores
    session = await a.create_session()
    await b.emit(session.id, events.user_message("before the watch"))
    seen: list[int] = []

    async def watch() -> None:
        async for event in a.watch(session.id):
            seen.append(event.seq)
            if event.seq == 41:
                return

    watcher = asyncio.create_task(watch())
    for n in range(40):
        await (b if n % 2 else a).emit(session.id, events.user_message(f"m{n}"))
    await asyncio.wait_for(watcher, 10)
    assert seen == list(range(1, 42))


async def test_writers_through_two_servers_keep_one_linear_log(
    two_stores: tuple[SessionStoreClient, SessionStoreClient],
) -> None:
    a, b = two_stores
    session = await a.create_session()

    async def writer(w: int) -> None:
        for i in range(20):
            await (a if w % 2 else b).emit(session.id, events.user_message(f"w{w}-{i}"))

    await asyncio.gather(*(writer(w) for w in range(20)))
    _, log = await b.read_session(session.id)
    assert [e.seq for e in log] == list(range(1, 401))
    assert len({events.plain_text(e.user_message.content) for e in log}) == 400


async def test_leases_fence_across_servers_and_keys_dedupe_across_them(
    two_stores: tuple[SessionStoreClient, SessionStoreClient],
) -> None:
    a, b = two_stores
    session = await a.create_session()
    first = (await a.acquire_lease(session.id, holder="brain-1", ttl=30)).lease
    with pytest.raises(LeaseHeld):
        await b.acquire_lease(session.id, holder="brain-2")
    await b.release_lease(session.id, holder="brain-1", epoch=first.epoch)
    second = (await b.acquire_lease(session.id, holder="brain-2", ttl=30)).lease
    assert second.epoch == first.epoch + 1
    with pytest.raises(LeaseFenced):
        await a.emit(session.id, events.user_message("stale"), lease_epoch=first.epoch)
    once = await a.emit(session.id, events.user_message("once"), idempotency_key="k1")
    again = await b.emit(session.id, events.user_message("once"), idempotency_key="k1")
    assert again.replayed and again.event.seq == once.event.seq == 1


async def test_a_database_without_the_schema_is_refused_until_migrated(postgres_server: str) -> None:
    async with fresh_database(postgres_server) as url:
        bare = url + "_bare"
        import asyncpg

        admin = await asyncpg.connect(postgres_server)
        await admin.execute(f"CREATE DATABASE {bare.rsplit('/', 1)[1]}")
        await admin.close()
        with pytest.raises(RuntimeError, match="run `python -m session_store migrate"):
            await app.start(StoreConfig(listen="127.0.0.1:0", store_url=bare), None)

        def migrate() -> str:
            done = subprocess.run(
                [sys.executable, "-m", "session_store", "migrate", "--store-url", bare],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert done.returncode == 0, done.stderr
            return done.stdout

        assert "applied migrations [1]" in await asyncio.to_thread(migrate)
        assert "up to date" in await asyncio.to_thread(migrate)
        server = await app.start(StoreConfig(listen="127.0.0.1:0", store_url=bare), None)
        await server.aclose(grace=1)
        admin = await asyncpg.connect(postgres_server)
        await admin.execute(f"DROP DATABASE {bare.rsplit('/', 1)[1]} WITH (FORCE)")
        await admin.close()
