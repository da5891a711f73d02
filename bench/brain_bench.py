"""Brain benchmark: Wake to first model request by log length, harness overhead per tool call, and one brain
process driving 500 concurrent sessions against a stand-in model that takes 200 ms per answer.

The store, hands and brain run as their own processes; the stand-in model runs in this process, so the time a
request reaches it is measured on the same clock as the Wake that caused it.

    python bench/brain_bench.py [--quick] [--no-hands]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import table
from brain.client import BrainClient
from managed_agents import events
from managed_agents.procs import ServiceProcess
from managed_agents.standin.script import Script, step, text, tool
from managed_agents.standin.server import StandinServer
from managed_agents.v1 import events_pb2
from session_store.client import SessionStoreClient


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def _wait_idle(store: SessionStoreClient, session_id: str, after_seq: int = 0) -> list[events_pb2.Event]:
    async for event in store.watch(session_id, after_seq=after_seq):
        if event.HasField("session_status_idle"):
            break
    _, log = await store.read_session(session_id)
    return log


async def wake_to_first_request(
    store: SessionStoreClient, brain: BrainClient, standin: StandinServer, size: int
) -> float:
    session = await store.create_session()
    history = []
    for n in range(size // 3):
        history += [
            events.user_message(f"question {n}"),
            events_pb2.Event(
                agent_message=events_pb2.AgentMessage(message_id=f"m{n}", content=[events.text(f"answer {n}")])
            ),
            events_pb2.Event(
                session_status_idle=events_pb2.SessionStatusIdle(stop_reason=events_pb2.STOP_REASON_END_TURN)
            ),
        ]
    for start in range(0, len(history), 1000):
        await store.emit_batch(session.id, history[start : start + 1000])
    await store.emit(session.id, events.user_message("one more question"))
    before = len(standin.standin.arrivals)
    started = time.monotonic()
    await brain.wake(session.id)
    while len(standin.standin.arrivals) == before:
        await asyncio.sleep(0.001)
    elapsed = standin.standin.arrivals[before] - started
    await _wait_idle(store, session.id, after_seq=len(history))
    return elapsed


async def tool_overhead(
    store: SessionStoreClient, brain: BrainClient, standin: StandinServer, calls: int, tool_name: str
) -> tuple[float, float]:
    """(harness time per tool call, end-to-end time per tool call): turn time minus model and tool time."""
    if tool_name == "bash":
        steps = tuple(step(tool("bash", command="true")) for _ in range(calls))
    else:
        steps = tuple(step(tool("read_session_events", last=1)) for _ in range(calls))
    standin.standin.script = Script(steps=(*steps, step(text("done"))))
    session = await store.create_session()
    await store.emit(session.id, events.user_message("go"))
    started = time.monotonic()
    await brain.wake(session.id)
    log = await _wait_idle(store, session.id)
    total = time.monotonic() - started
    model = sum(
        e.span_model_request_end.duration.ToNanoseconds() / 1e9 for e in log if e.HasField("span_model_request_end")
    )
    tools = sum(
        e.agent_tool_result.execution.duration.ToNanoseconds() / 1e9 for e in log if e.HasField("agent_tool_result")
    )
    assert sum(1 for e in log if e.HasField("agent_tool_result")) == calls
    return (total - model - tools) / calls, total / calls


async def concurrent_sessions(
    store: SessionStoreClient, brain: BrainClient, standin: StandinServer, brain_pid: int, count: int
) -> dict[str, float]:
    standin.standin.script = Script(
        steps=(step(tool("read_session_events", last=2)), step(text("finished: {last_user_message}"))),
        latency_s=0.2,
    )
    rss_before = _rss_kib(brain_pid)
    sessions = []
    for n in range(count):
        session = await store.create_session(title=f"load {n}")
        await store.emit(session.id, events.user_message(f"task {n}"))
        sessions.append(session.id)
    started = time.monotonic()
    peak = rss_before
    await asyncio.gather(*(brain.wake(s) for s in sessions))

    async def sample() -> None:
        nonlocal peak
        while True:
            peak = max(peak, _rss_kib(brain_pid))
            await asyncio.sleep(0.1)

    sampler = asyncio.create_task(sample())
    logs = await asyncio.gather(*(_wait_idle(store, s) for s in sessions))
    elapsed = time.monotonic() - started
    sampler.cancel()
    completed = sum(
        1
        for log in logs
        if any(
            e.HasField("session_status_idle") and e.session_status_idle.stop_reason == events_pb2.STOP_REASON_END_TURN
            for e in log
        )
    )
    return {
        "completed": completed,
        "seconds": elapsed,
        "rss_before_mib": rss_before / 1024,
        "rss_peak_mib": peak / 1024,
        "kib_per_session": (peak - rss_before) / count,
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller runs, for a smoke check")
    parser.add_argument("--no-hands", action="store_true", help="skip what needs a hands server")
    args = parser.parse_args()
    standin = await StandinServer.start(Script(steps=(), final_text="ok"))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        store = ServiceProcess(
            "session_store", ["--data-dir", str(work / "store"), "--log-level", "warning"], work
        ).start()
        hands_address = ""
        processes = [store]
        if not args.no_hands:
            hands = ServiceProcess(
                "hands", ["--work-root", str(work / "sandboxes"), "--log-level", "warning"], work
            ).start()
            processes.append(hands)
            hands_address = hands.address
        brain_process = ServiceProcess(
            "brain",
            [
                "--store",
                store.address,
                "--hands",
                hands_address,
                "--context-budget",
                "10000000",
                "--max-steps",
                "1000",
                "--log-level",
                "warning",
            ],
            work,
            env={"ANTHROPIC_BASE_URL": standin.base_url, "ANTHROPIC_API_KEY": "bench"},
        ).start()
        processes.append(brain_process)
        try:
            async with (
                SessionStoreClient.connect(store.address) as client,
                BrainClient.connect(brain_process.address) as brain,
            ):
                rows = []
                for size in (100, 1000) if args.quick else (100, 1000, 10_000):
                    samples = [await wake_to_first_request(client, brain, standin, size) for _ in range(3)]
                    rows.append(
                        (
                            f"{size:>6} events",
                            f"min {min(samples) * 1e3:7.1f} ms   median {statistics.median(samples) * 1e3:7.1f} ms",
                        )
                    )
                table("Wake to first model request", rows)
                calls = 20 if args.quick else 50
                rows = []
                names = ["read_session_events"] + ([] if args.no_hands else ["bash"])
                for name in names:
                    overhead, per_call = await tool_overhead(client, brain, standin, calls, name)
                    rows.append(
                        (
                            f"{name} x{calls}",
                            f"harness {overhead * 1e3:6.1f} ms per call   "
                            f"(whole step {per_call * 1e3:6.1f} ms incl. model and tool)",
                        )
                    )
                table("Harness overhead per tool call (time in neither the model nor the tool)", rows)
                count = 100 if args.quick else 500
                result = await concurrent_sessions(client, brain, standin, brain_process.pid, count)
                table(
                    f"{count} concurrent sessions, stand-in model at 200 ms per answer, 2 model calls each",
                    [
                        ("completed", f"{result['completed']:.0f} of {count}"),
                        ("wall time", f"{result['seconds']:.1f} s ({count / result['seconds']:.1f} turns/s)"),
                        (
                            "brain RSS",
                            f"{result['rss_before_mib']:.0f} MiB before, {result['rss_peak_mib']:.0f} MiB "
                            f"peak ({result['kib_per_session']:.0f} KiB per running session)",
                        ),
                    ],
                )
        finally:
            for process in reversed(processes):
                process.stop()
            await standin.aclose()


if __name__ == "__main__":
    asyncio.run(main())
