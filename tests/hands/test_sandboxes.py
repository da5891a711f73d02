"""Sandboxes as cattle, on both backends: isolation, limits, loss detection, idempotent calls, reaping,
and restarts of hands."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import pytest
from google.protobuf import duration_pb2

from hands.app import HandsServer
from hands.client import HandsClient
from managed_agents.mesh.errors import InvalidArgument, SandboxNotFound, SandboxUnavailable
from managed_agents.procs import ServiceProcess
from managed_agents.v1 import hands_pb2, sandbox_pb2
from tests.hands.conftest import KillSandbox
from tests.hands.test_tools import run

CGROUP_MODES = (
    sandbox_pb2.LIMIT_ENFORCEMENT_CGROUP_V1,
    sandbox_pb2.LIMIT_ENFORCEMENT_CGROUP_V2,
    sandbox_pb2.LIMIT_ENFORCEMENT_RLIMIT,
)


async def test_provision_reports_the_limits_and_how_they_are_enforced(hands: HandsClient, backend: str) -> None:
    resources = sandbox_pb2.Resources(memory_bytes=256 << 20, max_processes=64, cpu_millis=500)
    sandbox = await hands.provision(resources=resources, session_id="sess-1")
    assert sandbox.id.startswith("sbx_") and sandbox.state == sandbox_pb2.SANDBOX_STATE_READY
    assert sandbox.backend == backend and sandbox.session_id == "sess-1"
    if backend == "docker":
        assert sandbox.enforcement == sandbox_pb2.LIMIT_ENFORCEMENT_CONTAINER
    else:
        assert sandbox.enforcement in CGROUP_MODES
    assert (sandbox.resources.memory_bytes, sandbox.resources.max_processes) == (256 << 20, 64)
    again = await hands.get_sandbox(sandbox.id)
    assert again.id == sandbox.id and again.hands_instance


async def test_provision_is_idempotent_on_its_request_id(hands: HandsClient) -> None:
    first, second = await asyncio.gather(hands.provision(request_id="req-1"), hands.provision(request_id="req-1"))
    third = await hands.provision(request_id="req-2")
    assert first.id == second.id != third.id


async def test_a_repeated_execution_id_never_runs_the_command_twice(hands: HandsClient) -> None:
    sandbox = (await hands.provision()).id
    command = {"command": "sleep 0.5; echo line >> count.txt; wc -l < count.txt"}
    first, concurrent = await asyncio.gather(
        hands.execute(sandbox, execution_id="toolu_1", name="bash", input=command),
        hands.execute(sandbox, execution_id="toolu_1", name="bash", input=command),
    )
    later = await hands.execute(sandbox, execution_id="toolu_1", name="bash", input=command)
    assert first.output.strip() == concurrent.output.strip() == later.output.strip() == "1"
    assert sorted([first.replayed, concurrent.replayed]) == [False, True] and later.replayed
    assert (await run(hands, sandbox, command="cat count.txt")).output == "line\n"


async def test_a_sandbox_killed_from_outside_is_lost(hands: HandsClient, kill_sandbox: KillSandbox) -> None:
    sandbox = (await hands.provision()).id
    assert (await run(hands, sandbox, command="echo hi")).output == "hi\n"
    await kill_sandbox(sandbox)
    result = await run(hands, sandbox, command="echo after")
    assert result.is_error and result.sandbox_lost
    assert "gone" in result.output or "died" in result.output
    lost = await hands.get_sandbox(sandbox)
    assert lost.state == sandbox_pb2.SANDBOX_STATE_LOST and lost.lost_reason
    fresh = await hands.provision()
    assert (await run(hands, fresh.id, command="echo new")).output == "new\n"


async def test_a_sandbox_killed_mid_call_returns_an_interrupted_error(
    hands: HandsClient, kill_sandbox: KillSandbox
) -> None:
    sandbox = (await hands.provision()).id
    call = asyncio.create_task(run(hands, sandbox, command="echo begun; sleep 30"))
    await asyncio.sleep(0.5)
    await kill_sandbox(sandbox)
    result = await asyncio.wait_for(call, 10)
    assert result.status == hands_pb2.EXECUTION_STATUS_INTERRUPTED and result.sandbox_lost and result.is_error
    assert "outcome is unknown" in result.output


async def test_no_network_not_even_the_hosts_loopback(hands_server: HandsServer, hands: HandsClient) -> None:
    sandbox = (await hands.provision()).id
    port = hands_server.address.rsplit(":", 1)[1]
    # python3 where the sandbox has it (bwrap shares the host's /usr), busybox nc in the test image.
    connect = (
        'if command -v python3 >/dev/null; then python3 -c "import socket; '
        "socket.create_connection(('{host}', {port}), 2)\" 2>&1 | tail -1; "
        "else nc -w 2 {host} {port} </dev/null 2>&1; fi"
    )
    probe = "; ".join(
        [
            connect.format(host="127.0.0.1", port=port),
            connect.format(host="1.1.1.1", port=53),
            "cat /proc/net/dev | tail -n +3 | cut -d: -f1",
        ]
    )
    result = await run(hands, sandbox, command=probe)
    lines = [line.strip() for line in result.output.splitlines()]
    assert "refused" in lines[0].lower(), "the hands port is not reachable from inside"
    assert "unreachable" in lines[1].lower()
    assert lines[2:] == ["lo"], "no interface but the sandbox's own loopback"


async def test_the_host_environment_and_files_are_invisible(
    hands: HandsClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MA_TEST_SECRET", "hunter2")
    secret_file = tmp_path / "secret.txt"
    secret_file.write_text("hunter2")
    sandbox = (await hands.provision()).id
    result = await run(hands, sandbox, command=f"env; ls /root 2>&1; cat {secret_file} 2>&1; cat /etc/shadow 2>&1")
    assert "hunter2" not in result.output and "MA_TEST_SECRET" not in result.output
    assert "No such file" in result.output


async def test_memory_limit_holds(hands: HandsClient, backend: str) -> None:
    sandbox = (await hands.provision(resources=sandbox_pb2.Resources(memory_bytes=128 << 20))).id
    # Every page is written, so the 2 GiB are really used (an untouched allocation costs no memory); busybox
    # `sort` holds its whole input in memory.
    allocate = "b = bytearray(2 * 1024**3)\nfor i in range(0, len(b), 4096): b[i] = 1\nprint('allocated', len(b))"
    command = (
        f'if command -v python3 >/dev/null; then python3 -c "{allocate}"; '
        "else head -c 2147483648 /dev/zero | sort >/dev/null && echo allocated 2147483648; fi"
    )
    result = await run(hands, sandbox, timeout=60, command=command)
    assert "allocated 2147483648" not in result.output and result.is_error
    if backend == "bwrap":  # cgroup counters say which limit killed it; the engine API does not
        assert "MemoryError" in result.output or "memory limit" in result.output
    assert (await run(hands, sandbox, command="echo still here")).output == "still here\n"


async def test_a_fork_bomb_is_contained(hands: HandsClient, backend: str) -> None:
    sandbox = (await hands.provision(resources=sandbox_pb2.Resources(max_processes=64))).id
    bomb = await run(hands, sandbox, timeout=3, command="bomb() { bomb | bomb & }; bomb; sleep 2; echo survived")
    if backend == "bwrap":
        assert "reached its limit of 64 processes" in bomb.output
    # The bomb keeps running in the background, held at 64 processes; restarting the shell ends it all.
    assert (await run(hands, sandbox, restart=True)).output == "The shell was restarted."
    assert (await run(hands, sandbox, timeout=10, command="sleep 0.2; echo ok")).output == "ok\n"
    assert (await run(hands, (await hands.provision()).id, command="echo other")).output == "other\n"


async def test_twenty_sandboxes_at_once(hands: HandsClient) -> None:
    sandboxes = await asyncio.gather(*(hands.provision() for _ in range(20)))
    results = await asyncio.gather(
        *(run(hands, s.id, command=f"echo {n} > n.txt; sleep 0.2; cat n.txt") for n, s in enumerate(sandboxes))
    )
    assert [r.output for r in results] == [f"{n}\n" for n in range(20)]
    assert len({s.id for s in sandboxes}) == 20


async def test_destroy_removes_every_trace(
    hands_server: HandsServer, hands: HandsClient, backend: str, request: pytest.FixtureRequest
) -> None:
    sandbox = (await hands.provision()).id
    await run(hands, sandbox, command="sleep 300 & echo data > file.txt")
    root = hands_server.manager.get(sandbox).paths.root
    assert root.exists()
    destroyed = await hands.destroy(sandbox)
    assert destroyed.state == sandbox_pb2.SANDBOX_STATE_DESTROYED
    assert not root.exists()
    if backend == "bwrap":
        assert subprocess.run(["pgrep", "-f", sandbox], capture_output=True).returncode == 1, "no process left"
    else:
        import docker

        client = docker.DockerClient(base_url=request.getfixturevalue("container_engine"))
        assert not client.containers.list(all=True, filters={"name": sandbox}), "the container is gone"
        client.close()
    assert (await hands.destroy(sandbox)).state == sandbox_pb2.SANDBOX_STATE_DESTROYED
    gone = await run(hands, sandbox, command="echo x")
    assert gone.is_error and gone.sandbox_lost


async def test_idle_sandboxes_are_reaped(hands: HandsClient) -> None:
    resources = sandbox_pb2.Resources(idle_ttl=duration_pb2.Duration(seconds=1))
    sandbox = (await hands.provision(resources=resources)).id
    for _ in range(60):
        if (await hands.get_sandbox(sandbox)).state == sandbox_pb2.SANDBOX_STATE_DESTROYED:
            break
        await asyncio.sleep(0.1)
    assert (await hands.get_sandbox(sandbox)).state == sandbox_pb2.SANDBOX_STATE_DESTROYED


async def test_bad_requests_are_invalid_argument_or_not_found(hands: HandsClient, backend: str) -> None:
    with pytest.raises(SandboxNotFound):
        await hands.execute("sbx_nope", execution_id="e", name="bash", input={"command": "ls"})
    sandbox = (await hands.provision()).id
    with pytest.raises(InvalidArgument, match="execution_id"):
        await hands.execute(sandbox, execution_id="has spaces", name="bash", input={"command": "ls"})
    with pytest.raises(InvalidArgument, match="input"):
        await hands.execute(sandbox, execution_id="e1", name="bash", input={"command": "x" * (1 << 20)})
    with pytest.raises(InvalidArgument, match="memory_bytes"):
        await hands.provision(resources=sandbox_pb2.Resources(memory_bytes=1024))
    with pytest.raises(InvalidArgument, match="repositories"):
        await hands.provision(resources=sandbox_pb2.Resources(repositories=[sandbox_pb2.Repository(url="https://x")]))
    if backend == "bwrap":
        with pytest.raises(InvalidArgument, match="image"):
            await hands.provision(resources=sandbox_pb2.Resources(image="debian"))
    else:
        with pytest.raises(SandboxUnavailable, match="not present"):
            await hands.provision(resources=sandbox_pb2.Resources(image="localhost/no-such-image:0"))


@pytest.mark.slow
async def test_a_restarted_bwrap_hands_server_adopts_its_sandboxes(tmp_path: Path) -> None:
    process = ServiceProcess("hands", ["--work-root", str(tmp_path / "sandboxes")], tmp_path)
    process.start()
    try:
        async with HandsClient.connect(process.address) as hands:
            sandbox = (await hands.provision()).id
            await run(hands, sandbox, command="echo kept > kept.txt")
            running = asyncio.create_task(
                hands.execute(
                    sandbox, execution_id="cut", name="bash", input={"command": "sleep 5; echo done >> cut.txt"}
                )
            )
            await asyncio.sleep(0.5)
            process.kill()
            with pytest.raises(Exception):  # noqa: B017  (the call dies with the server)
                await running
        process.start()
        async with HandsClient.connect(process.address) as hands:
            adopted = await hands.get_sandbox(sandbox)
            assert adopted.state == sandbox_pb2.SANDBOX_STATE_READY
            replay = await hands.execute(
                sandbox, execution_id="cut", name="bash", input={"command": "sleep 5; echo done >> cut.txt"}
            )
            assert replay.status == hands_pb2.EXECUTION_STATUS_INTERRUPTED and replay.replayed
            assert "not re-run" in replay.output
            files = await run(hands, sandbox, command="cat kept.txt; cat cut.txt 2>&1")
            assert files.output.startswith("kept\n") and "No such file" in files.output
    finally:
        process.stop()
