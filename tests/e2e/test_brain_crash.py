"""Kill the brain at each point of a turn; another brain resumes the session from the log, nothing is lost,
the log stays linear, and the tool call whose command appends a line to a file ran exactly once."""

from __future__ import annotations

import asyncio

import pytest

from brain.client import BrainClient
from managed_agents import events
from managed_agents.standin.script import Script, step, text, tool
from managed_agents.v1 import events_pb2
from session_store.client import SessionStoreClient
from tests.brain.helpers import start_session, stop_reasons, types, wait_idle
from tests.e2e.conftest import Mesh

pytestmark = pytest.mark.slow

APPEND_ONCE = "sleep 1.5; echo ran >> /workspace/count.txt"


def _script(model_latency: float = 0.0) -> Script:
    return Script(
        steps=(
            step(text("Appending a line."), tool("bash", command=APPEND_ONCE), latency_s=model_latency or None),
            step(tool("bash", command="cat /workspace/count.txt")),
            step(text("The file holds: {last_tool_result}")),
        )
    )


def _assert_exactly_once(log: list[events_pb2.Event]) -> None:
    assert [e.seq for e in log] == list(range(1, len(log) + 1)), "the log must be linear"
    uses = [e.agent_tool_use.id for e in log if e.HasField("agent_tool_use")]
    results = [e.agent_tool_result.tool_use_id for e in log if e.HasField("agent_tool_result")]
    assert sorted(uses) == sorted(results) and len(results) == len(set(results)), "one result per tool call"
    cat = [e.agent_tool_result for e in log if e.HasField("agent_tool_result")][-1]
    assert events.plain_text(cat.content).strip() == "ran", "the append ran exactly once"
    assert stop_reasons(log)[-1] == "end_turn"


async def _watch_for(store: SessionStoreClient, session_id: str, kind: str) -> None:
    async for event in store.watch(session_id):
        if event.WhichOneof("payload") == kind:
            return


@pytest.mark.parametrize("point", ["model_call", "after_tool_use_logged", "during_execute", "after_execute"])
async def test_kill_9_of_the_brain_mid_turn_loses_nothing_and_runs_no_tool_twice(mesh: Mesh, point: str) -> None:
    mesh.standin.standin.script = _script(model_latency=3.0 if point == "model_call" else 0.0)
    failpoints = {
        "after_tool_use_logged": "brain.after_tool_use_logged=crash",
        "after_execute": "brain.after_execute=crash",
    }.get(point, "")
    doomed = mesh.start_brain(failpoints=failpoints, name="doomed")
    async with SessionStoreClient.connect(mesh.store.address) as store:
        session_id = await start_session(store, "append a line, then show the file")
        async with BrainClient.connect(doomed.address) as brain:
            await brain.wake(session_id)
        if point == "model_call":
            while not mesh.standin.standin.arrivals:
                await asyncio.sleep(0.02)
            doomed.kill()
        elif point == "during_execute":
            await asyncio.wait_for(_watch_for(store, session_id, "sandbox_provisioned"), 30)
            await asyncio.sleep(0.7)  # the command sleeps 1.5 s before appending
            doomed.kill()
        else:
            await asyncio.to_thread(doomed.proc.wait, 60)  # type: ignore[union-attr]
        assert not doomed.running()
        mesh.start_brain(name="survivor")  # adopts the session when the dead brain's lease lapses
        log = await wait_idle(store, session_id, timeout=60)
    _assert_exactly_once(log)
    assert "session.status_rescheduling" in types(log)


async def test_kill_9_between_turns_then_a_new_message_is_answered(mesh: Mesh) -> None:
    mesh.standin.standin.script = Script(steps=(step(text("first answer")), step(text("second answer"))))
    doomed = mesh.start_brain(failpoints="brain.after_idle_logged=crash", name="doomed")
    async with SessionStoreClient.connect(mesh.store.address) as store:
        session_id = await start_session(store, "first question")
        async with BrainClient.connect(doomed.address) as brain:
            await brain.wake(session_id)
        await asyncio.to_thread(doomed.proc.wait, 60)  # type: ignore[union-attr]
        survivor = mesh.start_brain(name="survivor")
        await store.emit(session_id, events.user_message("second question"))
        async with BrainClient.connect(survivor.address) as brain:
            await brain.wake(session_id)  # the dead brain's lease still holds: this brain retries after it lapses
        log = await wait_idle(store, session_id, count=2, timeout=60)
    answers = [events.plain_text(e.agent_message.content) for e in log if e.HasField("agent_message")]
    assert answers == ["first answer", "second answer"]
    assert stop_reasons(log) == ["end_turn", "end_turn"]
    assert [e.seq for e in log] == list(range(1, len(log) + 1))
