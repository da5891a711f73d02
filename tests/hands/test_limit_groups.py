"""Limit groups on the real host cgroups: a hands server killed with SIGKILL cannot remove its sandboxes' groups,
and the kernel keeps empty groups forever, so the next server on the same work root removes them."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest

from hands.backend import Enforcement, Limits
from hands.client import HandsClient
from hands.limits import CGROUP_ROOT, GROUP, LimitGroups, scope_of
from managed_agents.procs import ServiceProcess, stop_all
from tests.hands.test_tools import run


@pytest.fixture
def groups_of() -> LimitGroups:
    probe = LimitGroups.detect(scope="probe")
    if probe.mode is Enforcement.RLIMIT:
        pytest.skip("this host gives no cgroups to sandboxes (limits are rlimits), so there are no groups to leak")
    return probe


def _flat_group(mode: Enforcement, name: str) -> list[Path]:
    """`managed-agents/<name>` in each hierarchy: a scope, or a sandbox's group in the earlier flat layout."""
    if mode is Enforcement.CGROUP_V2:
        return [CGROUP_ROOT / GROUP / name]
    return [CGROUP_ROOT / c / GROUP / name for c in ("memory", "pids", "cpu")]


async def _emptied(groups: LimitGroups, *sandbox_ids: str) -> None:
    """Waits until the killed server's sandboxes have died (bwrap dies with its parent, a little later)."""
    for _ in range(250):
        if all(not groups.pids(s) for s in sandbox_ids):
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the sandboxes of a killed server are still running")


async def test_a_killed_servers_empty_groups_are_removed_by_the_next_one(
    tmp_path: Path, groups_of: LimitGroups
) -> None:
    work_root = tmp_path / "sandboxes"
    groups = LimitGroups(groups_of.mode, scope=scope_of(work_root))
    elsewhere = LimitGroups(groups_of.mode, scope=scope_of(tmp_path / "another-server"))
    limits = Limits(memory_bytes=64 << 20, max_processes=16, cpu_millis=500)
    flat = _flat_group(groups.mode, "sbx_left_by_an_older_version")
    hands = ServiceProcess("hands", ["--work-root", str(work_root)], tmp_path / "h").start()
    try:
        async with HandsClient.connect(hands.address) as client:
            kept = (await client.provision()).id
            gone = (await client.provision()).id
        assert groups.exists(kept) and groups.exists(gone)
        hands.kill()
        await _emptied(groups, kept, gone)
        shutil.rmtree(work_root / gone)  # its directory went too: no server will adopt it
        elsewhere.create("sbx_of_another_server", limits)  # empty (its shell not started yet) but not ours
        for group in flat:
            group.mkdir()
        retired = LimitGroups(groups.mode, scope=scope_of(tmp_path / "retired-server"))
        retired.create("sbx_destroyed", limits)
        retired.remove("sbx_destroyed")
        assert all(p.exists() for p in _flat_group(groups.mode, retired.scope))

        hands.restart()
        assert not groups.exists(gone), "the group of a sandbox nobody adopts is removed"
        assert not any(g.exists() for g in flat), "an empty group of the earlier flat layout is removed"
        assert elsewhere.exists("sbx_of_another_server"), "another server's groups are not touched"
        assert not any(p.exists() for p in _flat_group(groups.mode, retired.scope)), "an empty scope is removed"
        assert groups.exists(kept), "the adopted sandbox has its group"
        async with HandsClient.connect(hands.address) as client:
            result = await run(client, kept, command="echo still limited")
        assert (result.is_error, result.output) == (False, "still limited\n")
        assert groups.pids(kept), "the adopted sandbox's new shell runs inside its group"
    finally:
        await stop_all(hands)
        elsewhere.remove("sbx_of_another_server")
        for group in flat:
            if group.exists():
                group.rmdir()
