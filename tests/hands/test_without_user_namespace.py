"""`--without-user-namespace`: on a host that cannot give one, bwrap sets the namespaces up as root and the shell
drops to the sandbox's identity inside. The sandbox is then still an unprivileged uid of its own, with no
capability, the syscall filter and read-only kernel knobs; only the user namespace is lost."""

from __future__ import annotations

import itertools
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from hands import app as hands_app
from hands import seccomp
from hands.app import HandsServer
from hands.backends.bwrap import BwrapBackend
from hands.client import HandsClient
from hands.config import HandsConfig
from hands.limits import LimitGroups, scope_of

_ids = itertools.count()


@pytest.fixture
async def rootful(tmp_path: Path) -> AsyncIterator[HandsServer]:
    work_root = tmp_path / "sandboxes"
    work_root.mkdir()
    bwrap = shutil.which("bwrap")
    assert bwrap
    # The backend as create_default makes it on a host whose user namespaces are refused.
    backend = BwrapBackend(
        LimitGroups.detect(scope=scope_of(work_root)),
        bwrap,
        seccomp_program=seccomp.write_program(work_root / ".seccomp.bpf"),
        user_namespace=False,
    )
    server = await hands_app.start(HandsConfig(listen="127.0.0.1:0", work_root=work_root), None, backend=backend)
    yield server
    for sandbox in server.manager.list():
        await server.manager.destroy(sandbox.id)
    await server.aclose(grace=1.0)


async def test_a_sandbox_without_a_user_namespace_is_still_an_unprivileged_uid(rootful: HandsServer) -> None:
    async with HandsClient.connect(rootful.address) as hands:
        sandbox = await hands.provision()
        assert not sandbox.isolation.user_namespace and sandbox.isolation.host_uid >= 1000

        async def run(command: str) -> str:
            result = await hands.execute(
                sandbox.id, execution_id=f"r-{next(_ids)}", name="bash", input={"command": command}
            )
            return result.output

        assert (await run("id -u")).strip() == str(sandbox.isolation.host_uid)
        status = await run("grep -E '^(CapEff|CapBnd|Seccomp|NoNewPrivs):' /proc/self/status")
        assert "CapEff:\t0000000000000000" in status and "CapBnd:\t0000000000000000" in status
        assert "Seccomp:\t2" in status and "NoNewPrivs:\t1" in status
        assert "WROTE" not in await run("(echo 1 > /proc/sys/vm/swappiness) 2>/dev/null && echo WROTE; true")
        assert (await run("echo hi > /workspace/f && cat /workspace/f")) == "hi\n"
        # The system the sandbox sees is readable by its identity (bwrap as root makes its own directories 0700).
        assert "sandbox" in await run("cat /etc/passwd; ls /etc/ssl/certs | head -1; python3 -c 'print(1)'")
