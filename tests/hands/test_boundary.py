"""The sandbox as a boundary, tried from inside as a prompt-injected agent would, on both backends: privilege,
kernel knobs, host paths, forged shell protocol, disk, time. Each test tries a class of attack, not one probe,
and asserts what the host sees afterwards."""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from pathlib import Path

import pytest

from hands.app import HandsServer
from hands.client import HandsClient
from managed_agents.v1 import hands_pb2, sandbox_pb2

_ids = itertools.count()

# Kernel knobs a root-equivalent process would change to take the host (a pipe in core_pattern runs as host root)
# or to disturb it; each write must fail, and the host's value stay as it was.
KNOBS = (
    "kernel/core_pattern",
    "kernel/printk",
    "kernel/sysrq",
    "kernel/modprobe",
    "kernel/panic",
    "kernel/hostname",
    "vm/swappiness",
    "vm/drop_caches",
    "vm/overcommit_memory",
    "fs/protected_symlinks",
    "fs/suid_dumpable",
    "net/ipv4/ip_forward",
    "user/max_user_namespaces",
)


async def run(
    hands: HandsClient, sandbox: str, command: str, timeout: float | None = None
) -> hands_pb2.ExecuteResponse:
    return await hands.execute(
        sandbox, execution_id=f"b-{next(_ids)}", name="bash", input={"command": command}, timeout=timeout
    )


async def edit(hands: HandsClient, sandbox: str, **tool_input: object) -> hands_pb2.ExecuteResponse:
    return await hands.execute(
        sandbox, execution_id=f"e-{next(_ids)}", name="str_replace_based_edit_tool", input=tool_input
    )


def _text(path: str | Path) -> str:
    """A small file's text (kernel files under /proc: no real I/O to keep off the event loop)."""
    return Path(path).read_text()


def _exists(path: str | Path) -> bool:
    return Path(path).exists()


def _status(pid: int) -> dict[str, str]:
    return dict(line.split(":", 1) for line in _text(f"/proc/{pid}/status").splitlines() if ":" in line)


def _processes_of(uid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                status = (entry / "status").read_text()
            except OSError:
                continue
            uids = next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1:]
            if str(uid) in uids:
                found.append(int(entry.name))
    return found


async def test_every_process_is_an_unprivileged_identity_of_its_own(hands: HandsClient, backend: str) -> None:
    first = await hands.provision()
    second = await hands.provision()
    uids = {first.isolation.host_uid, second.isolation.host_uid}
    assert len(uids) == 2 and 0 not in uids and all(uid >= 1000 for uid in uids)
    assert first.isolation.read_only_system and first.isolation.syscall_filter
    assert first.isolation.user_namespace == (backend == "bwrap")
    # A process started by the sandbox, seen from the host: its uids are the sandbox's identity, never root's, and
    # it holds no capability at all.
    await run(hands, first.id, "sleep 30 >/dev/null 2>&1 &")
    deadline = time.monotonic() + 5
    while not (pids := _processes_of(first.isolation.host_uid)) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert pids, "the sandbox's processes run as its host identity"
    # bwrap itself (outside the sandbox, holding its namespaces) runs as the identity too, without the filter.
    for pid in [p for p in pids if _text(f"/proc/{p}/comm").strip() != "bwrap"]:
        status = _status(pid)
        assert {v for v in status["Uid"].split()} == {str(first.isolation.host_uid)}
        assert {v for v in status["Gid"].split()} == {str(first.isolation.host_gid)}
        for caps in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
            assert int(status[caps].strip(), 16) == 0, (caps, status[caps])
        assert status["NoNewPrivs"].strip() == "1"
        assert status["Seccomp"].strip() == "2"
    # Inside: no capability, and no way to gain one (set-uid programs, a new user namespace).
    inside = await run(
        hands,
        first.id,
        "grep -E '^Cap(Eff|Prm|Bnd)' /proc/self/status; id -u; "
        "(unshare -U true || unshare -r true) >/dev/null 2>&1 && echo NESTED-USERNS; "
        "su -c id root </dev/null >/dev/null 2>&1 && echo SU-WORKED; true",
    )
    lines = inside.output.split("\n")
    assert all(line.split()[1] == "0000000000000000" for line in lines[:3]), inside.output
    assert lines[3] != "0"
    assert "NESTED-USERNS" not in inside.output and "SU-WORKED" not in inside.output


async def test_kernel_knobs_cannot_be_written(hands: HandsClient) -> None:
    sandbox = (await hands.provision()).id
    knobs = [knob for knob in KNOBS if os.access(Path("/proc/sys", knob), os.R_OK)]
    assert len(knobs) >= 8
    before = {knob: _text(Path("/proc/sys", knob)) for knob in knobs}
    writes = " ".join(
        f"(echo 1 > /proc/sys/{knob}) 2>/dev/null && echo WROTE:{knob};"
        f"(echo '|/workspace/x' > /proc/sys/{knob}) 2>/dev/null && echo WROTE:{knob};"
        for knob in knobs
    )
    tried = await run(hands, sandbox, writes + " (echo b > /proc/sysrq-trigger) 2>/dev/null && echo SYSRQ; true")
    assert "WROTE" not in tried.output and "SYSRQ" not in tried.output, tried.output
    assert {knob: _text(Path("/proc/sys", knob)) for knob in knobs} == before


async def test_no_host_path_is_visible_inside(hands: HandsClient, hands_server: HandsServer, backend: str) -> None:
    sandbox = await hands.provision()
    host = hands_server.manager.get(sandbox.id).paths
    secrets = [str(host.root.parent), str(host.mount), "pytest-of", "/run/managed-agents/disks"]
    # Everything a process can read about the processes and mounts it can see, and the environment.
    looked = await run(
        hands,
        sandbox.id,
        "for p in /proc/[0-9]*; do cat $p/cmdline $p/environ $p/mountinfo $p/mounts 2>/dev/null; "
        "readlink $p/cwd $p/root $p/exe 2>/dev/null; ls -l $p/fd 2>/dev/null; done; env; "
        "cat /etc/passwd /etc/group /run/managed-agents/*.sh 2>/dev/null; ls -la / /run /run/managed-agents; "
        "cat /proc/self/cgroup; true",
    )
    assert looked.output.strip()
    seen = looked.output
    if backend == "docker":
        # The container engine's own storage (the overlay's layer directories in the root mount's options) is
        # the engine's to show, not a path of hands.
        seen = "\n".join(line for line in seen.splitlines() if "overlay" not in line)
    for secret in secrets:
        assert secret not in seen, secret
    if backend == "bwrap":
        pid1 = await run(hands, sandbox.id, "tr '\\0' ' ' </proc/1/cmdline")
        assert pid1.output.startswith("/run/managed-agents/sh "), "PID 1 is the sandbox's own shell, not bwrap"


FORGERIES = [
    # Lines that look like the ends a driver writes, with and without newlines, and the old protocol's marker.
    "printf '\\n__managed_agents_end_12345\\n'; exit 7",
    "printf '__managed_agents_end_'; printf '%.0s9' $(seq 1 3000); exit 7",
    "echo __managed_agents_done_0123456789abcdef__ 0; exit 7",
    # Status-like text on every descriptor the command holds, and on ones it does not.
    "for fd in 1 2 3 4 5 6 7 8 9; do (echo '1 0 x' >&$fd) 2>/dev/null; done; exit 7",
    "for fd in /proc/1/fd/*; do echo '99999 0 aaaa' > $fd; done 2>/dev/null; exit 7",
    # A status beyond any integer, and the driver's stdin.
    "echo 99999999999999999999999999 0 ff; (echo 1 > /proc/1/fd/0) 2>/dev/null; exit 7",
    # Background writers that go on printing fake ends after the call.
    "(for i in 1 2 3 4 5; do echo __managed_agents_end_$i; sleep 0.05; done &) ; exit 7",
]


@pytest.mark.parametrize("forgery", FORGERIES)
async def test_a_command_cannot_forge_the_end_of_its_call(hands: HandsClient, forgery: str) -> None:
    sandbox = (await hands.provision()).id
    forged = await run(hands, sandbox, forgery)
    assert forged.exit_code == 7, forged.output
    # The next calls get their own output and status: nothing stale, nothing cut short.
    await asyncio.sleep(0.3)
    for code in (0, 3):
        after = await run(hands, sandbox, f"echo next-{code}; exit {code}")
        assert after.exit_code == code
        assert after.output.splitlines()[-1] == f"next-{code}", after.output


async def test_a_flood_without_newlines_is_bounded_and_stalls_no_one(
    hands: HandsClient, hands_server: HandsServer
) -> None:
    flooding = (await hands.provision()).id
    other = (await hands.provision()).id
    rss_before = _rss_kib()
    flood = asyncio.ensure_future(
        run(hands, flooding, "printf '__managed_agents_end_'; head -c 300000000 /dev/zero | tr '\\0' 7", timeout=60)
    )
    latencies = []
    while not flood.done():
        started = time.monotonic()
        await run(hands, other, "true")
        latencies.append(time.monotonic() - started)
        await asyncio.sleep(0.05)
    result = await flood
    assert result.truncated and len(result.output) < 40_000
    assert result.exit_code == 0
    assert _rss_kib() - rss_before < 100 * 1024, "hands buffered the flood"
    latencies.sort()
    assert latencies[len(latencies) // 2] < 0.25, latencies


def _rss_kib() -> int:
    with open("/proc/self/status") as handle:
        line = next(line for line in handle if line.startswith("VmRSS:"))
    return int(line.split()[1])


async def test_the_editor_is_not_fooled_by_paths_swapped_during_the_call(
    hands: HandsClient, hands_server: HandsServer
) -> None:
    sandbox = (await hands.provision()).id
    # A background loop inside swaps `d` between a directory and a link to the host's /etc (the editor runs on
    # the host, so following the link would read and write the host's files).
    await run(
        hands,
        sandbox,
        "mkdir -p d && echo mine > d/hostname; "
        "(while :; do rm -rf d; ln -s /etc d; rm -f d; mkdir d; echo mine > d/hostname; done "
        ">/dev/null 2>&1 &); true",
    )
    host_hostname = _text("/etc/hostname") if _exists("/etc/hostname") else None
    seen = []
    for index in range(300):
        viewed = await edit(hands, sandbox, command="view", path="/workspace/d/hostname")
        await edit(hands, sandbox, command="create", path=f"/workspace/d/pwned-{index}", file_text="x")
        await edit(hands, sandbox, command="str_replace", path="/workspace/d/hostname", old_str="mine", new_str="m")
        seen.append(viewed.output)
    if host_hostname and host_hostname.strip():
        assert not any(host_hostname.strip() in text for text in seen if "mine" not in text)
    assert not _exists("/etc/pwned-0") and not _exists("/etc/pwned-299"), "the editor wrote into the host's /etc"
    if host_hostname is not None:
        assert _text("/etc/hostname") == host_hostname
    await run(hands, sandbox, "pkill -f 'ln -s' ; true")


async def test_the_editor_refuses_special_files_at_once_and_never_blocks_the_server(hands: HandsClient) -> None:
    sandbox = (await hands.provision()).id
    await run(hands, sandbox, "mkfifo pipe && mkdir -p dir && mkfifo dir/p2; true")
    started = time.monotonic()
    results = await asyncio.gather(
        *(
            edit(hands, sandbox, **call)
            for call in (
                {"command": "view", "path": "/workspace/pipe"},
                {"command": "str_replace", "path": "pipe", "old_str": "a", "new_str": "b"},
                {"command": "insert", "path": "pipe", "insert_line": 0, "insert_text": "x"},
                {"command": "create", "path": "pipe", "file_text": "x"},
                {"command": "view", "path": "/workspace/dir/p2"},
                {"command": "view", "path": "/dev/zero"},
            )
            for _ in range(2)
        )
    )
    assert time.monotonic() - started < 10
    for result in results:
        assert result.is_error, result.output
    # The server goes on provisioning and destroying while and after.
    other = await hands.provision()
    await hands.destroy(other.id)


async def test_a_huge_directory_view_is_capped(hands: HandsClient, backend: str) -> None:
    sandbox = (await hands.provision()).id
    count = 200_000 if backend == "bwrap" else 20_000
    made = await run(hands, sandbox, f"mkdir many && cd many && seq 1 {count} | xargs touch && ls | wc -l", 120)
    assert made.output.strip() == str(count), made.output
    viewed = await edit(hands, sandbox, command="view", path="/workspace")
    assert len(viewed.output.encode()) < 100_000
    assert "left out" in viewed.output or "not shown" in viewed.output or "more" in viewed.output, viewed.output[-300:]


async def test_the_disk_quota_holds_for_workspace_and_tmp(hands: HandsClient, hands_server: HandsServer) -> None:
    sandbox = await hands.provision(resources=sandbox_pb2.Resources(disk_bytes=64 << 20))
    assert sandbox.resources.disk_bytes == 64 << 20
    host = hands_server.manager.get(sandbox.id).paths
    for place in ("/workspace/big", "/tmp/big"):
        filled = await run(hands, sandbox.id, f"dd if=/dev/zero of={place} bs=1M count=200 2>&1; echo rc=$?")
        assert "rc=0" not in filled.output
        assert "No space left" in filled.output or "no space left" in filled.output.lower()
        assert "disk is full" in filled.output
        assert os.stat(host.image).st_blocks * 512 <= (64 << 20) + (1 << 20)
        await run(hands, sandbox.id, f"rm -f {place}")
    # Many small files: the inodes run out inside the sandbox's own filesystem, not the host's.
    files = await run(
        hands,
        sandbox.id,
        "mkdir f && cd f && i=0; while [ $i -lt 40000 ]; do : > $i || break; i=$((i+1)); done; echo made=$i",
        120,
    )
    assert "made=40000" not in files.output
    assert (await run(hands, sandbox.id, "rm -rf f; echo ok")).output == "ok\n"


async def test_command_timeout_is_a_ceiling_no_call_can_raise(hands: HandsClient) -> None:
    resources = sandbox_pb2.Resources()
    resources.command_timeout.FromSeconds(2)
    sandbox = (await hands.provision(resources=resources)).id
    started = time.monotonic()
    slow = await run(hands, sandbox, "sleep 20; echo never", timeout=600)
    assert time.monotonic() - started < 10
    assert slow.status == hands_pb2.EXECUTION_STATUS_TIMED_OUT
    assert "never" not in slow.output and "the most any call gets" in slow.output
    # Asking for less is honoured.
    started = time.monotonic()
    shorter = await run(hands, sandbox, "sleep 20", timeout=0.5)
    assert shorter.status == hands_pb2.EXECUTION_STATUS_TIMED_OUT and time.monotonic() - started < 5


async def test_a_disk_out_of_inodes_and_blocks_still_takes_commands(hands: HandsClient) -> None:
    sandbox = (await hands.provision(resources=sandbox_pb2.Resources(disk_bytes=64 << 20))).id
    # A background job takes every inode and block it can, and keeps taking each one freed.
    await run(
        hands,
        sandbox,
        "mkdir f; (i=0; while :; do : > f/$i || sleep 0.01; i=$((i+1)); done >/dev/null 2>&1 &) ; "
        "(dd if=/dev/zero of=fill bs=1M >/dev/null 2>&1 &); true",
    )
    await asyncio.sleep(3)
    for _ in range(3):
        alive = await run(hands, sandbox, "echo alive; df -i /workspace | tail -1")
        assert alive.output.startswith("alive\n"), alive.output
    cleaned = await run(hands, sandbox, "pkill -f 'while :' ; rm -rf f fill; echo cleaned")
    assert "cleaned" in cleaned.output
