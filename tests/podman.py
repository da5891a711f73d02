"""A Docker Engine API for the docker backend's tests: a Podman service started by the tests themselves, with
private storage, a private containers.conf, and an image imported from a busybox rootfs (no registry is
reachable here)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

TEST_IMAGE = "localhost/managed-agents-test-busybox:1"
# runc, explicit ulimits: crun cannot run on hybrid cgroup hosts, and root here may not raise rlimits.
CONTAINERS_CONF = """[containers]
default_ulimits = ["nofile=1024:1024", "nproc=4096:4096"]
[engine]
runtime = "runc"
"""


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


@contextlib.contextmanager
def podman_service(work: Path) -> Iterator[str]:
    """Runs a private Podman service in `work` and yields its Docker Engine API URL."""
    for tool in ("podman", "runc"):
        assert shutil.which(tool), f"{tool} is required for the docker backend tests: `make test` installs it"
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
