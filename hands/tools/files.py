"""Handle-relative file access beneath a directory: the host side of a sandbox's workspace.

hands touches a sandbox's workspace from the host, as root, while code in the sandbox (hostile, say a
prompt-injected agent) may rename, swap, link and replace anything in it at any moment. Checking a path and then
opening it by name is a race that code wins: it swaps a directory for a symlink to `/` between the two. So
nothing here opens a workspace path by name on the host. Every open starts at the workspace's directory fd and
resolves beneath it in the kernel with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS |
RESOLVE_NO_XDEV)`, or, on kernels without openat2 (before 5.6), one component at a time with `O_NOFOLLOW`
relative to the previous component's fd. Either way a symlink anywhere in a path is refused, never followed,
`..` never leaves the directory and no mount point is crossed, whatever is swapped in between two steps.

Files are first opened with O_PATH, which does nothing to the inode whatever it is (opening a FIFO blocks until
a writer comes, opening a device can rewind a tape or hang up a terminal), checked with fstat to be a regular
file or a directory, and only then reopened for reading or writing through `/proc/thread-self/fd/N`: that
names the very inode already checked, not a path, and the kernel still applies the caller's permission checks.

`become` gives the calling thread the sandbox's identity for file access (fsuid, fsgid, no supplementary
groups), so permission checks are the sandbox's own and new files belong to it.
"""

from __future__ import annotations

import ctypes
import errno
import heapq
import os
import platform
import secrets
import stat
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

Resolution = Literal["auto", "openat2", "walk"]
"""How paths are resolved: openat2 when the kernel has it, else the per-component walk ("auto"); or forced (tests)."""

Parts = tuple[str, ...]
"""A path beneath the directory as its components: no empty, `.` or `..` component, no `/`."""

SYS_OPENAT2 = 437  # the same on every architecture: system calls numbered from 424 on are unified
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
RESOLVE = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV
MAX_ECHO_CHARS = 512
"""Paths echoed in answers are cut to this many characters, so no answer grows with a hostile path."""

_KINDS = (
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)
_LIBC = ctypes.CDLL(None, use_errno=True)
# syscall(2) is variadic; every call here passes five integer-sized arguments, which the Linux x86_64 and aarch64
# calling conventions pass alike for variadic and fixed arguments. The kernel ignores the ones a call doesn't use.
_SYSCALL = ctypes.CFUNCTYPE(
    ctypes.c_long, ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, use_errno=True
)(("syscall", _LIBC))
_SETFSUID = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_uint32)(("setfsuid", _LIBC))
_SETFSGID = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_uint32)(("setfsgid", _LIBC))
_UNCHANGED = 0xFFFFFFFF  # setfsuid(-1) changes nothing and answers the current fsuid


class Refused(Exception):
    """A file operation refused or failed: the sentence the model sees."""


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def _flags(flags: int) -> int:
    """`flags` with what every open here needs: no symlink followed, no fd leaked to a child process, and no
    blocking (a FIFO's open waits for a writer otherwise). openat2 refuses O_PATH with any flag but these."""
    always = os.O_NOFOLLOW | os.O_CLOEXEC
    return flags | always if flags & os.O_PATH else flags | always | os.O_NONBLOCK | os.O_NOCTTY


def openat2(dirfd: int, path: str, flags: int, mode: int = 0) -> int:
    """openat2(2) of `path` beneath `dirfd`, no symlink, magic link, `..` escape or mount crossing; raises OSError
    (ENOSYS without openat2, ELOOP for a symlink, EXDEV for an escape or a mount crossing)."""
    how = _OpenHow(_flags(flags), mode if flags & os.O_CREAT else 0, RESOLVE)
    fd = int(_SYSCALL(SYS_OPENAT2, dirfd, os.fsencode(path), ctypes.byref(how), ctypes.sizeof(how)))
    if fd < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), path)
    return fd


def _setgroups_number() -> int:
    machine = platform.machine()
    numbers = {"x86_64": 116, "aarch64": 159}
    if machine not in numbers:
        raise Refused(f"hands cannot act as the sandbox's user on this architecture ({machine})")
    return numbers[machine]


def become(uid: int, gid: int) -> None:
    """Makes the CALLING THREAD's file access that of uid:gid with no supplementary groups, for good.

    setfsuid/setfsgid and the raw setgroups system call change the credentials of the calling thread only
    (glibc's setgroups() would change every thread of the process), and dropping the fsuid from 0 drops root's
    DAC override with it: permission checks become the sandbox's own and new files belong to uid:gid. The thread
    must never run anything else afterwards: the caller gives each operation a fresh thread.
    """
    if (uid, gid) == (os.geteuid(), os.getegid()) and uid != 0:
        return  # hands runs as the sandbox's user already (development); it cannot drop its groups anyway
    if _SYSCALL(_setgroups_number(), 0, None, None, 0) != 0:
        code = ctypes.get_errno()
        raise Refused(f"hands could not drop its groups to act as the sandbox's user: {os.strerror(code)}")
    _SETFSGID(gid)
    _SETFSUID(uid)
    if _SETFSGID(_UNCHANGED) != gid or _SETFSUID(_UNCHANGED) != uid or os.getgroups():
        raise Refused(f"hands could not act as the sandbox's user {uid}:{gid} (is hands running as root?)")


def printable(text: str, limit: int = MAX_ECHO_CHARS) -> str:
    """`text` fit to echo: control characters and undecodable bytes escaped, cut in the middle past `limit`."""
    keep = (limit - 5) // 2

    def cut(text: str) -> str:
        return text if len(text) <= limit else f"{text[:keep]}[...]{text[-keep:]}"

    # Cut before escaping too, so a hostile 10 MB path costs no more than a short one.
    text = cut(text)
    if not text.isprintable():
        text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return cut(text)


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "a special file")


def _require(mode: int, shown: str, want: Literal["file", "directory", "either"]) -> None:
    """Refuses, with a sentence, an inode that is not what the editor may open."""
    if stat.S_ISLNK(mode):
        raise Refused(f"{shown} is a symbolic link; the editor does not follow links (use the path it points to)")
    if stat.S_ISDIR(mode):
        if want == "file":
            raise Refused(f"{shown} is a directory, not a file")
        return
    if stat.S_ISREG(mode):
        if want == "directory":
            raise Refused(f"{shown} is not a directory")
        return
    raise Refused(f"{shown} is {_kind(mode)}; the editor only opens regular files and directories")


# What each error means for the path the model named, as it can act on it ({} is the path).
_SENTENCES: dict[int, str] = {
    errno.ENOENT: "{} does not exist",
    errno.EACCES: "Permission denied: {} (the sandbox's user may not do this; `ls -l` in bash shows owner and mode)",
    errno.EPERM: "Permission denied: {} (the sandbox's user may not do this; `ls -l` in bash shows owner and mode)",
    errno.ELOOP: "{} goes through a symbolic link; the editor does not follow links",
    errno.EXDEV: "{} leaves the workspace's filesystem (a mount point); the editor stays on it",
    errno.ENOTDIR: "a component of {} is not a directory",
    errno.EISDIR: "{} is a directory, not a file",
    errno.ENOSPC: "No space left to write {}: the disk or the sandbox's quota is full",
    errno.EDQUOT: "No space left to write {}: the disk or the sandbox's quota is full",
    errno.EROFS: "{} is on a read-only filesystem",
    errno.ENAMETOOLONG: "a name in {} is too long (names are at most 255 bytes)",
    errno.EAGAIN: "{} is busy (another process holds a lease or lock on it); try again",
    errno.ENXIO: "{} is not a regular file; the editor only opens regular files and directories",
}


def _sentence(error: OSError, shown: str) -> Refused:
    """The sentence for an OSError on `shown`."""
    template = _SENTENCES.get(error.errno or 0)
    return Refused(template.format(shown) if template else f"{error.strerror or error}: {shown}")


@contextmanager
def _closing(fd: int) -> Iterator[int]:
    try:
        yield fd
    finally:
        os.close(fd)


def _mount_id(fd: int) -> int:
    """The id of the mount `fd` is on (what RESOLVE_NO_XDEV compares; st_dev misses bind mounts)."""
    with open(f"/proc/thread-self/fdinfo/{fd}", encoding="ascii") as info:
        for line in info:
            if line.startswith("mnt_id:"):
                return int(line.split()[1])
    raise OSError(errno.ENOTSUP, "the kernel reports no mount id", f"/proc/thread-self/fdinfo/{fd}")


def _reopen(path_fd: int, flags: int) -> int:
    """The inode an O_PATH fd refers to, opened with `flags`, by the fd, not by a path (see the module's doc).
    The kernel checks the caller's permissions for `flags` as for any open."""
    return os.open(f"/proc/thread-self/fd/{path_fd}", _flags(flags) & ~os.O_NOFOLLOW)


def _read_at_most(fd: int, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while size < limit:
        chunk = os.read(fd, min(1 << 20, limit - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _is_dir(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir(follow_symlinks=False)
    except OSError:
        return False  # gone since it was listed


@dataclass(frozen=True, slots=True)
class Listing:
    """Part of a directory tree: the lines shown, and what was left out to stay within the caps."""

    lines: tuple[str, ...]
    left_out: int
    """Entries (not hidden) seen but not shown; a lower bound when `complete` is False."""
    unread_dirs: int
    """Directories within the depth whose entries were not read (no room left, or not readable)."""
    complete: bool
    """False when the scan budget ran out before every entry was counted."""

    def note(self) -> str:
        """A line saying what was left out and where to see it, or "" when nothing was."""
        if not self.left_out and not self.unread_dirs:
            return ""
        count = f"{self.left_out:,}" if self.complete else f"at least {self.left_out:,}"
        unread = f", and the entries of {self.unread_dirs:,} directories were not read" if self.unread_dirs else ""
        return f"[... {count} more entries were left out{unread}; run `ls` or `find` in bash to see the rest ...]"


@dataclass(slots=True)
class _Budget:
    """What one listing may still show and scan (one per call; nothing shared)."""

    max_entries: int
    max_chars: int
    scan_left: int
    lines: list[str] = field(default_factory=list)
    chars: int = 0
    left_out: int = 0
    unread_dirs: int = 0
    complete: bool = True
    full: bool = False

    def room(self) -> int:
        return 0 if self.full else self.max_entries - len(self.lines)

    def add(self, line: str) -> bool:
        if self.room() <= 0 or self.chars + len(line) + 1 > self.max_chars:
            self.full = True
            return False
        self.lines.append(line)
        self.chars += len(line) + 1
        return True

    def skip(self, rest: Sequence[tuple[str, bool]], *, descend: bool) -> None:
        self.left_out += len(rest)
        if descend:
            self.unread_dirs += sum(1 for _, is_dir in rest if is_dir)


@dataclass(frozen=True, slots=True)
class Tree:
    """A directory reached only through its fd; see `open_tree`. Every path is `Parts` beneath it."""

    root_fd: int
    shown_root: str
    resolution: Resolution
    mount_id: int

    def shown(self, parts: Parts) -> str:
        """How a path is named in answers: under `shown_root`, escaped and cut (see `printable`)."""
        return printable("/".join((self.shown_root, *parts)))

    # Opening ------------------------------------------------------------------------------------------------

    def _open_in(self, dirfd: int, name: str, flags: int, mode: int = 0) -> int:
        """Opens one component `name` of directory `dirfd` (or `.`, the directory itself); raises OSError."""
        if name in ("", "..") or "/" in name or "\x00" in name:
            raise ValueError(f"not a single path component: {name!r}")
        if self.resolution != "walk":
            try:
                return openat2(dirfd, name, flags, mode)
            except OSError as error:
                if error.errno != errno.ENOSYS or self.resolution == "openat2":
                    raise
        # The walk: O_NOFOLLOW refuses a symlink as the component itself (ELOOP, or ENOTDIR with O_DIRECTORY), or
        # opens the link itself with O_PATH (then fstat says so); the mount id stands in for RESOLVE_NO_XDEV.
        fd = os.open(name, _flags(flags), mode, dir_fd=dirfd)
        try:
            if _mount_id(fd) != self.mount_id:
                raise OSError(errno.EXDEV, os.strerror(errno.EXDEV), name)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _explain(self, dirfd: int, name: str, parts: Parts, error: OSError) -> Refused:
        """The sentence for `error` opening `name` in `dirfd`: names what is wrong with which component."""
        shown = self.shown(parts)
        if error.errno in (errno.ELOOP, errno.ENOTDIR, errno.ENXIO, errno.EXDEV):
            try:
                mode = os.stat(name, dir_fd=dirfd, follow_symlinks=False).st_mode
            except OSError:
                return _sentence(error, shown)
            if stat.S_ISLNK(mode) or (error.errno == errno.ENXIO and not stat.S_ISREG(mode)):
                return self._kind_refusal(mode, shown)
            if error.errno in (errno.ELOOP, errno.ENOTDIR) and stat.S_ISDIR(mode):
                return Refused(f"{shown} changed while it was opened (it is a directory again); try again")
            if error.errno == errno.ENOTDIR and not stat.S_ISDIR(mode):
                return Refused(f"{shown} is not a directory")
        return _sentence(error, shown)

    @staticmethod
    def _kind_refusal(mode: int, shown: str) -> Refused:
        try:
            _require(mode, shown, "either")
        except Refused as refusal:
            return refusal
        return Refused(f"{shown} changed while it was opened; try again")

    def _step(self, dirfd: int, parts: Parts, flags: int, *, make: bool) -> int:
        """Opens the last of `parts` in `dirfd`, the directory of the ones before; `make` creates a missing
        directory (mkdir never follows a symlink: one there is EEXIST, then refused by the open)."""
        name = parts[-1]
        try:
            return self._open_in(dirfd, name, flags)
        except FileNotFoundError as error:
            if not make:
                raise self._explain(dirfd, name, parts, error) from None
        except OSError as error:
            raise self._explain(dirfd, name, parts, error) from None
        try:
            with suppress(FileExistsError):
                os.mkdir(name, 0o777, dir_fd=dirfd)
            return self._open_in(dirfd, name, flags)
        except OSError as error:
            raise self._explain(dirfd, name, parts, error) from None

    def _walk(self, parts: Parts, flags: int, *, make: bool = False) -> int:
        """Opens `parts` one component at a time, each relative to the fd of the one before."""
        if not parts:
            try:
                return self._open_in(self.root_fd, ".", flags)
            except OSError as error:
                raise _sentence(error, self.shown(parts)) from None
        directory = self.root_fd
        try:
            for depth in range(1, len(parts)):
                step = self._step(directory, parts[:depth], os.O_PATH | os.O_DIRECTORY, make=make)
                if directory != self.root_fd:
                    os.close(directory)
                directory = step
            return self._step(directory, parts, flags, make=make)
        finally:
            if directory != self.root_fd:
                os.close(directory)

    def _open(self, parts: Parts, flags: int) -> int:
        """Opens `parts` with `flags` (O_NOFOLLOW, O_CLOEXEC and O_NONBLOCK added); raises Refused."""
        _check(parts)
        if self.resolution != "walk":
            try:
                return openat2(self.root_fd, "/".join(parts) or ".", flags)
            except OSError as error:
                if error.errno == errno.ENOSYS and self.resolution == "openat2":
                    raise Refused("this kernel has no openat2 (Linux 5.6 or later is needed)") from None
                # Otherwise the walk: on ENOSYS it does the work; on any other error it finds which component
                # is the problem for the sentence (or succeeds if the tree changed since: it is as safe).
        return self._walk(parts, flags)

    def _open_dir(self, parts: Parts, *, make: bool) -> int:
        if not make:
            return self._open(parts, os.O_PATH | os.O_DIRECTORY)
        _check(parts)
        return self._walk(parts, os.O_PATH | os.O_DIRECTORY, make=True)

    # Operations ---------------------------------------------------------------------------------------------

    def kind(self, parts: Parts) -> Literal["file", "directory"]:
        """Whether `parts` is a regular file or a directory; anything else is refused with a sentence."""
        with _closing(self._open(parts, os.O_PATH)) as fd:
            mode = os.fstat(fd).st_mode
        _require(mode, self.shown(parts), "either")
        return "directory" if stat.S_ISDIR(mode) else "file"

    def read_file(self, parts: Parts, limit: int) -> bytes:
        """The content of regular file `parts`; refused if it holds more than `limit` bytes (at most `limit` + 1
        are ever read, however fast the file grows)."""
        shown = self.shown(parts)
        try:
            with _closing(self._open(parts, os.O_PATH)) as path_fd:
                checked = os.fstat(path_fd)
                _require(checked.st_mode, shown, "file")
                if checked.st_size > limit:
                    raise Refused(_too_large(shown, limit))
                with _closing(_reopen(path_fd, os.O_RDONLY)) as fd:
                    _same_inode(checked, os.fstat(fd), shown)
                    data = _read_at_most(fd, limit + 1)
        except OSError as error:
            raise _sentence(error, shown) from None
        if len(data) > limit:
            raise Refused(_too_large(shown, limit))
        return data

    def write_file(self, parts: Parts, data: bytes, *, make_parents: bool) -> None:
        """Makes regular file `parts` hold `data`, creating it (and, with `make_parents`, its directories).

        The new content goes to a temporary file in the same directory, created O_EXCL through the directory's
        fd, and is renamed over the name. Chosen over truncating and rewriting the file in place because:
        - a crash never leaves half a file: the name has the old content or the new;
        - no existing inode is ever written: if the name is (or is swapped for) a hard link to a file outside,
          or a symlink, rename replaces the directory entry and the file outside stays untouched;
        - rename never follows a symlink at the target, so a swap after the check below writes nothing through.
        What rename doesn't check is permission on the old file (only on the directory), so the old file is
        opened for writing first: a file the sandbox's user may not write is refused, as an editor would.
        The old file's permission bits are kept, and its owner where hands may set it (not as the sandbox's user).
        """
        if not parts:
            raise Refused(f"{self.shown(parts)} is a directory, not a file")
        shown = self.shown(parts)
        name = parts[-1]
        with _closing(self._open_dir(parts[:-1], make=make_parents)) as directory:
            old = self._writable(directory, parts)
            temporary = f".{secrets.token_hex(8)}.editor-tmp"
            try:
                mode = 0o666 if old is None else stat.S_IMODE(old.st_mode) & 0o777
                with _closing(self._open_in(directory, temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)) as fd:
                    if old is not None:
                        os.fchmod(fd, mode)  # the umask narrowed it at creation
                        _keep_owner(fd, old)
                    _write_all(fd, data)
                    os.fsync(fd)
                os.rename(temporary, name, src_dir_fd=directory, dst_dir_fd=directory)
            except OSError as error:
                with suppress(OSError):
                    os.unlink(temporary, dir_fd=directory)
                raise _sentence(error, shown) from None

    def _writable(self, directory: int, parts: Parts) -> os.stat_result | None:
        """The existing regular file's status after checking the caller may write it, or None if there is none."""
        shown = self.shown(parts)
        try:
            path_fd = self._open_in(directory, parts[-1], os.O_PATH)
        except FileNotFoundError:
            return None
        except OSError as error:
            raise self._explain(directory, parts[-1], parts, error) from None
        with _closing(path_fd):
            old = os.fstat(path_fd)
            _require(old.st_mode, shown, "file")
            try:
                os.close(_reopen(path_fd, os.O_WRONLY))
            except OSError as error:
                if error.errno != errno.ETXTBSY:  # a running program: it can't be opened to write, but replaced
                    raise _sentence(error, shown) from None
        return old

    def list_dir(self, parts: Parts, *, depth: int, max_entries: int, max_chars: int, max_scan: int) -> Listing:
        """The entries of directory `parts` not starting with `.`, `depth` levels deep, sorted, each under its
        parent, named as `shown`: at most `max_entries` lines of `max_chars` characters in all, at most
        `max_scan` directory entries read (a directory of millions must not hold the thread for long)."""
        budget = _Budget(max_entries=max_entries, max_chars=max_chars, scan_left=max_scan)
        shown = self.shown(parts)
        try:
            with _closing(self._open(parts, os.O_RDONLY | os.O_DIRECTORY)) as fd:
                self._list_into(fd, parts, depth, budget)
        except OSError as error:
            raise _sentence(error, shown) from None
        return Listing(tuple(budget.lines), budget.left_out, budget.unread_dirs, budget.complete)

    def _list_into(self, fd: int, parts: Parts, levels: int, budget: _Budget) -> None:
        entries, total = _smallest_visible(fd, budget)
        budget.left_out += total - len(entries)
        for index, (name, is_dir) in enumerate(entries):
            if not budget.add(self.shown((*parts, name))):
                budget.skip(entries[index:], descend=levels > 1)
                return
            if is_dir and levels > 1:
                self._descend(fd, (*parts, name), levels - 1, budget)

    def _descend(self, fd: int, parts: Parts, levels: int, budget: _Budget) -> None:
        if budget.room() <= 0:
            budget.unread_dirs += 1
            return
        try:
            # Opened by name in `fd`, like every open: if it was swapped for a symlink since, this refuses it.
            sub = self._open_in(fd, parts[-1], os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            budget.unread_dirs += 1
            return
        with _closing(sub):
            self._list_into(sub, parts, levels, budget)


def _smallest_visible(fd: int, budget: _Budget) -> tuple[list[tuple[str, bool]], int]:
    """The first `budget.room()` entries of directory `fd` by name, not hidden, and how many there are in all:
    memory for the few kept, not for a directory of millions."""
    total = 0

    def visible() -> Iterator[os.DirEntry[str]]:
        nonlocal total
        with os.scandir(fd) as entries:
            for entry in entries:
                if budget.scan_left <= 0:
                    budget.complete = False
                    return
                budget.scan_left -= 1
                if not entry.name.startswith("."):
                    total += 1
                    yield entry

    kept = heapq.nsmallest(budget.room(), visible(), key=lambda entry: entry.name)
    return [(entry.name, _is_dir(entry)) for entry in kept], total


def _check(parts: Parts) -> None:
    for name in parts:
        if name in ("", ".", "..") or "/" in name or "\x00" in name:
            raise Refused(f"{printable('/'.join(parts))} is not a plain path (no empty, `.` or `..` components)")


def _too_large(shown: str, limit: int) -> str:
    return f"{shown} is larger than {limit // (1 << 20)} MiB; use bash to inspect it"


def _same_inode(before: os.stat_result, after: os.stat_result, shown: str) -> None:
    if (before.st_dev, before.st_ino) != (after.st_dev, after.st_ino) or not stat.S_ISREG(after.st_mode):
        raise Refused(f"{shown} changed while it was opened; try again")


def _keep_owner(fd: int, old: os.stat_result) -> None:
    """Gives the new file the old one's owner when hands may (as root, editing for a sandbox with no identity of
    its own, so an edit doesn't hand the sandbox's file to root); as the sandbox's user the file stays its own."""
    new = os.fstat(fd)
    if (new.st_uid, new.st_gid) != (old.st_uid, old.st_gid):
        with suppress(PermissionError):
            os.fchown(fd, old.st_uid, old.st_gid)


@contextmanager
def open_tree(directory: Path, *, shown_root: str, resolution: Resolution = "auto") -> Iterator[Tree]:
    """The directory as a `Tree`, its fd open for the block. The directory's own path (hands' work directory,
    not the sandbox's) is the one path opened by name; open it before `become`, whose user may not search the
    directories above it."""
    try:
        fd = os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as error:
        raise Refused(
            f"The workspace is not available ({error.strerror}); the sandbox may have been destroyed"
        ) from None
    with _closing(fd):
        yield Tree(fd, shown_root, resolution, _mount_id(fd))
