"""The disk of a sandbox: a filesystem of its own, in a sparse image file loop-mounted on the host, whose size is
the sandbox's disk quota. Its workspace and its /tmp are directories of that filesystem, so what the sandbox
writes cannot fill the host's disk (nor the store's, often the same one), and the kernel answers ENOSPC inside
the sandbox alone.

Being a filesystem of its own also keeps host paths out of the sandbox's view (its mount table shows
`/workspace` of `/dev/loopN`, not a directory of the host) and lets the file tools refuse to cross into any
other filesystem. ext4 keeps a small reserve for root, so hands can still write the shell's command files into
a sandbox whose owner filled it.

Layout of the filesystem: `workspace/` and `tmp/` (the sandbox's), `control/` (hands': read-only inside).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from hands.identities import Identity

MIN_BYTES = 64 << 20
MAX_BYTES = 1 << 40
DEFAULT_BYTES = 4 << 30
_RESERVED_PERCENT = "1"  # of blocks kept for root: hands' own command files
_TIMEOUT = 60.0
FULL_BELOW = 1 << 20


class DiskError(Exception):
    """The host could not make or mount a sandbox's disk; the sentence says why."""


@dataclass(frozen=True, slots=True)
class DiskUsage:
    """Bytes used and the quota the sandbox can fill (what is left for it is `size - used`)."""

    used: int
    size: int

    @property
    def full(self) -> bool:
        """True when less than 1 MiB is left: a write of ordinary size no longer fits."""
        return self.size - self.used < FULL_BELOW


def _tool(name: str) -> str | None:
    # Administrative programs live in sbin, which a service's PATH may leave out.
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin:/bin")


def tools_missing() -> list[str]:
    """The programs a disk needs that this host lacks."""
    return [tool for tool in ("mkfs.ext4", "mount", "umount") if _tool(tool) is None]


def _run(argv: list[str]) -> None:
    argv = [_tool(argv[0]) or argv[0], *argv[1:]]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise DiskError(f"{argv[0]} failed: {error}") from None
    if done.returncode != 0:
        raise DiskError(f"{' '.join(argv[:2])} failed: {(done.stderr or done.stdout).strip()[-500:]}")


def create(image: Path, mountpoint: Path, size: int, owner: Identity | None) -> None:
    """Makes a `size`-byte sparse image, formats it, mounts it at `mountpoint` and lays out its directories, the
    sandbox's owned by `owner` (by root if None). Runs blocking commands: call it from a thread."""
    with open(image, "wb") as handle:
        handle.truncate(size)
    # Lazy inode tables and journal: formatting writes a few hundred KiB instead of zeroing every table.
    _run(
        [
            "mkfs.ext4",
            "-q",
            "-F",
            "-m",
            _RESERVED_PERCENT,
            "-E",
            "lazy_itable_init=1,lazy_journal_init=1",
            str(image),
        ]
    )
    mount(image, mountpoint)
    # A brand-new filesystem: nothing of the sandbox's is in it yet, so creating by name is safe here.
    uid, gid = (owner.uid, owner.gid) if owner else (0, 0)
    # Its root is reachable only by root and the sandbox's own group: no other sandbox's uid may enter.
    os.chown(mountpoint, 0, gid)
    os.chmod(mountpoint, 0o750)
    for name, mode in (("workspace", 0o700), ("tmp", 0o1777), ("control", 0o755)):
        path = mountpoint / name
        path.mkdir(mode=mode)
        os.chmod(path, mode)  # mkdir's mode is masked by the umask
        if name != "control":
            os.chown(path, uid, gid)
    with contextlib.suppress(FileNotFoundError):
        (mountpoint / "lost+found").rmdir()


def mount(image: Path, mountpoint: Path) -> None:
    """Mounts the image (no device files, no set-uid programs honoured). Blocking."""
    # Every directory above a mount point must be passable by the sandbox identities (bwrap runs as them).
    for parent in reversed(mountpoint.parents):
        if not parent.exists():
            parent.mkdir(mode=0o711)
            os.chmod(parent, 0o711)
    mountpoint.mkdir(exist_ok=True)
    if os.path.ismount(mountpoint):
        return
    _run(["mount", "-t", "ext4", "-o", "loop,nosuid,nodev,noatime", str(image), str(mountpoint)])


def unmount(mountpoint: Path) -> None:
    """Unmounts (lazily if a process still holds it: the kernel finishes once it lets go) and removes the mount
    point; the loop device is freed with the mount. Blocking."""
    if os.path.ismount(mountpoint):
        _run(["umount", "--lazy", str(mountpoint)])
    with contextlib.suppress(OSError):
        mountpoint.rmdir()


def usage(mountpoint: Path) -> DiskUsage | None:
    """How full the disk is, as the sandbox sees it (root's reserve excluded); None if it is not mounted."""
    if not os.path.ismount(mountpoint):
        return None
    try:
        stat = os.statvfs(mountpoint)
    except OSError:
        return None
    size = (stat.f_blocks - (stat.f_bfree - stat.f_bavail)) * stat.f_frsize
    return DiskUsage(used=size - stat.f_bavail * stat.f_frsize, size=size)
