"""Durability: kill -9 the store under load; every acknowledged event survives and nothing is half there."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from managed_agents import events
from managed_agents.mesh.errors import MeshError
from session_store.client import SessionStoreClient
from tests.helpers import ROOT, ServiceProcess

pytestmark = pytest.mark.slow

WRITERS = 8


async def test_kill_9_under_load_loses_no_acknowledged_event(store_process: ServiceProcess) -> None:
    store_process.start()
    acked: dict[int, list[int]] = {w: [] for w in range(WRITERS)}
    async with SessionStoreClient.connect(store_process.address) as store:
        sessions = [(await store.create_session(session_id=f"crash-{s}")).id for s in range(2)]

        async def writer(w: int) -> None:
            for i in range(100_000):
                try:
                    await store.emit(sessions[w % 2], events.user_message(f"w{w}-{i}"))
                except MeshError:
                    return
                acked[w].append(i)

        tasks = [asyncio.create_task(writer(w)) for w in range(WRITERS)]
        # Let the writers get well into the log, then crash the store in the middle of it.
        while sum(len(v) for v in acked.values()) < 400:
            await asyncio.sleep(0.01)
        store_process.kill()
        await asyncio.wait_for(asyncio.gather(*tasks), 30)

    store_process.start()
    async with SessionStoreClient.connect(store_process.address) as store:
        stored: dict[int, list[int]] = {w: [] for w in range(WRITERS)}
        last_seqs = {}
        for session_id in sessions:
            session, log = await store.read_session(session_id)
            last_seqs[session_id] = session.last_seq
            assert [e.seq for e in log] == list(range(1, session.last_seq + 1)), "seqs dense after restart"
            for event in log:
                match = re.fullmatch(r"w(\d+)-(\d+)", events.plain_text(event.user_message.content))
                assert match, f"event {event.seq} is not one a writer sent whole"
                stored[int(match[1])].append(int(match[2]))
        for w in range(WRITERS):
            assert stored[w][: len(acked[w])] == acked[w], f"writer {w} lost an acknowledged event"
            # At most the one append in flight at the kill may have committed without its acknowledgement.
            assert len(stored[w]) - len(acked[w]) in (0, 1)
            assert stored[w] == list(range(len(stored[w])))
        # The restarted store takes appends where the log left off.
        response = await store.emit(sessions[0], events.user_message("after restart"))
        assert response.event.seq == last_seqs[sessions[0]] + 1


async def test_sigterm_finishes_in_flight_appends_and_exits_cleanly(store_process: ServiceProcess) -> None:
    store_process.start()
    async with SessionStoreClient.connect(store_process.address) as store:
        session = await store.create_session()
        pending = [asyncio.create_task(store.emit(session.id, events.user_message(f"m{i}"))) for i in range(50)]
        await asyncio.sleep(0)
        results = await asyncio.gather(*pending, return_exceptions=True)
        code = await asyncio.to_thread(store_process.terminate)
    assert code == 0, store_process.log()
    acked = [r.event.seq for r in results if not isinstance(r, BaseException)]
    store_process.start()
    async with SessionStoreClient.connect(store_process.address) as store:
        after = (await store.get_session(session.id)).session
    assert after.last_seq >= len(acked) and set(acked) <= set(range(1, after.last_seq + 1))


def test_a_second_store_on_the_same_data_dir_refuses_to_start(tmp_path: Path) -> None:
    first = ServiceProcess("session_store", ["--data-dir", str(tmp_path / "shared")], tmp_path).start()
    try:
        started = time.monotonic()
        second = subprocess.run(
            [
                sys.executable,
                "-m",
                "session_store",
                "--listen",
                "127.0.0.1:0",
                "--data-dir",
                str(tmp_path / "shared"),
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert second.returncode == 2
        assert "in use by another session store process" in second.stderr
        assert "Traceback" not in second.stderr
        assert time.monotonic() - started < 20
    finally:
        first.stop()


def test_a_taken_port_is_a_clear_error(tmp_path: Path) -> None:
    first = ServiceProcess("session_store", ["--data-dir", str(tmp_path / "a")], tmp_path).start()
    try:
        second = subprocess.run(
            [
                sys.executable,
                "-m",
                "session_store",
                "--listen",
                first.address,
                "--data-dir",
                str(tmp_path / "b"),
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert second.returncode == 2
        assert f"cannot listen on {first.address}" in second.stderr
    finally:
        first.stop()
