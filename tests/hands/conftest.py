"""The hands contract suite runs against both backends: bwrap, and docker against a Podman service that the
suite starts itself (private storage, a private containers.conf, an image imported from a busybox rootfs, as
no registry is reachable here)."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import tarfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from hands import app as hands_app
from hands.app import HandsServer
from hands.config import HandsConfig

TEST_IMAGE = "localhost/managed-agents-test-busybox:1"
# runc, explicit ulimits: crun cannot run on hybrid cgroup hosts, and root here may not raise rlimits.
CONTAINERS_CONF = """[containers]
default_ulimits = ["nofile=1024:1024", "nproc=4096:4096"]
[engine]
runtime = "runc"
"""

KillSandbox = Callable[[str], Awaitable[None]]


def _busybox_image(podman: list[str], work: Path) -> None:
    busybox = shutil.which("busybox")
    assert busybox, "busybox is required for the docker backend's test image: apt-get install busybox-static"
    root = work / "rootfs"
    for directory in ("bin", "tmp", "workspace", "etc", "proc", "sys", "dev", "run"):
        (root / directory).mkdir(parents=True, exist_ok=True)
    shutil.copy(busybox, root / "bin" / "busybox")
    applets = subprocess.run([busybox, "--list"], capture_output=True, text=True, check=True).stdout.split()
    for applet in applets:
        if applet != "busybox":
            (root / "bin" / applet).symlink_to("busybox")
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/workspace:/bin/sh\n")
    archive = work / "rootfs.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(root, arcname=".")
    subprocess.run(
        [*podman, "import", "--change", "ENV PATH=/bin", str(archive), TEST_IMAGE], check=True, capture_output=True
    )


@pytest.fixture(scope="session")
def container_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The Docker Engine API socket of a private Podman service."""
    for tool in ("podman", "runc"):
        assert shutil.which(tool), f"{tool} is required for the docker backend tests: `make test` installs it"
    work = tmp_path_factory.mktemp("podman")
    conf = work / "containers.conf"
    conf.write_text(CONTAINERS_CONF)
    env = {**os.environ, "CONTAINERS_CONF": str(conf)}
    podman = ["podman", "--root", str(work / "storage"), "--runroot", str(work / "runroot")]
    socket_path = work / "podman.sock"
    with (work / "service.log").open("wb") as log:
        service = subprocess.Popen(
            [*podman, "system", "service", "--time=0", f"unix://{socket_path}"],
            env=env,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 30
        while not socket_path.exists():
            assert service.poll() is None, (work / "service.log").read_text()
            assert time.monotonic() < deadline, "the podman service did not start"
            time.sleep(0.05)
        subprocess.run([*podman, "rm", "-af"], env=env, capture_output=True)
        _busybox_image(podman, work)
        yield f"unix://{socket_path}"
    finally:
        subprocess.run([*podman, "rm", "-af"], env=env, capture_output=True, timeout=60)
        os.killpg(service.pid, signal.SIGTERM)
        service.wait(30)
        # Podman bind-mounts its overlay directory onto itself; unmount it so the tmp dir can be removed.
        subprocess.run(["umount", "-l", str(work / "storage" / "overlay")], capture_output=True)


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
