"""Every SessionService RPC's normal behaviour, through the generated client over loopback gRPC."""

from __future__ import annotations

import asyncio

import pytest

from managed_agents import events
from managed_agents.mesh.errors import LeaseFenced, LeaseHeld, SessionAlreadyExists, SessionNotFound
from managed_agents.v1 import events_pb2, session_pb2
from session_store.client import SessionStoreClient


def idle(reason: events_pb2.StopReason.ValueType = events_pb2.STOP_REASON_END_TURN) -> events_pb2.Event:
    return events_pb2.Event(session_status_idle=events_pb2.SessionStatusIdle(stop_reason=reason))


def running() -> events_pb2.Event:
    return events_pb2.Event(session_status_running=events_pb2.SessionStatusRunning(brain="b1"))


async def test_create_session_generates_an_id_and_starts_idle(store: SessionStoreClient) -> None:
    agent = session_pb2.AgentConfig(model="claude-test", system="be brief", max_tokens=1024)
    session = await store.create_session(title="first", agent=agent, metadata={"team": "infra"})
    assert session.id.startswith("sesn_") and len(session.id) == 31
    assert session.status == events_pb2.SESSION_STATUS_IDLE
    assert session.last_seq == 0
    assert session.title == "first" and session.metadata["team"] == "infra"
    assert session.agent.model == "claude-test"
    assert session.create_time.ToMicroseconds() > 0


async def test_create_session_with_a_taken_id_is_already_exists(store: SessionStoreClient) -> None:
    await store.create_session(session_id="mine-1")
    with pytest.raises(SessionAlreadyExists, match="mine-1 already exists"):
        await store.create_session(session_id="mine-1")


async def test_emit_event_assigns_seq_type_id_and_time(store: SessionStoreClient) -> None:
    session = await store.create_session()
    first = await store.emit(session.id, events.user_message("hello", producer="cli"))
    second = await store.emit(session.id, running())
    assert (first.event.seq, second.event.seq) == (1, 2)
    assert first.event.type == "user.message" and second.event.type == "session.status_running"
    assert first.event.id.startswith("sevt_") and first.event.id != second.event.id
    assert first.event.session_id == session.id and first.event.producer == "cli"
    assert first.event.create_time.ToMicroseconds() > 0
    assert first.event.trace_id == "", "nothing traces here, so no trace is named"
    assert not first.replayed


async def test_status_follows_the_last_status_event(store: SessionStoreClient) -> None:
    session = await store.create_session()
    await store.emit(session.id, running())
    assert (await store.get_session(session.id)).session.status == events_pb2.SESSION_STATUS_RUNNING
    await store.emit(session.id, idle())
    page = await store.get_session(session.id)
    assert page.session.status == events_pb2.SESSION_STATUS_IDLE
    assert page.session.last_seq == 2


async def test_output_only_fields_sent_by_a_client_are_ignored(store: SessionStoreClient) -> None:
    session = await store.create_session()
    forged = events.user_message("hi")
    forged.seq, forged.id, forged.type, forged.trace_id = 99, "sevt_forged", "agent.message", "f" * 32
    stored = (await store.emit(session.id, forged)).event
    assert (stored.seq, stored.type) == (1, "user.message")
    assert stored.id != "sevt_forged" and stored.trace_id != "f" * 32


async def test_get_session_pages_through_events_after_a_cursor(store: SessionStoreClient) -> None:
    session = await store.create_session()
    await store.emit_batch(session.id, [events.user_message(f"m{i}") for i in range(25)])
    page = await store.get_session(session.id, after_seq=5, page_size=10)
    assert [e.seq for e in page.events] == list(range(6, 16))
    assert page.next_page_token
    page = await store.get_session(session.id, after_seq=5, page_size=10, page_token=page.next_page_token)
    assert [e.seq for e in page.events] == list(range(16, 26))
    assert page.next_page_token == ""
    assert events.plain_text(page.events[-1].user_message.content) == "m24"
    basic = await store.get_session(session.id, view=session_pb2.SESSION_VIEW_BASIC)
    assert basic.session.last_seq == 25 and len(basic.events) == 0
    _, everything = await store.read_session(session.id)
    assert [e.seq for e in everything] == list(range(1, 26))


async def test_batch_emit_is_atomic_and_consecutive(store: SessionStoreClient) -> None:
    session = await store.create_session()
    await store.emit(session.id, events.user_message("before"))
    result = await store.emit_batch(session.id, [running(), events.user_message("a"), idle()])
    assert [e.seq for e in result.events] == [2, 3, 4]
    assert [e.type for e in result.events] == [
        "session.status_running",
        "user.message",
        "session.status_idle",
    ]


async def test_get_events_returns_ranges_and_the_last_n(store: SessionStoreClient) -> None:
    session = await store.create_session()
    await store.emit_batch(session.id, [events.user_message(f"m{i}") for i in range(1, 51)])
    middle = await store.get_events(session.id, start_seq=20, end_seq=24)
    assert [e.seq for e in middle.events] == [20, 21, 22, 23, 24] and middle.last_seq == 50
    tail = await store.get_events(session.id, last=3)
    assert [e.seq for e in tail.events] == [48, 49, 50]
    open_ended = await store.get_events(session.id, start_seq=45)
    assert [e.seq for e in open_ended.events] == [45, 46, 47, 48, 49, 50]
    paged = await store.get_events(session.id, last=10, page_size=4)
    seqs = [e.seq for e in paged.events]
    while paged.next_page_token:
        paged = await store.get_events(session.id, last=10, page_size=4, page_token=paged.next_page_token)
        seqs += [e.seq for e in paged.events]
    assert seqs == list(range(41, 51))
    beyond = await store.get_events(session.id, start_seq=60)
    assert list(beyond.events) == []


async def test_list_sessions_is_newest_first_paged_and_filtered(store: SessionStoreClient) -> None:
    ids = [(await store.create_session(title=f"s{i}")).id for i in range(5)]
    await store.emit(ids[1], running())
    await store.emit(ids[3], running())
    page = await store.list_sessions(page_size=3)
    assert [s.id for s in page.sessions] == ids[::-1][:3]
    page = await store.list_sessions(page_size=3, page_token=page.next_page_token)
    assert [s.id for s in page.sessions] == ids[::-1][3:] and page.next_page_token == ""
    busy = await store.list_sessions(status=events_pb2.SESSION_STATUS_RUNNING)
    assert {s.id for s in busy.sessions} == {ids[1], ids[3]}
    # Running without any lease: work nobody is doing.
    orphaned = await store.list_sessions(orphaned_only=True)
    assert {s.id for s in orphaned.sessions} == {ids[1], ids[3]}
    await store.acquire_lease(ids[1], holder="brain-a", ttl=30)
    orphaned = await store.list_sessions(orphaned_only=True)
    assert {s.id for s in orphaned.sessions} == {ids[3]}


async def test_unknown_session_is_not_found_everywhere(store: SessionStoreClient) -> None:
    calls = [
        store.get_session("missing"),
        store.emit("missing", events.user_message("x")),
        store.get_events("missing", last=1),
        store.acquire_lease("missing", holder="h"),
    ]
    for call in calls:
        with pytest.raises(SessionNotFound, match="session missing does not exist"):
            await call
    with pytest.raises(SessionNotFound):
        async for _ in store.watch("missing"):
            pass


async def test_lease_epochs_only_grow_and_fence_older_writers(store: SessionStoreClient) -> None:
    session = await store.create_session()
    first = (await store.acquire_lease(session.id, holder="brain-a", ttl=1)).lease
    assert first.epoch == 1 and first.holder == "brain-a"
    again = (await store.acquire_lease(session.id, holder="brain-a", ttl=30)).lease
    assert again.epoch == 1, "the same holder extends its lease"
    with pytest.raises(LeaseHeld, match="leased to brain-a"):
        await store.acquire_lease(session.id, holder="brain-b")
    await store.emit(session.id, running(), lease_epoch=1)
    released = await store.release_lease(session.id, holder="brain-a", epoch=1)
    assert released.holder == "" and released.epoch == 1
    second = (await store.acquire_lease(session.id, holder="brain-b", ttl=30)).lease
    assert second.epoch == 2
    with pytest.raises(LeaseFenced, match="epoch 1 is stale"):
        await store.emit(session.id, idle(), lease_epoch=1)
    with pytest.raises(LeaseFenced):
        await store.renew_lease(session.id, holder="brain-a", epoch=1)
    renewed = await store.renew_lease(session.id, holder="brain-b", epoch=2, ttl=60)
    assert renewed.expire_time.ToMicroseconds() > second.expire_time.ToMicroseconds()
    await store.emit(session.id, idle(), lease_epoch=2)
    _, log = await store.read_session(session.id)
    assert [e.type for e in log] == ["session.status_running", "session.status_idle"]


async def test_an_expired_lease_passes_to_a_new_holder_with_a_higher_epoch(store: SessionStoreClient) -> None:
    session = await store.create_session()
    await store.acquire_lease(session.id, holder="brain-a", ttl=1)
    await asyncio.sleep(1.1)
    taken = (await store.acquire_lease(session.id, holder="brain-b", ttl=30)).lease
    assert (taken.holder, taken.epoch) == ("brain-b", 2)


async def test_pages_stop_at_four_mib_but_always_hold_one_event(store: SessionStoreClient) -> None:
    session = await store.create_session()
    big = "x" * (1536 * 1024)
    for _ in range(5):
        await store.emit(session.id, events.user_message(big))
    page = await store.get_session(session.id)
    assert [e.seq for e in page.events] == [1, 2] and page.next_page_token
    huge = await store.create_session()
    await store.emit(huge.id, events.user_message("y" * (4 * 1024 * 1024 - 100)))
    await store.emit(huge.id, events.user_message("small"))
    first = await store.get_session(huge.id)
    assert [e.seq for e in first.events] == [1]
    second = await store.get_events(huge.id, start_seq=2)
    assert [e.seq for e in second.events] == [2]
