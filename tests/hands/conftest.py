"""The hands contract suite runs against both backends: bwrap, and docker against the Podman service of
`tests/podman.py`."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from hands import app as hands_app
from hands.app import HandsServer
from hands.config import HandsConfig
from tests.podman import TEST_IMAGE

KillSandbox = Callable[[str], Awaitable[None]]


@pytest.fixture(params=["bwrap", "docker"])
def backend(request: pytest.FixtureRequest) -> str:
    """The sandbox backend under test."""
    return str(request.param)


@pytest.fixture
async def hands_server(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[HandsServer]:
    """A hands server on the backend under test (overrides the bwrap-only fixture of tests/conftest.py)."""
    config = HandsConfig(listen="127.0.0.1:0", work_root=tmp_path / "sandboxes", backend=backend)
    if backend == "docker":
        url = request.getfixturevalue("container_engine")
        config = HandsConfig(
            listen="127.0.0.1:0",
            work_root=tmp_path / "sandboxes",
            backend="docker",
            docker_url=url,
            default_image=TEST_IMAGE,
        )
    server = await hands_app.start(config, None)
    yield server
    for sandbox in server.manager.list():
        await server.manager.destroy(sandbox.id)
    await server.aclose(grace=1.0)


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


@pytest.fixture
def kill_sandbox(backend: str, request: pytest.FixtureRequest) -> KillSandbox:
    """Kills a sandbox behind hands' back, as a crash or an operator would."""

    async def kill(sandbox_id: str) -> None:
        if backend == "bwrap":
            pids = subprocess.run(["pgrep", "-f", sandbox_id], capture_output=True, text=True).stdout.split()
            assert pids, "the sandbox's processes are visible on the host"
            for pid in pids:
                os.kill(int(pid), signal.SIGKILL)
            # SIGKILL is delivered asynchronously: wait until each process is dead (gone, or a zombie its parent
            # has not reaped yet), so the next call meets a dead sandbox, not one that is still dying.
            deadline = time.monotonic() + 10
            while any(_alive(int(pid)) for pid in pids) and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
        else:
            import docker

            client = docker.DockerClient(base_url=request.getfixturevalue("container_engine"))
            client.containers.get(sandbox_id).kill()
            client.close()

    return kill
