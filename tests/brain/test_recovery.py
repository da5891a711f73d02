"""Recovery without a human: a session whose brain vanished is adopted by another brain's scan."""

from __future__ import annotations

import grpc
import pytest

from brain.client import BrainClient
from managed_agents import events
from managed_agents.mesh.errors import InvalidArgument, SessionNotFound
from managed_agents.standin.script import Script, step, text
from managed_agents.v1 import events_pb2
from session_store.client import SessionStoreClient
from tests.brain.conftest import StartBrain, StartStandin
from tests.brain.helpers import stop_reasons, types, wait_idle


async def test_a_running_session_with_a_lapsed_lease_is_adopted_and_completed(
    store: SessionStoreClient, start_standin: StartStandin, start_brain: StartBrain
) -> None:
    session = await store.create_session()
    await store.emit(session.id, events.user_message("are you there?"))
    # A brain that took the session, started the turn and died: its lease will lapse in a second.
    lease = (await store.acquire_lease(session.id, holder="brain/ghost", ttl=1)).lease
    await store.emit(
        session.id,
        events_pb2.Event(session_status_running=events_pb2.SessionStatusRunning(brain="brain/ghost")),
        lease_epoch=lease.epoch,
    )
    standin = await start_standin(Script(steps=(step(text("yes, resumed")),)))
    await start_brain(standin, scan_interval=0.3)
    log = await wait_idle(store, session.id, timeout=15)
    assert types(log)[:4] == [
        "user.message",
        "session.status_running",
        "session.status_rescheduling",
        "session.status_running",
    ]
    assert "brain/ghost stopped mid-turn" in log[2].session_status_rescheduling.reason
    assert stop_reasons(log) == ["end_turn"]
    assert [e.seq for e in log] == list(range(1, len(log) + 1))


async def test_wake_refuses_bad_ids_and_unknown_sessions(
    store: SessionStoreClient, start_standin: StartStandin, start_brain: StartBrain
) -> None:
    brain = await start_brain(await start_standin(Script(steps=())))
    async with BrainClient.connect(brain.address) as client:
        with pytest.raises(InvalidArgument, match="session_id"):
            await client.wake("not a valid id!")
        with pytest.raises(SessionNotFound):
            await client.wake("nope")
        with pytest.raises(InvalidArgument, match="reason"):
            await client.interrupt("nope", reason="x" * 2000)


async def test_a_brain_with_an_unreachable_store_fails_the_call_with_unavailable(
    start_standin: StartStandin, start_brain: StartBrain
) -> None:
    brain = await start_brain(await start_standin(Script(steps=())), store="127.0.0.1:9")
    channel = grpc.aio.insecure_channel(brain.address)
    try:
        from managed_agents.v1 import brain_pb2, brain_pb2_grpc

        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await brain_pb2_grpc.BrainServiceStub(channel).Wake(brain_pb2.WakeRequest(session_id="s1"), timeout=30)
    finally:
        await channel.close()
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "Traceback" not in (raised.value.details() or "")
