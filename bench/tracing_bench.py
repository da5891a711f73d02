"""What tracing costs: the same turns with tracing off and on, and how many spans and events a turn makes.

Two meshes (store, hands and brain, each its own process) run side by side: one without
`OTEL_EXPORTER_OTLP_ENDPOINT` (no instrumentation at all), one with it pointing at an OTLP collector (a real
OTLP/gRPC TraceService in this process, the one the tests use). Turns alternate between them (off/on, then
on/off), so a change in the machine's load during the run falls on both alike. Each turn is three model calls
(two `bash` tool calls, then an answer) against a stand-in model that answers at once, so the mesh's own cost
dominates.

Spans are counted two ways once the traced processes have stopped (which flushes their exporters): those in
each turn's trace (the trace ids the brain wrote on the turn's events), and every span exported, divided by the
turns (that also counts the server spans of the benchmark's own untraced calls: CreateSession, EmitEvent,
WatchSession, GetSession).

    python bench/tracing_bench.py [--turns 60]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import percentile, table
from brain.client import BrainClient
from managed_agents import events
from managed_agents.procs import ServiceProcess
from managed_agents.standin.script import Script, step, text, tool
from managed_agents.standin.server import StandinServer
from session_store.client import SessionStoreClient
from tests.e2e.collector import Collector

WARM_UP = 3


@dataclass
class Mesh:
    """One mesh's clients and what its measured turns produced."""

    name: str
    store: SessionStoreClient
    brain: BrainClient
    latencies: list[float] = field(default_factory=list)
    events: list[int] = field(default_factory=list)
    trace_ids: list[set[str]] = field(default_factory=list)

    async def turn(self, n: int, *, measured: bool) -> None:
        session = await self.store.create_session()
        await self.store.emit(session.id, events.user_message(f"turn {n}"))
        started = time.monotonic()
        await self.brain.wake(session.id)
        async for event in self.store.watch(session.id):
            if event.HasField("session_status_idle"):
                break
        elapsed = time.monotonic() - started
        if measured:
            _, log = await self.store.read_session(session.id)
            self.latencies.append(elapsed)
            self.events.append(len(log))
            self.trace_ids.append({e.trace_id for e in log if e.trace_id and e.producer.startswith("brain/")})


@contextlib.asynccontextmanager
async def mesh(name: str, work: Path, standin: StandinServer, env: dict[str, str]) -> AsyncIterator[Mesh]:
    """Store, hands and brain as processes with `env`; stopped (and so flushed) on exit."""
    quiet = ["--log-level", "warning"]
    processes: list[ServiceProcess] = []

    async def start(process: ServiceProcess) -> ServiceProcess:
        # In a thread: the collector serving the traced mesh runs on this event loop.
        processes.append(process)
        return await asyncio.to_thread(process.start)

    try:
        store = await start(ServiceProcess("session_store", ["--data-dir", str(work / "store"), *quiet], work, env=env))
        hands = await start(ServiceProcess("hands", ["--work-root", str(work / "sb"), *quiet], work, env=env))
        brain = await start(
            ServiceProcess(
                "brain",
                ["--store", store.address, "--hands", hands.address, *quiet],
                work,
                env={**env, "ANTHROPIC_BASE_URL": standin.base_url, "ANTHROPIC_API_KEY": "bench"},
            )
        )
        async with SessionStoreClient.connect(store.address) as client, BrainClient.connect(brain.address) as wake:
            yield Mesh(name, client, wake)
    finally:
        for process in reversed(processes):
            await asyncio.to_thread(process.stop)


def _turns_row(samples: list[float]) -> str:
    return (
        f"turn p50 {percentile(samples, 50) * 1e3:6.1f} ms  p99 {percentile(samples, 99) * 1e3:6.1f} ms  "
        f"mean {statistics.fmean(samples) * 1e3:6.1f} ms"
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--turns", type=int, default=60, help="measured turns per mode")
    args = parser.parse_args()
    script = Script(
        steps=(step(tool("bash", command="true")), step(tool("bash", command="echo hi")), step(text("done")))
    )
    standin = await StandinServer.start(script)
    collector = Collector()
    await collector.start()
    traced_env = {"OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint, "OTEL_EXPORTER_OTLP_INSECURE": "true"}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            async with (
                mesh("off", Path(tmp) / "off", standin, {}) as off,
                mesh("on", Path(tmp) / "on", standin, traced_env) as on,
            ):
                for n in range(WARM_UP + args.turns):
                    pair = (off, on) if n % 2 == 0 else (on, off)
                    for each in pair:
                        await each.turn(n, measured=n >= WARM_UP)
            # Both meshes have stopped: the traced processes flushed their span exporters on the way out.
    finally:
        await collector.stop()
        await standin.aclose()
    by_trace = Counter(s.trace_id for s in collector.spans)
    in_turn = [sum(by_trace[t] for t in ids) for ids in on.trace_ids]
    turn_services = Counter(s.service for s in collector.spans if any(s.trace_id in ids for ids in on.trace_ids))
    all_turns = WARM_UP + args.turns
    overhead = statistics.median(on.latencies) / statistics.median(off.latencies) - 1
    overhead_mean = statistics.fmean(on.latencies) / statistics.fmean(off.latencies) - 1
    table(
        f"{args.turns} turns per mode, alternating, of 3 model calls and 2 bash calls each "
        "(stand-in model answering at once)",
        [
            ("tracing off", _turns_row(off.latencies)),
            ("tracing on (OTLP)", _turns_row(on.latencies)),
            ("overhead", f"{overhead * 100:+.1f} % at the median, {overhead_mean * 100:+.1f} % in the mean"),
            (
                "events per turn",
                f"{statistics.fmean(off.events):.1f} (off)  {statistics.fmean(on.events):.1f} (on)",
            ),
            (
                "spans in a turn's trace",
                f"{statistics.fmean(in_turn):.1f} (min {min(in_turn)}, max {max(in_turn)}): "
                + ", ".join(f"{k} {v / len(in_turn):.1f}" for k, v in sorted(turn_services.items())),
            ),
            (
                "spans exported per turn",
                f"{len(collector.spans) / all_turns:.1f} (incl. the server spans of the benchmark's own calls)",
            ),
        ],
    )


if __name__ == "__main__":
    asyncio.run(main())
