"""Turns without sandbox tools: what the brain writes, model failures, interrupts, waking twice."""

from __future__ import annotations

import asyncio

from brain.client import BrainClient
from managed_agents import events
from managed_agents.standin.script import Script, step, text
from managed_agents.v1 import brain_pb2
from session_store.client import SessionStoreClient
from tests.brain.conftest import StartBrain, StartStandin
from tests.brain.helpers import start_session, stop_reasons, types, wait_idle
from tests.helpers import assert_eventually


async def test_a_text_turn_writes_the_expected_typed_events(
    store: SessionStoreClient, start_standin: StartStandin, start_brain: StartBrain
) -> None:
    standin = await start_standin(Script(steps=(step(text("Hello! {last_user_message}")),)))
    brain = await start_brain(standin)
    session_id = await start_session(store, "say hi")
    async with BrainClient.connect(brain.address) as client:
        woken = await client.wake(session_id)
        assert woken.outcome == brain_pb2.WAKE_OUTCOME_STARTED and woken.lease_epoch == 1
        log = await wait_idle(store, session_id)
        await assert_eventually(lambda: not brain.harness.running)
        again = await client.wake(session_id)
    assert types(log) == [
        "user.message",
        "session.status_running",
        "span.model_request_start",
        "agent.message",
        "span.model_request_end",
        "session.status_idle",
    ]
    assert events.plain_text(log[3].agent_message.content) == "Hello! say hi"
    assert log[4].span_model_request_end.model_usage.output_tokens > 0
    assert stop_reasons(log) == ["end_turn"]
    assert again.outcome == brain_pb2.WAKE_OUTCOME_IDLE
    request = standin.standin.requests[0]
    assert request["stream"] is True and request["metadata"] == {"user_id": session_id}
    assert request["messages"] == [
        {
            "role": "user",
            "content": [{"type": "text", "text": "say hi", "cache_control": {"type": "ephemeral"}}],
        }
    ]
    assert request["system"][0]["cache_control"] == {"type": "ephemeral"}


async def test_overloaded_then_success_is_retried_and_logged(
    store: SessionStoreClient, start_standin: StartStandin, start_brain: StartBrain
) -> None:
    standin = await start_standin(
        Script(
            steps=(step(text("made it")),),
        )
    )
    standin.standin.script = Script(steps=(step(text("made it"), fail=(529, 429)),))
    brain = await start_brain(standin)
    session_id = await start_session(store, "hello")
    async with BrainClient.connect(brain.address) as client:
        await client.wake(session_id)
    log = await wait_idle(store, session_id)
    errors = [e.session_error for e in log if e.HasField("session_error")]
    assert [(e.kind, e.retrying) for e in errors] == [
        ("model_overloaded", True),
        ("model_rate_limited", True),
    ]
    assert events.plain_text(next(e for e in log if e.HasField("agent_message")).agent_message.content) == "made it"
    assert stop_reasons(log) == ["end_turn"]
    assert len(standin.standin.requests) == 3


async def test_a_garbled_model_response_ends_the_turn_with_a_readable_error(
    store: SessionStoreClient, start_standin: StartStandin, start_brain: StartBrain
) -> None:
    standin = await start_standin(Script(steps=(step(text("never"), garbage=True),)))
    brain = await start_brain(standin)
    session_id = await start_session(store, "hello")
    async with BrainClient.connect(brain.address) as client:
        await client.wake(session_id)
        log = await wait_idle(store, session_id)
        await asyncio.sleep(1.2)  # two scan intervals: a crash loop would show more requests
        await assert_eventually(lambda: not brain.harness.running)
        again = await client.wake(session_id)
    errors = [e.session_error for e in log if e.HasField("session_error")]
    assert len(errors) == 1 and errors[0].kind == "model_bad_response" and not errors[0].retrying
    assert "cannot be read" in errors[0].message
    assert stop_reasons(log) == ["error"]
    assert len(standin.standin.requests) == 1
    assert again.outcome == brain_pb2.WAKE_OUTCOME_IDLE


async def test_retries_exhausted_ends_the_turn(
    store: SessionStoreClient, start_standin: StartStandin, start_brain: StartBrain
) -> None:
    standin = await start_standin(Script(steps=(step(text("never"), fail=(500, 500, 500)),)))
    brain = await start_brain(standin, model_attempts=3)
    session_id = await start_session(store, "hello")
    async with BrainClient.connect(brain.address) as client:
        await client.wake(session_id)
    log = await wait_idle(store, session_id)
    retrying = [e.session_error.retrying for e in log if e.HasField("session_error")]
    assert retrying == [True, True, False]
    assert stop_reasons(log) == ["retries_exhausted"]


async def test_interrupt_mid_turn_then_continue_with_a_new_message(
    store: SessionStoreClient, start_standin: StartStandin, start_brain: StartBrain
) -> None:
    slow = step(text("this answer is too slow to arrive"), latency_s=30)
    standin = await start_standin(Script(steps=(slow, step(text("back again: {last_user_message}")))))
    brain = await start_brain(standin)
    session_id = await start_session(store, "take your time")
    async with BrainClient.connect(brain.address) as client:
        await client.wake(session_id)
        while not standin.standin.requests:
            await asyncio.sleep(0.02)
        interrupted = await client.interrupt(session_id, reason="changed my mind")
        assert interrupted.was_running
        log = await wait_idle(store, session_id)
        assert stop_reasons(log) == ["interrupted"]
        assert not any(e.HasField("agent_message") for e in log)
        # The interrupted answer was never logged, so the next request is again the script's first step.
        standin.standin.script = Script(steps=(step(text("back again: {last_user_message}")),))
        await store.emit(session_id, events.user_message("now answer briefly"))
        await client.wake(session_id)
        log = await wait_idle(store, session_id, count=2)
    assert stop_reasons(log) == ["interrupted", "end_turn"]
    answer = [e for e in log if e.HasField("agent_message")][-1]
    # The unanswered first message and the new one reach the model together, as one user turn.
    assert events.plain_text(answer.agent_message.content) == "back again: take your time now answer briefly"
    last_request = standin.standin.requests[-1]["messages"]
    assert all("changed my mind" not in str(m) for m in last_request), "the model never sees the interrupt"


async def test_two_brains_woken_at_once_one_drives(
    store: SessionStoreClient, start_standin: StartStandin, start_brain: StartBrain
) -> None:
    standin = await start_standin(Script(steps=(step(text("one answer"), latency_s=0.3),)))
    first, second = await start_brain(standin), await start_brain(standin)
    session_id = await start_session(store, "who drives?")
    async with BrainClient.connect(first.address) as a, BrainClient.connect(second.address) as b:
        results = await asyncio.gather(a.wake(session_id), b.wake(session_id))
    outcomes = sorted(r.outcome for r in results)
    assert outcomes == [brain_pb2.WAKE_OUTCOME_STARTED, brain_pb2.WAKE_OUTCOME_RUNNING_ELSEWHERE]
    log = await wait_idle(store, session_id)
    assert [e.seq for e in log] == list(range(1, len(log) + 1))
    assert types(log).count("agent.message") == 1
    assert len(standin.standin.requests) == 1
