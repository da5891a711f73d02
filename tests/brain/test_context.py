"""Long sessions: the log is the memory; the context is compacted to fit, and Claude reads back the rest."""

from __future__ import annotations

from brain.client import BrainClient
from brain.context import CLEAR, SUMMARIZE, ClearThenSummarize
from managed_agents import events
from managed_agents.standin.script import Script, step, text, tool
from managed_agents.v1 import events_pb2
from session_store.client import SessionStoreClient
from tests.brain.conftest import StartBrain, StartStandin
from tests.brain.helpers import stop_reasons, wait_idle


def _exchange(n: int, size: int) -> list[events_pb2.Event]:
    return [
        events.user_message(f"question {n}: " + "q" * size),
        events_pb2.Event(
            agent_message=events_pb2.AgentMessage(
                message_id=f"msg_{n}", content=[events.text(f"answer {n}: " + "a" * size)]
            )
        ),
        events_pb2.Event(session_status_idle=events_pb2.SessionStatusIdle(stop_reason=events_pb2.STOP_REASON_END_TURN)),
    ]


async def test_a_history_beyond_the_budget_is_summarized_and_the_turn_completes(
    store: SessionStoreClient, start_standin: StartStandin, start_brain: StartBrain
) -> None:
    session = await store.create_session()
    for n in range(40):
        await store.emit_batch(session.id, _exchange(n, 2000))
    await store.emit(session.id, events.user_message("and now the last question"))
    standin = await start_standin(Script(steps=(), final_text="short answer"))
    brain = await start_brain(standin, context_budget_tokens=8000)
    async with BrainClient.connect(brain.address) as client:
        await client.wake(session.id)
    log = await wait_idle(store, session.id, count=41)
    compacted = [e.context_compacted for e in log if e.HasField("context_compacted")]
    assert [c.strategy for c in compacted] == [SUMMARIZE]
    assert compacted[0].tokens_before > 8000 >= compacted[0].tokens_after
    assert "read any of them with read_session_events" in compacted[0].summary
    assert stop_reasons(log)[-1] == "end_turn"
    request = standin.standin.requests[-1]
    assert "and now the last question" in str(request["messages"][-1])
    assert request["messages"][0]["content"][0]["text"] == compacted[0].summary
    assert len(str(request["messages"])) // 4 <= 8000
    # Nothing was deleted from the log.
    assert sum(1 for e in log if e.HasField("user_message")) == 41


def test_old_tool_results_are_cleared_first_and_the_prefix_stays_stable() -> None:
    log: list[events_pb2.Event] = [events.user_message("start")]
    for n in range(10):
        log.append(
            events_pb2.Event(agent_tool_use=events_pb2.AgentToolUse(message_id=f"m{n}", id=f"t{n}", name="bash"))
        )
        log.append(
            events_pb2.Event(
                agent_tool_result=events_pb2.AgentToolResult(tool_use_id=f"t{n}", content=[events.text("x" * 4000)])
            )
        )
    for seq, event in enumerate(log, start=1):
        event.seq = seq
    policy = ClearThenSummarize()
    first = policy.build(log, budget_tokens=6000, overhead_tokens=0)
    assert [c.strategy for c in first.compactions] == [CLEAR]
    # Down toward half the budget, but the three newest results are kept whatever they cost.
    assert first.estimated_tokens <= 6000 < first.compactions[0].tokens_before
    recorded = events_pb2.Event(
        seq=len(log) + 1,
        context_compacted=events_pb2.ContextCompacted(strategy=CLEAR, through_seq=first.compactions[0].through_seq),
    )
    again = policy.build([*log, recorded], budget_tokens=6000, overhead_tokens=0)
    assert again.compactions == () and again.messages == first.messages
    results = [b for m in first.messages for b in m["content"] if b["type"] == "tool_result"]
    cleared = [b for b in results if "was cleared from the context" in b["content"][0]["text"]]
    assert 0 < len(cleared) <= len(results) - 3


async def test_the_model_can_read_back_its_own_session(
    store: SessionStoreClient, start_standin: StartStandin, start_brain: StartBrain
) -> None:
    script = Script(
        steps=(
            step(tool("read_session_events", start_seq=1, end_seq=1)),
            step(text("I read: {last_tool_result}")),
        )
    )
    standin = await start_standin(script)
    brain = await start_brain(standin)
    session = await store.create_session()
    await store.emit(session.id, events.user_message("remember the word pelican"))
    async with BrainClient.connect(brain.address) as client:
        await client.wake(session.id)
    log = await wait_idle(store, session.id)
    result = next(e.agent_tool_result for e in log if e.HasField("agent_tool_result"))
    assert not result.is_error
    assert "user.message" in events.plain_text(result.content)
    assert "remember the word pelican" in events.plain_text(result.content)
    assert stop_reasons(log) == ["end_turn"]
