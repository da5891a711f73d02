"""The host's process tree, read from /proc: what a shell started, so a timed-out command can be stopped
without killing the shell itself."""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            stat = (entry / "stat").read_text()
            # The command name is in parentheses and may hold spaces; fields after it are plain.
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    return children


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, parents before children."""
    children = _children_map()
    found, frontier = [], [pid]
    while frontier:
        current = frontier.pop()
        for child in children.get(current, ()):
            found.append(child)
            frontier.append(child)
    return found


def stopped(pid: int) -> bool:
    """True if the process is stopped (state T), or gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("T", "t", "Z", "X")


def command_name(pid: int) -> str:
    """The process's command name (`comm`), or an empty string if it is gone."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def kill(pids: list[int], sig: int = signal.SIGKILL) -> None:
    """Sends `sig` to each pid that still exists."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)
