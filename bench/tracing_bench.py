"""What tracing costs: the same turns with tracing off and on, and how many spans and events a turn makes.

Store, hands and brain run as their own processes, twice: without `OTEL_EXPORTER_OTLP_ENDPOINT` (no
instrumentation at all), then with it pointing at an OTLP collector (a real OTLP/gRPC TraceService in this
process, the one the tests use). Each turn is three model calls (two `bash` tool calls, then an answer)
against a stand-in model that answers at once, so the harness's own cost dominates.

    python bench/tracing_bench.py [--turns 40]
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

from bench.common import percentile, table
from brain.client import BrainClient
from managed_agents import events
from managed_agents.procs import ServiceProcess
from managed_agents.standin.script import Script, step, text, tool
from managed_agents.standin.server import StandinServer
from session_store.client import SessionStoreClient
from tests.e2e.collector import Collector


async def _turns(work: Path, standin: StandinServer, env: dict[str, str], turns: int) -> tuple[list[float], int]:
    """Latencies of `turns` sequential turns, and the events they wrote."""
    store = ServiceProcess(
        "session_store", ["--data-dir", str(work / "store"), "--log-level", "warning"], work, env=env
    )
    hands = ServiceProcess("hands", ["--work-root", str(work / "sb"), "--log-level", "warning"], work, env=env)
    store.start()
    hands.start()
    brain = ServiceProcess(
        "brain",
        ["--store", store.address, "--hands", hands.address, "--log-level", "warning"],
        work,
        env={**env, "ANTHROPIC_BASE_URL": standin.base_url, "ANTHROPIC_API_KEY": "bench"},
    ).start()
    latencies, written = [], 0
    try:
        async with SessionStoreClient.connect(store.address) as client, BrainClient.connect(brain.address) as wake:
            for n in range(turns + 3):  # the first three warm the processes up and are not counted
                session = await client.create_session()
                await client.emit(session.id, events.user_message(f"turn {n}"))
                started = time.monotonic()
                await wake.wake(session.id)
                async for event in client.watch(session.id):
                    if event.HasField("session_status_idle"):
                        break
                if n >= 3:
                    latencies.append(time.monotonic() - started)
                    written += (await client.get_session(session.id)).session.last_seq
        if env:
            await asyncio.sleep(6)  # the batch span processors export every 5 s; let them before stopping
    finally:
        brain.stop()
        hands.stop()
        store.stop()
    return latencies, written


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--turns", type=int, default=40, help="measured turns per mode")
    args = parser.parse_args()
    script = Script(
        steps=(step(tool("bash", command="true")), step(tool("bash", command="echo hi")), step(text("done")))
    )
    standin = await StandinServer.start(script)
    collector = Collector()
    await collector.start()
    traced_env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint,
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
    }
    try:
        with tempfile.TemporaryDirectory() as tmp:
            off, events_off = await _turns(Path(tmp) / "off", standin, {}, args.turns)
            before = len(collector.spans)
            on, events_on = await _turns(Path(tmp) / "on", standin, traced_env, args.turns)
            turns_traced = args.turns + 3
            spans = (len(collector.spans) - before) / turns_traced
            by_service: dict[str, int] = {}
            for span in collector.spans[before:]:
                by_service[span.service] = by_service.get(span.service, 0) + 1
    finally:
        await collector.stop()
        await standin.aclose()
    overhead = statistics.median(on) / statistics.median(off) - 1
    table(
        f"{args.turns} turns of 3 model calls and 2 bash calls each (stand-in model answering at once)",
        [
            ("tracing off", f"turn p50 {percentile(off, 50) * 1e3:6.1f} ms  p99 {percentile(off, 99) * 1e3:6.1f} ms"),
            (
                "tracing on (OTLP)",
                f"turn p50 {percentile(on, 50) * 1e3:6.1f} ms  p99 {percentile(on, 99) * 1e3:6.1f} ms",
            ),
            ("overhead (median)", f"{overhead * 100:+.1f} %"),
            ("events per turn", f"{events_off / args.turns:.1f} (off)  {events_on / args.turns:.1f} (on)"),
            (
                "spans per turn",
                f"{spans:.1f}: " + ", ".join(f"{k} {v / turns_traced:.1f}" for k, v in sorted(by_service.items())),
            ),
        ],
    )


if __name__ == "__main__":
    asyncio.run(main())
