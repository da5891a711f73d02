"""The brain with real hands: lazy provisioning, and a sandbox that dies mid-turn."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from pathlib import Path

from brain.client import BrainClient
from hands.app import HandsServer
from hands.client import HandsClient
from managed_agents import events
from managed_agents.procs import ServiceProcess, stop_all
from managed_agents.standin.script import Script, step, text, tool
from session_store.client import SessionStoreClient
from tests.brain.conftest import StartBrain, StartStandin
from tests.brain.helpers import start_session, stop_reasons, types, wait_idle


async def test_a_session_without_tool_calls_never_provisions_a_sandbox(
    store: SessionStoreClient,
    hands_server: HandsServer,
    hands: HandsClient,
    start_standin: StartStandin,
    start_brain: StartBrain,
) -> None:
    standin = await start_standin(Script(steps=(step(text("no tools needed")),)))
    brain = await start_brain(standin, hands=hands_server.address)
    session_id = await start_session(store, "just talk")
    async with BrainClient.connect(brain.address) as client:
        await client.wake(session_id)
    log = await wait_idle(store, session_id)
    assert "sandbox.provisioned" not in types(log)
    assert (await hands.list_sandboxes()).sandboxes == []
    tools = [t.get("name") for t in standin.standin.requests[0]["tools"]]
    assert tools == ["bash", "str_replace_based_edit_tool", "read_session_events"]


async def test_a_sandbox_that_dies_mid_turn_is_an_error_claude_sees_then_a_new_one(
    store: SessionStoreClient, hands_server: HandsServer, start_standin: StartStandin, start_brain: StartBrain
) -> None:
    script = Script(
        steps=(
            step(tool("bash", command="echo one > a.txt; cat a.txt")),
            step(tool("bash", command="cat a.txt"), latency_s=1.5),
            step(tool("bash", command="echo two > b.txt; ls")),
            step(text("done: {last_tool_result}")),
        )
    )
    standin = await start_standin(script)
    brain = await start_brain(standin, hands=hands_server.address)
    session_id = await start_session(store, "work in the sandbox")
    async with BrainClient.connect(brain.address) as client:
        await client.wake(session_id)
    first_sandbox = ""
    async for event in store.watch(session_id):
        if event.HasField("sandbox_provisioned"):
            first_sandbox = event.sandbox_provisioned.sandbox_id
        if event.HasField("agent_tool_result"):
            break
    # The sandbox dies while the model is thinking about the next step.
    for pid in subprocess.run(["pgrep", "-f", first_sandbox], capture_output=True, text=True).stdout.split():
        os.kill(int(pid), signal.SIGKILL)
    log = await wait_idle(store, session_id)
    results = [e.agent_tool_result for e in log if e.HasField("agent_tool_result")]
    assert events.plain_text(results[0].content) == "one\n"
    assert results[1].is_error and "gone" in events.plain_text(results[1].content)
    assert not results[2].is_error and events.plain_text(results[2].content) == "b.txt\n", "a fresh workspace"
    provisioned = [e.sandbox_provisioned.sandbox_id for e in log if e.HasField("sandbox_provisioned")]
    lost = [e.sandbox_lost.sandbox_id for e in log if e.HasField("sandbox_lost")]
    assert provisioned[0] == first_sandbox and lost == [first_sandbox] and len(provisioned) == 2
    assert stop_reasons(log) == ["end_turn"]
    # Claude saw the error: it was in the request after the failed call.
    assert "gone" in str(standin.standin.requests[2]["messages"][-1])


async def test_a_turn_waits_out_a_hands_server_that_is_down_when_it_starts(
    tmp_path: Path, store: SessionStoreClient, start_standin: StartStandin, start_brain: StartBrain
) -> None:
    # The brain needs hands' tool list before its first model call. Every hands server restarting at that
    # moment is an outage to wait out, not a crash of the run (which, three times over, would end the turn).
    hands_process = ServiceProcess("hands", ["--work-root", str(tmp_path / "sandboxes")], tmp_path / "hands").start()
    hands_process.stop()
    standin = await start_standin(Script(steps=(step(tool("bash", command="echo back")), step(text("done")))))
    brain = await start_brain(standin, hands=hands_process.address)
    session_id = await start_session(store, "run something")
    try:
        async with BrainClient.connect(brain.address) as client:
            await client.wake(session_id)
        await asyncio.sleep(1.5)
        assert standin.standin.requests == [], "no model call can be made without the tool list"
        await asyncio.to_thread(hands_process.restart)
        log = await wait_idle(store, session_id, timeout=60)
    finally:
        await stop_all(hands_process)
    assert stop_reasons(log) == ["end_turn"]
    assert not [e for e in log if e.HasField("session_error")]
    results = [e.agent_tool_result for e in log if e.HasField("agent_tool_result")]
    assert [(r.is_error, r.content[0].text.text) for r in results] == [(False, "back\n")]
