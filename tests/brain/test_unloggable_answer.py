"""A model answer the log cannot hold is handled once: the model is not asked again for the same answer, and
the brain does not crash. A tool input nested deeper than protobuf decodes (about 30 levels of JSON objects)
is an error the model sees, and the turn goes on; an answer the log cannot hold at all (text that is not valid
Unicode) ends the turn with a readable error, as a garbled answer does."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from brain.client import BrainClient
from managed_agents import events
from managed_agents.standin.script import Script, step, text
from managed_agents.v1 import events_pb2
from session_store.client import SessionStoreClient
from tests.brain.conftest import StartBrain, StartStandin
from tests.brain.helpers import start_session, stop_reasons, types, wait_idle
from tests.helpers import assert_eventually


def _nested(levels: int) -> dict[str, Any]:
    value: Any = "echo deep"
    for _ in range(levels):
        value = {"a": value}
    return {"command": value}


async def _run(
    store: SessionStoreClient, start_standin: StartStandin, start_brain: StartBrain, script: Script
) -> tuple[list[events_pb2.Event], list[dict[str, Any]]]:
    """Plays `script` for one turn; the log and the model requests, once no crash loop could add more."""
    standin = await start_standin(script)
    brain = await start_brain(standin)
    session_id = await start_session(store, "run something deep")
    async with BrainClient.connect(brain.address) as client:
        await client.wake(session_id)
        log = await wait_idle(store, session_id)
        await asyncio.sleep(1.2)  # two scan intervals: a crash loop would show more requests
        await assert_eventually(lambda: not brain.harness.running)
    assert not [e for e in log if e.HasField("session_error") and e.session_error.kind == "brain_failure"]
    return log, standin.standin.requests


# 32: the brain can build the event, the store cannot decode it inside its request; 40: the brain cannot even
# build it (protobuf copies a message by decoding it); 150: still within what the `anthropic` SDK parses.
@pytest.mark.parametrize("levels", [32, 40, 150])
async def test_a_tool_input_too_deep_to_log_is_a_tool_error_the_model_sees_once(
    store: SessionStoreClient, start_standin: StartStandin, start_brain: StartBrain, levels: int
) -> None:
    deep = {"type": "tool_use", "name": "bash", "input": _nested(levels)}
    script = Script(steps=(step(text("let me run it"), deep), step(text("ok: {last_tool_result}"))))
    log, requests = await _run(store, start_standin, start_brain, script)

    # One call for the deep answer, one for the answer to the error; no second call for the same answer.
    assert len(requests) == 2, [len(r["messages"]) for r in requests]
    assert stop_reasons(log) == ["end_turn"]

    # The log says why: the answer's text, the tool call without its input, and a tool error naming the cause.
    errors = [e.session_error for e in log if e.HasField("session_error")]
    assert len(errors) == 1 and errors[0].kind == "model_answer_unrecorded" and not errors[0].retrying
    assert "nested deeper" in errors[0].message
    use = next(e.agent_tool_use for e in log if e.HasField("agent_tool_use"))
    assert use.name == "bash" and not use.input.fields
    result = next(e.agent_tool_result for e in log if e.HasField("agent_tool_result"))
    assert result.tool_use_id == use.id and result.is_error
    assert "was not run" in events.plain_text(result.content)
    assert "nested deeper" in events.plain_text(result.content)
    assert "let me run it" in [events.plain_text(e.agent_message.content) for e in log if e.HasField("agent_message")]
    assert types(log).count("span.model_request_end") == 2

    # The model got the error as the result of its call, and went on.
    replies = requests[1]["messages"][-1]["content"]
    tool_result = next(b for b in replies if b["type"] == "tool_result")
    assert tool_result["tool_use_id"] == use.id and tool_result["is_error"] is True


async def test_an_input_too_deep_for_the_sdk_to_parse_ends_the_turn_as_a_garbled_answer(
    store: SessionStoreClient, start_standin: StartStandin, start_brain: StartBrain
) -> None:
    deep = {"type": "tool_use", "name": "bash", "input": _nested(200)}
    log, requests = await _run(store, start_standin, start_brain, Script(steps=(step(deep),)))
    assert len(requests) == 1
    errors = [e.session_error for e in log if e.HasField("session_error")]
    assert [(e.kind, e.retrying) for e in errors] == [("model_bad_response", False)]
    assert "recursion limit" in errors[0].message
    assert stop_reasons(log) == ["error"]


async def test_text_the_log_cannot_hold_ends_the_turn_with_a_readable_error_once(
    store: SessionStoreClient, start_standin: StartStandin, start_brain: StartBrain
) -> None:
    # A lone surrogate: JSON can carry it (escaped), UTF-8, and so protobuf, cannot.
    log, requests = await _run(store, start_standin, start_brain, Script(steps=(step(text("half \ud83d here")),)))
    assert len(requests) == 1
    errors = [e.session_error for e in log if e.HasField("session_error")]
    assert [(e.kind, e.retrying) for e in errors] == [("model_answer_unrecorded", False)]
    assert "could not be recorded" in errors[0].message and "surrogates" in errors[0].message
    assert stop_reasons(log) == ["error"]
    assert types(log)[-2:] == ["span.model_request_end", "session.status_idle"]


async def test_an_answer_the_store_refuses_ends_the_turn_with_its_reason_once(
    store: SessionStoreClient, start_standin: StartStandin, start_brain: StartBrain
) -> None:
    # A tool call without a name passes every check in the brain; the store refuses to log it.
    nameless = {"type": "tool_use", "name": "", "input": {}}
    log, requests = await _run(store, start_standin, start_brain, Script(steps=(step(nameless),)))
    assert len(requests) == 1
    errors = [e.session_error for e in log if e.HasField("session_error")]
    assert [(e.kind, e.retrying) for e in errors] == [("model_answer_unrecorded", False)]
    assert "the session store refused it" in errors[0].message and "name: is required" in errors[0].message
    assert stop_reasons(log) == ["error"]
    assert "agent.tool_use" not in types(log)
