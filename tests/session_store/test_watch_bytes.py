"""A watcher that stops reading cannot pin the store's memory (issue 13: 150 events of 3.9 MiB and one stalled
watcher took the store from 73 to 726 MiB). Its queue is bounded by bytes; once it is 16 MiB behind, its stream
ends with RESOURCE_EXHAUSTED carrying the resume cursor, and a watch resumed from there misses nothing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from pathlib import Path

import grpc
import pytest

from managed_agents import events
from managed_agents.mesh.status import from_rpc_error
from managed_agents.v1 import events_pb2, session_pb2, session_pb2_grpc
from session_store.app import StoreServer
from session_store.client import SessionStoreClient
from session_store.errors import WatchTooSlow
from session_store.tail import MAX_PENDING_BYTES
from tests.helpers import ServiceProcess

MIB = 1024 * 1024


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _big(n: int) -> events_pb2.Event:
    return events.user_message(f"{n:04d}" + "x" * (MIB - 4))


async def test_a_stalled_watcher_is_ended_with_its_cursor_and_store_memory_stays_bounded(
    store_url: str, tmp_path: Path
) -> None:
    args = ["--store-url", store_url] if store_url else ["--data-dir", str(tmp_path / "data")]
    process = ServiceProcess("session_store", args, tmp_path).start()
    try:
        async with SessionStoreClient.connect(process.address) as store:
            session = await store.create_session()
            await store.emit(session.id, events.user_message("first"))
            # A real watcher, on a connection of its own, that reads one event and then stops reading.
            options = [("grpc.use_local_subchannel_pool", 1)]
            async with grpc.aio.insecure_channel(process.address, options=options) as channel:
                call = session_pb2_grpc.SessionServiceStub(channel).WatchSession(
                    session_pb2.WatchSessionRequest(session_id=session.id)
                )
                first = await call.read()
                assert isinstance(first, session_pb2.WatchSessionResponse) and first.event.seq == 1
                for n in range(4):  # the store's own steady state for 1 MiB appends
                    await store.emit(session.id, _big(n))
                baseline = peak = _rss(process.pid)
                for n in range(4, 154):  # 150 MiB while the watcher reads nothing
                    await store.emit(session.id, _big(n))
                    peak = max(peak, _rss(process.pid))
                growth = peak - baseline
                assert growth < 64 * MIB, f"store RSS grew {growth / MIB:.0f} MiB with a stalled watcher"

                # The watcher reads again: what was in flight, then the status with the cursor.
                received = [1]
                with pytest.raises(grpc.aio.AioRpcError) as raised:
                    while (message := await call.read()) is not grpc.aio.EOF:
                        assert isinstance(message, session_pb2.WatchSessionResponse)
                        received.append(message.event.seq)
            assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, raised.value.details()
            error = from_rpc_error(raised.value)
            assert isinstance(error, WatchTooSlow)
            assert error.after_seq == received[-1] < 155 and received == list(range(1, received[-1] + 1))
            assert f"after_seq={received[-1]}" in (raised.value.details() or "")

            resumed = []
            async for event in store.watch(session.id, after_seq=error.after_seq):
                resumed.append(event.seq)
                if event.seq == 155:
                    break
            assert resumed == list(range(error.after_seq + 1, 156))
    finally:
        process.stop()


async def test_a_slow_reader_of_the_client_library_resumes_by_itself(
    store_server: StoreServer, store: SessionStoreClient
) -> None:
    session = await store.create_session()
    await store.emit(session.id, events.user_message("first"))
    stream = store.watch(session.id)
    assert isinstance(stream, AsyncGenerator)
    seen = [(await anext(stream)).seq]
    # The reader pauses while 24 MiB are appended; its queue never holds more than its budget.
    for n in range(24):
        await store.emit(session.id, _big(n))
        assert store_server.store.tail.pending_bytes <= MAX_PENDING_BYTES
    async for event in stream:
        seen.append(event.seq)
        if event.seq == 25:
            break
    await stream.aclose()
    assert seen == list(range(1, 26))


async def test_without_resuming_the_client_sees_the_cursor(
    store_server: StoreServer, store: SessionStoreClient
) -> None:
    session = await store.create_session()
    await store.emit(session.id, events.user_message("first"))
    stream = store.watch(session.id, resume_when_behind=False)
    seen = [(await anext(stream)).seq]
    for n in range(24):
        await store.emit(session.id, _big(n))
    with pytest.raises(WatchTooSlow, match=r"resume the watch with after_seq=\d+") as raised:
        async for event in stream:
            seen.append(event.seq)
    assert raised.value.after_seq == seen[-1] and seen == list(range(1, seen[-1] + 1))
    await asyncio.wait_for(_until_unsubscribed(store_server), 5)


async def _until_unsubscribed(store_server: StoreServer) -> None:
    while store_server.store.tail.subscriber_count():
        await asyncio.sleep(0.02)
