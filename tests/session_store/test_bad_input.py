"""Bad input gets INVALID_ARGUMENT with a sentence naming the field, and nothing is written."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import grpc
import pytest
from google.protobuf import duration_pb2

from managed_agents import events
from managed_agents.mesh.channel import dial
from managed_agents.mesh.errors import IdempotencyKeyReused, InvalidArgument, SequenceMismatch
from managed_agents.v1 import content_pb2, events_pb2, sandbox_pb2, session_pb2, session_pb2_grpc
from session_store.app import StoreServer
from session_store.client import SessionStoreClient

Call = Callable[[session_pb2_grpc.SessionServiceStub, str], Awaitable[object]]


def _event(**payload: object) -> events_pb2.Event:
    return events_pb2.Event(**payload)  # type: ignore[arg-type]


BAD_CALLS: dict[str, tuple[Call, str]] = {
    "malformed session id": (
        lambda s, sid: s.GetSession(session_pb2.GetSessionRequest(session_id="no spaces allowed")),
        "session_id",
    ),
    "overlong session id": (
        lambda s, sid: s.CreateSession(session_pb2.CreateSessionRequest(session_id="x" * 65)),
        "session_id",
    ),
    "missing session id": (
        lambda s, sid: s.EmitEvent(session_pb2.EmitEventRequest(event=events.user_message("x"))),
        "session_id: is required",
    ),
    "missing event": (
        lambda s, sid: s.EmitEvent(session_pb2.EmitEventRequest(session_id=sid)),
        "event: is required",
    ),
    "empty event": (
        lambda s, sid: s.EmitEvent(session_pb2.EmitEventRequest(session_id=sid, event=events_pb2.Event())),
        "event.payload",
    ),
    "empty message": (
        lambda s, sid: s.EmitEvent(
            session_pb2.EmitEventRequest(session_id=sid, event=_event(user_message=events_pb2.UserMessage()))
        ),
        "needs at least one content block",
    ),
    "empty text block": (
        lambda s, sid: s.EmitEvent(
            session_pb2.EmitEventRequest(
                session_id=sid,
                event=_event(user_message=events_pb2.UserMessage(content=[content_pb2.ContentBlock()])),
            )
        ),
        "neither text nor image",
    ),
    "oversized event": (
        lambda s, sid: s.EmitEvent(
            session_pb2.EmitEventRequest(session_id=sid, event=events.user_message("x" * (4 * 1024 * 1024 + 1)))
        ),
        "the limit is 4194304",
    ),
    "unknown enum value": (
        lambda s, sid: s.EmitEvent(
            session_pb2.EmitEventRequest(
                session_id=sid,
                event=_event(session_status_idle=events_pb2.SessionStatusIdle(stop_reason=42)),  # type: ignore[arg-type]
            )
        ),
        "42 is not a known value",
    ),
    "missing required payload field": (
        lambda s, sid: s.EmitEvent(
            session_pb2.EmitEventRequest(
                session_id=sid,
                event=_event(agent_tool_use=events_pb2.AgentToolUse(message_id="m", name="bash")),
            )
        ),
        "agent_tool_use.id: is required",
    ),
    "negative after_seq": (
        lambda s, sid: s.GetSession(session_pb2.GetSessionRequest(session_id=sid, after_seq=-1)),
        "after_seq: must not be negative",
    ),
    "negative page size": (
        lambda s, sid: s.GetSession(session_pb2.GetSessionRequest(session_id=sid, page_size=-5)),
        "page_size",
    ),
    "zero expected_seq": (
        lambda s, sid: s.EmitEvent(
            session_pb2.EmitEventRequest(session_id=sid, event=events.user_message("x"), expected_seq=0)
        ),
        "expected_seq: must be at least 1",
    ),
    "bad idempotency key": (
        lambda s, sid: s.EmitEvent(
            session_pb2.EmitEventRequest(session_id=sid, event=events.user_message("x"), idempotency_key="a b")
        ),
        "idempotency_key",
    ),
    "empty batch": (
        lambda s, sid: s.BatchEmitEvents(session_pb2.BatchEmitEventsRequest(session_id=sid)),
        "must hold 1 to 1000 events",
    ),
    "last with a range": (
        lambda s, sid: s.GetEvents(session_pb2.GetEventsRequest(session_id=sid, last=3, start_seq=2)),
        "cannot be combined",
    ),
    "reversed range": (
        lambda s, sid: s.GetEvents(session_pb2.GetEventsRequest(session_id=sid, start_seq=5, end_seq=2)),
        "end_seq: is before start_seq",
    ),
    "forged page token": (
        lambda s, sid: s.GetSession(session_pb2.GetSessionRequest(session_id=sid, page_token="garbage")),
        "page_token",
    ),
    "unknown status filter": (
        lambda s, sid: s.ListSessions(session_pb2.ListSessionsRequest(status=9)),  # type: ignore[arg-type]
        "status",
    ),
    "lease ttl out of range": (
        lambda s, sid: s.AcquireLease(
            session_pb2.AcquireLeaseRequest(session_id=sid, holder="h", ttl=duration_pb2.Duration(seconds=3600))
        ),
        "ttl: must be between 1 s and 10 min",
    ),
    "empty holder": (
        lambda s, sid: s.AcquireLease(session_pb2.AcquireLeaseRequest(session_id=sid)),
        "holder",
    ),
    "too many credentials for one session token": (
        lambda s, sid: s.CreateSession(
            session_pb2.CreateSessionRequest(
                session=session_pb2.Session(
                    agent=session_pb2.AgentConfig(
                        mcp_servers=[f"m{i}" for i in range(12)],
                        resources=sandbox_pb2.Resources(
                            secrets=[sandbox_pb2.SandboxSecret(env=f"K{i}", credential=f"k{i}") for i in range(9)]
                        ),
                    )
                )
            )
        ),
        "grants 21 credentials",
    ),
    "title too long": (
        lambda s, sid: s.CreateSession(session_pb2.CreateSessionRequest(session=session_pb2.Session(title="t" * 300))),
        "session.title",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CALLS))
async def test_bad_input_is_invalid_argument_and_writes_nothing(
    case: str, store_server: StoreServer, store: SessionStoreClient
) -> None:
    session = await store.create_session(session_id="target")
    await store.emit(session.id, events.user_message("kept"))
    call, expected = BAD_CALLS[case]
    channel = dial(store_server.address)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await call(session_pb2_grpc.SessionServiceStub(channel), session.id)
    finally:
        await channel.close()
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, raised.value.details()
    assert expected in (raised.value.details() or "")
    assert "Traceback" not in (raised.value.details() or "")
    after, log = await store.read_session(session.id)
    assert after.last_seq == 1 and [events.plain_text(e.user_message.content) for e in log] == ["kept"]
    listed = await store.list_sessions()
    assert [s.id for s in listed.sessions] == ["target"]


async def test_bad_input_reaches_clients_as_typed_errors_with_field_violations(
    store: SessionStoreClient,
) -> None:
    session = await store.create_session()
    with pytest.raises(InvalidArgument) as raised:
        await store.emit(session.id, events_pb2.Event())
    assert raised.value.violations[0].field == "event.payload"


async def test_a_batch_with_one_bad_event_writes_none_of_it(store: SessionStoreClient) -> None:
    session = await store.create_session()
    batch = [events.user_message("fine"), events_pb2.Event(), events.user_message("also fine")]
    with pytest.raises(InvalidArgument, match=r"events\[1\]\.payload"):
        await store.emit_batch(session.id, batch)
    assert (await store.get_session(session.id)).session.last_seq == 0


async def test_retrying_an_idempotency_key_returns_the_first_append(store: SessionStoreClient) -> None:
    session = await store.create_session()
    first = await store.emit(session.id, events.user_message("once"), idempotency_key="step-1")
    await store.emit(session.id, events.user_message("other"))
    retry = await store.emit(session.id, events.user_message("once"), idempotency_key="step-1")
    assert retry.replayed and retry.event.seq == first.event.seq == 1
    assert retry.event.id == first.event.id
    _, log = await store.read_session(session.id)
    assert [events.plain_text(e.user_message.content) for e in log] == ["once", "other"]
    with pytest.raises(IdempotencyKeyReused, match="different request"):
        await store.emit(session.id, events.user_message("changed"), idempotency_key="step-1")
    batch = [events.user_message("b1"), events.user_message("b2")]
    first_batch = await store.emit_batch(session.id, batch, idempotency_key="batch-1")
    again = await store.emit_batch(session.id, batch, idempotency_key="batch-1")
    assert again.replayed and [e.seq for e in again.events] == [e.seq for e in first_batch.events] == [3, 4]
    assert (await store.get_session(session.id)).session.last_seq == 4


async def test_expected_seq_conflict_is_aborted_with_the_current_last_seq(store: SessionStoreClient) -> None:
    session = await store.create_session()
    await store.emit(session.id, events.user_message("a"), expected_seq=1)
    await store.emit(session.id, events.user_message("b"), expected_seq=2)
    with pytest.raises(SequenceMismatch) as raised:
        await store.emit(session.id, events.user_message("stale"), expected_seq=2)
    assert raised.value.last_seq == 2
    assert raised.value.code.name == "ABORTED"
    assert (await store.get_session(session.id)).session.last_seq == 2
