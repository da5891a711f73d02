"""Where a sandbox's relays listen on this host, and the forwarder that opens doors to them inside the
sandbox's network (see `hands.forwarder`)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

from managed_agents.mesh.errors import FailedPrecondition

GIT_PORT = 7480  # on the sandbox's own loopback; every sandbox has its own
EGRESS_PORT = 7481


def door_socket(sandbox_id: str, door: str) -> Path:
    """Where a sandbox's relay for `door` (`git`, `egress`) listens: short (Unix socket paths are limited to
    108 bytes) and outside every sandbox's view."""
    directory = Path(tempfile.gettempdir()) / "managed-agents-doors"
    directory.mkdir(mode=0o700, exist_ok=True)
    return directory / f"{sandbox_id}.{door}.sock"


class SandboxDoors:
    """The forwarder of one sandbox: a process in the sandbox's network namespace, started again for every
    new shell (each shell is a fresh set of namespaces)."""

    def __init__(self) -> None:
        self._forwarder: asyncio.subprocess.Process | None = None

    async def attach(self, namespace_pid: int | None, doors: Mapping[int, Path]) -> None:
        """(Re)starts the forwarder in the network namespace of `namespace_pid`, one door per port."""
        await self.aclose()
        nsenter = shutil.which("nsenter")
        if namespace_pid is None or nsenter is None:
            raise FailedPrecondition(
                "this sandbox's network cannot be entered from the hands server "
                + ("(nsenter is missing)" if nsenter is None else "(its backend runs it elsewhere)")
                + ", so its repositories and secrets cannot be relayed"
            )
        argv = [nsenter, f"--net=/proc/{namespace_pid}/ns/net", "--", sys.executable, "-m", "hands.forwarder"]
        for port, socket_path in sorted(doors.items()):
            argv += ["--door", f"{port}={socket_path}"]
        self._forwarder = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={"PATH": os.environ.get("PATH", ""), "PYTHONPATH": os.pathsep.join(sys.path)},
        )
        assert self._forwarder.stdout is not None
        try:
            ready = await asyncio.wait_for(self._forwarder.stdout.readline(), 15)
        except TimeoutError:
            ready = b""
        if ready.strip() != b"ready":
            err = b""
            if self._forwarder.stderr is not None:
                with contextlib.suppress(TimeoutError):
                    err = await asyncio.wait_for(self._forwarder.stderr.read(2000), 1)
            await self.aclose()
            raise FailedPrecondition(f"the sandbox's door forwarder did not start: {err.decode(errors='replace')}")

    async def aclose(self) -> None:
        """Stops the forwarder."""
        if self._forwarder is not None and self._forwarder.returncode is None:
            self._forwarder.kill()
            await self._forwarder.wait()
        self._forwarder = None
