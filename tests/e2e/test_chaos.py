"""Chaos: two store servers on one PostgreSQL, three brains, two hands servers and many concurrent sessions of
multi-step turns, while every second a random brain, hands or store process is killed with SIGKILL and
restarted. At the end every session has completed, every log is linear with no gap or duplicate, every
message the test had acknowledged is there, and no tool call ran twice (each call appends its own id to a
file in its sandbox, and no id is there twice).

Sized by CHAOS_SESSIONS (default 200). Killing goes on while sessions are running, for at most CHAOS_KILL_SECONDS
(default 120); then the mesh must finish every session left on its own, all within CHAOS_DEADLINE seconds
(default 300). On two cores most of the CPU goes to restarting processes (a brain's imports alone cost about 2 s of
CPU), so how many sessions finish while the killing goes on depends on the machine; that none is left stuck does not.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import statistics
import time
from collections import Counter
from pathlib import Path

import pytest

from brain.client import BrainClient
from managed_agents import events
from managed_agents.mesh.errors import MeshError
from managed_agents.procs import ServiceProcess, stop_all
from managed_agents.standin.script import Script, step, text, tool
from managed_agents.standin.server import StandinServer
from managed_agents.v1 import events_pb2
from session_store.client import SessionStoreClient

SESSIONS = int(os.environ.get("CHAOS_SESSIONS", "200"))
KILL_SECONDS = float(os.environ.get("CHAOS_KILL_SECONDS", "120"))
DEADLINE = float(os.environ.get("CHAOS_DEADLINE", "300"))
# Brains renew every ttl/3. With 2 s, a store restart on a busy 2-core host outlasts a lease held by a live
# brain, and the re-adoptions that follow cascade (measured: 82 of 200 sessions done in 120 s of killing);
# with 4 s all 200 finish in 105 s, with 6 s in 65 s. The production default is 10 s.
LEASE_TTL = os.environ.get("CHAOS_LEASE_TTL", "6")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(DEADLINE + 180)]

SCRIPT = Script(
    latency_s=0.05,
    steps=(
        step(tool("bash", command="echo {tool_use_id} >> calls.txt; sleep 0.3")),
        step(tool("bash", command="echo {tool_use_id} >> calls.txt")),
        step(tool("bash", command="echo {tool_use_id} >> calls.txt; wc -l < calls.txt")),
        step(text("done: {last_tool_result}")),
    ),
)


def _turn_over(log: list[events_pb2.Event]) -> bool:
    return any(e.HasField("session_status_idle") for e in log)


async def test_chaos_loses_nothing_and_runs_no_tool_twice(
    tmp_path: Path, postgres_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    standin = await StandinServer.start(SCRIPT)
    stores = [
        ServiceProcess(
            "session_store", ["--store-url", postgres_url, "--log-level", "warning"], tmp_path / f"store{n}"
        ).start()
        for n in range(2)
    ]
    hands_roots = [tmp_path / f"sandboxes{n}" for n in range(2)]
    hands = [
        ServiceProcess("hands", ["--work-root", str(root), "--log-level", "warning"], tmp_path / f"hands{n}").start()
        for n, root in enumerate(hands_roots)
    ]
    store_targets = ",".join(s.address for s in stores)
    brain_env = {"ANTHROPIC_BASE_URL": standin.base_url, "ANTHROPIC_API_KEY": "chaos"}
    brains = [
        ServiceProcess(
            "brain",
            [
                "--store",
                store_targets,
                "--hands",
                ",".join(h.address for h in hands),
                "--lease-ttl",
                LEASE_TTL,
                "--scan-interval",
                "0.5",
                "--log-level",
                "warning",
            ],
            tmp_path / f"brain{n}",
            env=brain_env,
        ).start()
        for n in range(3)
    ]
    victims = [("store", p) for p in stores] + [("hands", p) for p in hands] + [("brain", p) for p in brains]
    kills: Counter[str] = Counter()
    kill_times: list[float] = []
    started = time.monotonic()
    try:
        async with SessionStoreClient.connect(store_targets) as store:
            sessions = []
            for n in range(SESSIONS):
                session = await store.create_session(title=f"chaos {n}")
                await store.emit(session.id, events.user_message(f"task {n}"), idempotency_key="task")
                sessions.append(session.id)

            async def wake(session_id: str) -> None:
                for _ in range(50):
                    brain = random.choice(brains)
                    try:
                        async with BrainClient.connect(brain.address) as client:
                            await client.wake(session_id)
                        return
                    except MeshError:
                        await asyncio.sleep(0.2)

            await asyncio.gather(*(wake(s) for s in sessions))

            restarting: set[int] = set()

            async def restart(index: int, victim: ServiceProcess) -> None:
                try:
                    await asyncio.to_thread(victim.restart)
                finally:
                    restarting.discard(index)

            async def chaos() -> None:
                restarts = []
                try:
                    while True:
                        await asyncio.sleep(1)
                        up = [i for i in range(len(victims)) if i not in restarting]
                        if not up:
                            continue  # every process is still coming back from its last kill
                        index = random.choice(up)
                        kind, victim = victims[index]
                        victim.kill()
                        kills[kind] += 1
                        kill_times.append(time.time())
                        restarting.add(index)
                        restarts.append(asyncio.create_task(restart(index, victim)))
                finally:
                    # Leave every process running for the final checks.
                    await asyncio.gather(*restarts, return_exceptions=True)

            monkey = asyncio.create_task(chaos())
            pending = set(sessions)
            done_under_fire = 0
            while pending and time.monotonic() - started < DEADLINE:
                await asyncio.sleep(3)
                if not monkey.done() and time.monotonic() - started > KILL_SECONDS:
                    # Killing stops here; every session must now finish on its own: none may be left stuck.
                    monkey.cancel()
                    with pytest.raises(asyncio.CancelledError):
                        await monkey
                    done_under_fire = SESSIONS - len(pending)
                for session_id in list(pending):
                    try:
                        _, log = await store.read_session(session_id)
                    except MeshError:
                        break
                    if _turn_over(log):
                        pending.discard(session_id)
            if not monkey.done():
                done_under_fire = SESSIONS - len(pending)
                monkey.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await monkey
            assert not pending, f"{len(pending)} of {SESSIONS} sessions did not complete within {DEADLINE:.0f} s"
            logs = {s: (await store.read_session(s))[1] for s in sessions}
    finally:
        await stop_all(*brains, *hands, *stores)
        await standin.aclose()

    gaps: list[float] = []
    total_events = 0
    interrupted_calls = 0
    for session_id, log in logs.items():
        total_events += len(log)
        assert [e.seq for e in log] == list(range(1, len(log) + 1)), f"{session_id}: the log is not linear"
        assert log[0].HasField("user_message") and log[0].producer == "", "the acknowledged message is first"
        idle = [e for e in log if e.HasField("session_status_idle")]
        errors = [e.session_error.message for e in log if e.HasField("session_error")]
        assert idle[-1].session_status_idle.stop_reason == events_pb2.STOP_REASON_END_TURN, (session_id, errors)
        uses = [e.agent_tool_use.id for e in log if e.HasField("agent_tool_use")]
        results = [e.agent_tool_result for e in log if e.HasField("agent_tool_result")]
        assert sorted(uses) == sorted(r.tool_use_id for r in results), f"{session_id}: one result per call"
        interrupted_calls += sum(1 for r in results if r.execution.interrupted)
        # No call ran twice: every id is in the sandbox's calls.txt at most once.
        for sandbox_id in {e.sandbox_provisioned.sandbox_id for e in log if e.HasField("sandbox_provisioned")}:
            found = [root / sandbox_id / "workspace" / "calls.txt" for root in hands_roots]
            calls = next((f.read_text().split() for f in found if f.exists()), [])
            assert len(calls) == len(set(calls)), f"{session_id}: a tool call ran twice in {sandbox_id}"
        times = [e.create_time.ToNanoseconds() / 1e9 for e in log]
        # A stall caused by a kill: a gap between two events of the session during which a process was killed.
        gaps += [b - a for a, b in itertools.pairwise(times) if any(a <= k <= b for k in kill_times)]
    with capsys.disabled():
        stalls = sorted(gaps)
        p50 = statistics.median(stalls) if stalls else 0.0
        p99 = stalls[min(len(stalls) - 1, int(len(stalls) * 0.99))] if stalls else 0.0
        print(  # noqa: T201  (the summary the issue asks CI to show)
            f"\nchaos summary: {SESSIONS} sessions ({done_under_fire} finished while processes were being killed), "
            f"{total_events} events, {sum(kills.values())} kills "
            f"({dict(kills)}), {interrupted_calls} tool calls cut off and reported, not re-run; "
            f"{len(stalls)} session steps stalled by a kill, recovery p50 {p50:.1f} s, p99 {p99:.1f} s; "
            f"{time.monotonic() - started:.0f} s in all"
        )
