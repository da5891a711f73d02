"""`managed-agents demo`: a session store process, and a short agent session written, watched live and read
back through gRPC, to show the log's guarantees without any other service."""

from __future__ import annotations

import asyncio
import shutil
import sys
import tempfile
from pathlib import Path

from google.protobuf import duration_pb2, struct_pb2

from managed_agents import events
from managed_agents.mesh.errors import SequenceMismatch
from managed_agents.procs import ServiceProcess
from managed_agents.render import Renderer
from managed_agents.v1 import events_pb2
from session_store.client import SessionStoreClient


def _scripted_turn() -> list[events_pb2.Event]:
    """What a brain writes for one short tool-using turn."""
    tool_input = struct_pb2.Struct()
    tool_input.update({"command": "python3 -c 'print(6 * 7)'"})
    usage = events_pb2.ModelUsage(input_tokens=412, output_tokens=38)
    return [
        events_pb2.Event(session_status_running=events_pb2.SessionStatusRunning(brain="demo")),
        events_pb2.Event(span_model_request_start=events_pb2.SpanModelRequestStart(model="claude-demo")),
        events_pb2.Event(
            agent_message=events_pb2.AgentMessage(
                message_id="msg_1", content=[events.text("Let me compute it.")]
            )
        ),
        events_pb2.Event(
            agent_tool_use=events_pb2.AgentToolUse(
                message_id="msg_1", id="toolu_1", name="bash", input=tool_input
            )
        ),
        events_pb2.Event(
            span_model_request_end=events_pb2.SpanModelRequestEnd(
                message_id="msg_1",
                model_usage=usage,
                stop_reason="tool_use",
                duration=duration_pb2.Duration(nanos=180_000_000),
            )
        ),
        events_pb2.Event(
            agent_tool_result=events_pb2.AgentToolResult(
                tool_use_id="toolu_1",
                content=[events.text("42")],
                execution=events_pb2.ToolExecution(sandbox_id="sbx_demo", exit_code=0),
            )
        ),
        events_pb2.Event(
            agent_message=events_pb2.AgentMessage(message_id="msg_2", content=[events.text("6 * 7 = 42.")])
        ),
        events_pb2.Event(
            session_status_idle=events_pb2.SessionStatusIdle(stop_reason=events_pb2.STOP_REASON_END_TURN)
        ),
    ]


async def run_demo(*, keep: bool = False) -> int:
    """Runs the demonstration; returns the process exit code."""
    renderer = Renderer.for_terminal(sys.stdout.isatty())
    say = print
    workdir = Path(tempfile.mkdtemp(prefix="managed-agents-demo-"))
    store = ServiceProcess("session_store", ["--data-dir", str(workdir / "store")], workdir)
    await asyncio.to_thread(store.start)
    say(
        renderer.paint("session store", "bold"),
        f"listening on {store.address} (pid {store.pid}), data in {workdir}",
    )
    try:
        async with SessionStoreClient.connect(store.address) as client:
            session = await client.create_session(title="demo: one scripted turn")
            say(renderer.paint("created", "bold"), session.id, "\n")
            turn = [
                events.user_message("What is 6 * 7? Use the sandbox.", producer="demo"),
                *_scripted_turn(),
            ]
            watched: list[events_pb2.Event] = []
            all_seen = asyncio.Event()

            async def watch() -> None:
                # A live tail, as `managed-agents sessions tail` shows it.
                async for event in client.watch(session.id):
                    watched.append(event)
                    say(renderer.line(event))
                    if event.seq == len(turn):
                        all_seen.set()

            watcher = asyncio.create_task(watch())
            for index, event in enumerate(turn):
                await client.emit(session.id, event, idempotency_key=f"demo-step-{index}")
                await asyncio.sleep(0.15)
            await asyncio.wait_for(all_seen.wait(), 10)
            watcher.cancel()

            say("")
            retry = await client.emit(session.id, turn[3], idempotency_key="demo-step-3")
            say(
                renderer.paint("retry", "bold"),
                f"of step 3 with the same idempotency key: replayed={retry.replayed}, seq {retry.event.seq}, "
                "no second event",
            )
            try:
                await client.emit(session.id, events.user_message("late"), expected_seq=3)
            except SequenceMismatch as conflict:
                say(renderer.paint("conflict", "bold"), f"append with expected_seq=3 refused: {conflict}")
            stored, log = await client.read_session(session.id)
            assert [e.seq for e in log] == [e.seq for e in watched], "the tail and the stored log must agree"
            say(
                renderer.paint("read back", "bold"),
                f"GetSession: {len(log)} events, seq 1..{stored.last_seq}, status "
                f"{events_pb2.SessionStatus.Name(stored.status)}; the live tail saw the same {len(watched)}",
            )
            last = await client.get_events(session.id, last=2)
            say(renderer.paint("slice", "bold"), "GetEvents(last=2):", ", ".join(e.type for e in last.events))
    finally:
        code = await asyncio.to_thread(store.terminate)
        say(renderer.paint("stopped", "bold"), f"session store (exit code {code})")
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0
