"""Brain scaling: the same load driven by 1, 2 and 4 brain processes sharing one store and one hands server.

Each session is one turn of three model calls (two `bash` tool calls, then an answer) against a stand-in model
that takes `--model-latency` per answer. Sessions are woken round robin over the brains. Printed per brain
count: sessions/s and tool calls/s completed, turn latency (Wake to `session.status_idle`) p50/p99, and each
brain's peak RSS. The store (SQLite), hands (bwrap) and brains are their own processes; the stand-in and the
load generator run in this process.

    python bench/brain_scaling_bench.py [--sessions 200] [--brains 1,2,4] [--model-latency 0.05]
"""

from __future__ import annotations

import argparse
import asyncio
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


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def _turn(store: SessionStoreClient, brain: BrainClient, session_id: str) -> float:
    started = time.monotonic()
    await brain.wake(session_id)
    async for event in store.watch(session_id):
        if event.HasField("session_status_idle"):
            break
    return time.monotonic() - started


async def _run(
    store_address: str, hands_address: str, standin: StandinServer, work: Path, brains: int, sessions: int
) -> tuple[str, str]:
    processes = [
        ServiceProcess(
            "brain",
            ["--store", store_address, "--hands", hands_address, "--log-level", "warning"],
            work / f"brains-{brains}-{n}",
            env={"ANTHROPIC_BASE_URL": standin.base_url, "ANTHROPIC_API_KEY": "bench"},
        ).start()
        for n in range(brains)
    ]
    try:
        async with SessionStoreClient.connect(store_address) as store:
            clients = [BrainClient.connect(p.address) for p in processes]
            ids = []
            for n in range(sessions):
                session = await store.create_session(title=f"scaling {brains}/{n}")
                await store.emit(session.id, events.user_message(f"task {n}"))
                ids.append(session.id)
            peaks = [_rss_mib(p.pid) for p in processes]

            async def sample() -> None:
                while True:
                    for i, process in enumerate(processes):
                        peaks[i] = max(peaks[i], _rss_mib(process.pid))
                    await asyncio.sleep(0.2)

            sampler = asyncio.create_task(sample())
            started = time.monotonic()
            latencies = await asyncio.gather(*(_turn(store, clients[i % brains], s) for i, s in enumerate(ids)))
            elapsed = time.monotonic() - started
            sampler.cancel()
            tool_calls = 0
            for session_id in ids:
                _, log = await store.read_session(session_id)
                tool_calls += sum(1 for e in log if e.HasField("agent_tool_result"))
            for client in clients:
                await client.aclose()
    finally:
        for process in processes:
            process.stop()
    return (
        f"{brains} brain{'s' if brains > 1 else ''}",
        f"{sessions / elapsed:6.1f} sessions/s  {tool_calls / elapsed:6.1f} tool calls/s  turn p50 "
        f"{percentile(latencies, 50):5.2f} s p99 {percentile(latencies, 99):5.2f} s  RSS "
        + "/".join(f"{p:.0f}" for p in peaks)
        + " MiB",
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=200, help="sessions per run (default 200)")
    parser.add_argument("--brains", default="1,2,4", help="brain counts to run (default 1,2,4)")
    parser.add_argument("--model-latency", type=float, default=0.05, help="seconds per stand-in answer")
    args = parser.parse_args()
    script = Script(
        steps=(step(tool("bash", command="true")), step(tool("bash", command="echo hi")), step(text("done"))),
        latency_s=args.model_latency,
    )
    standin = await StandinServer.start(script)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        store = ServiceProcess("session_store", ["--data-dir", str(work / "store"), "--log-level", "warning"], work)
        hands = ServiceProcess("hands", ["--work-root", str(work / "sandboxes"), "--log-level", "warning"], work)
        store.start()
        hands.start()
        try:
            rows = []
            for count in (int(n) for n in args.brains.split(",")):
                rows.append(await _run(store.address, hands.address, standin, work, count, args.sessions))
                print(*rows[-1], flush=True)
            table(
                f"{args.sessions} sessions x (2 tool calls + 3 model calls of {args.model_latency * 1e3:.0f} ms), "
                "one store, one hands",
                rows,
            )
        finally:
            hands.stop()
            store.stop()
            await standin.aclose()


if __name__ == "__main__":
    asyncio.run(main())
