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
import tempfile
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


_LAYOUT = (("workspace", 0o700), ("tmp", 0o1777), ("control", 0o755))


def _template(templates: Path, size: int) -> Path:
    """A formatted, empty image of `size` bytes with the layout's directories, made once per size: formatting
    takes 10-40 ms, a sparse copy of the result about 1 ms."""
    path = templates / f"ext4-{size}.img"
    if path.exists():
        return path
    templates.mkdir(parents=True, exist_ok=True)
    # A name of its own: sandboxes provisioned at once may all be making the first template of their size.
    fd, name = tempfile.mkstemp(dir=templates, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(name)
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)
    # Lazy inode tables and journal: formatting writes a few hundred KiB instead of zeroing every table. The
    # layout is made by mkfs itself (-d), so the template is never mounted on the host.
    try:
        with tempfile.TemporaryDirectory(dir=templates) as layout:
            for directory, mode in _LAYOUT:
                os.mkdir(os.path.join(layout, directory), mode)
                os.chmod(os.path.join(layout, directory), mode)
            _run(
                [
                    "mkfs.ext4",
                    "-q",
                    "-F",
                    "-m",
                    _RESERVED_PERCENT,
                    "-E",
                    "lazy_itable_init=1,lazy_journal_init=1,root_owner=0:0",
                    "-d",
                    layout,
                    str(tmp),
                ]
            )
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)  # concurrent makers of one size: the last rename wins, each result is whole
    return path


def _sparse_copy(source: Path, target: Path) -> None:
    """Copies only the data of a sparse file (SEEK_DATA/SEEK_HOLE), keeping its holes."""
    fd_in = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fd_out = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            size = os.fstat(fd_in).st_size
            os.ftruncate(fd_out, size)
            offset = 0
            while offset < size:
                try:
                    data = os.lseek(fd_in, offset, os.SEEK_DATA)
                except OSError:  # ENXIO: only a hole is left
                    break
                hole = os.lseek(fd_in, data, os.SEEK_HOLE)
                position = data
                while position < hole:
                    copied = os.copy_file_range(fd_in, fd_out, hole - position, position, position)
                    if copied <= 0:
                        raise OSError(f"copying {source} stopped at byte {position}")
                    position += copied
                offset = hole
            os.fsync(fd_out)
        finally:
            os.close(fd_out)
    finally:
        os.close(fd_in)


def create(image: Path, mountpoint: Path, size: int, owner: Identity | None, *, templates: Path) -> None:
    """Makes the sandbox's `size`-byte disk at `image` (a copy of the template of that size, in `templates`),
    mounts it at `mountpoint`, and gives the sandbox's directories to `owner` (root if None). Blocking: call it
    from a thread."""
    _sparse_copy(_template(templates, size), image)
    mount(image, mountpoint)
    # A brand-new filesystem: nothing of the sandbox's is in it yet, so acting on names is safe here.
    uid, gid = (owner.uid, owner.gid) if owner else (0, 0)
    # Its root is reachable only by root and the sandbox's own group: no other sandbox's uid may enter.
    os.chown(mountpoint, 0, gid)
    os.chmod(mountpoint, 0o750)
    for name, _ in _LAYOUT:
        if name != "control":
            os.chown(mountpoint / name, uid, gid)
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


@dataclass(frozen=True, slots=True)
class Mounted:
    """A sandbox disk mounted on this host: where, and the image behind it ('' if the kernel no longer says)."""

    mountpoint: Path
    image: str
    image_deleted: bool


def mounted(under: Path) -> list[Mounted]:
    """The disks mounted below `under`, with their images (read from /proc and /sys, no command run)."""
    found = []
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return []
    prefix = str(under).rstrip("/") + "/"
    for line in lines:
        fields = line.split(" ")
        separator = fields.index("-") if "-" in fields else -1
        if separator < 0 or len(fields) < separator + 3:
            continue
        point = fields[4].encode().decode("unicode_escape")  # mountinfo escapes spaces as \040
        source = fields[separator + 2]
        if not point.startswith(prefix) or not source.startswith("/dev/loop"):
            continue
        backing = ""
        with contextlib.suppress(OSError):
            backing = Path(f"/sys/block/{Path(source).name}/loop/backing_file").read_text().strip()
        deleted = backing.endswith(" (deleted)") or not backing
        found.append(Mounted(Path(point), backing.removesuffix(" (deleted)"), deleted))
    return found


def sweep(under: Path, work_root: Path, keep: set[str]) -> int:
    """Unmounts the disks below `under` that nobody can use again: those whose image is deleted or gone, and
    those of `work_root` whose sandbox (directory name) is not in `keep`. A killed hands server cannot unmount
    its sandboxes' disks, and each one left holds a loop device and its image's space. Blocking."""
    root = str(work_root.resolve()).rstrip("/") + "/"
    removed = 0
    for disk in mounted(under):
        ours_unused = disk.image.startswith(root) and Path(disk.image).parent.name not in keep
        if disk.image_deleted or not os.path.exists(disk.image) or ours_unused:
            try:
                unmount(disk.mountpoint)
                removed += 1
            except DiskError:
                continue
    return removed
