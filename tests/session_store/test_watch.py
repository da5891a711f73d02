"""WatchSession: the backlog, then live events, with no gap or duplicate, and streams that end cleanly."""

from __future__ import annotations

import asyncio

import pytest

from managed_agents import events
from managed_agents.mesh.errors import ShuttingDown
from session_store.app import StoreServer
from session_store.client import SessionStoreClient
from tests.helpers import assert_eventually


async def test_watch_delivers_backlog_then_live_events_in_order(store: SessionStoreClient) -> None:
    session = await store.create_session()
    await store.emit_batch(session.id, [events.user_message(f"old{i}") for i in range(30)])
    received: list[int] = []
    caught_up = asyncio.Event()

    async def watch() -> None:
        async for event in store.watch(session.id, after_seq=10):
            received.append(event.seq)
            if event.seq == 30:
                caught_up.set()
            if event.seq == 130:
                return

    watcher = asyncio.create_task(watch())
    await asyncio.wait_for(caught_up.wait(), 5)

    async def writer(n: int) -> None:
        for i in range(20):
            await store.emit(session.id, events.user_message(f"live{n}-{i}"))

    # Appends race the switch from backlog to live; five writers make the race likely.
    await asyncio.gather(*(writer(n) for n in range(5)))
    await asyncio.wait_for(watcher, 10)
    assert received == list(range(11, 131))


async def test_appends_during_the_backlog_read_are_neither_lost_nor_repeated(
    store: SessionStoreClient,
) -> None:
    session = await store.create_session()
    await store.emit_batch(session.id, [events.user_message(f"m{i}") for i in range(500)])
    seen: list[int] = []

    async def watch() -> None:
        async for event in store.watch(session.id):
            seen.append(event.seq)
            if event.seq == 700:
                return

    watcher = asyncio.create_task(watch())
    for i in range(200):
        await store.emit(session.id, events.user_message(f"n{i}"))
    await asyncio.wait_for(watcher, 10)
    assert seen == list(range(1, 701))


async def test_cancelling_a_watch_frees_it_on_the_server(store_server: StoreServer, store: SessionStoreClient) -> None:
    session = await store.create_session()
    await store.emit(session.id, events.user_message("one"))
    got_one = asyncio.Event()

    async def watch() -> None:
        async for _ in store.watch(session.id):
            got_one.set()

    watcher = asyncio.create_task(watch())
    await asyncio.wait_for(got_one.wait(), 5)
    assert store_server.store.tail.subscriber_count(session.id) == 1
    watcher.cancel()
    with pytest.raises(asyncio.CancelledError):
        await watcher
    await assert_eventually(lambda: store_server.store.tail.subscriber_count() == 0)


async def test_shutdown_ends_watches_with_a_resumable_unavailable(
    store_server: StoreServer, store: SessionStoreClient
) -> None:
    session = await store.create_session()
    await store.emit(session.id, events.user_message("one"))
    seen = asyncio.Event()

    async def watch() -> None:
        async for _ in store.watch(session.id):
            seen.set()

    watcher = asyncio.create_task(watch())
    await asyncio.wait_for(seen.wait(), 5)
    await store_server.server.stop(grace=5)
    with pytest.raises(ShuttingDown, match="resume the watch with after_seq=1"):
        await asyncio.wait_for(watcher, 5)
