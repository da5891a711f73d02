"""`python -m managed_agents.mesh_watchdog TOKEN GRACE STATE_FILE`: stops a local mesh whose `up` died.

`LocalMesh` starts this before any service, holding the only write end of a pipe that is its stdin. The pipe
reaches end of file when the mesh's owner exits, however it exits, SIGKILL included (a process cannot set a
parent-death signal on the services it starts: `preexec_fn` is unsafe in a threaded process). The watchdog then
stops whatever of the mesh is left: SIGTERM, and SIGKILL (to the process group of each service, which leads its
own) after GRACE seconds. After a clean stop nothing is left, and it just exits.

It finds the mesh's processes two ways: the lines its owner writes (`+PID` when a service serves, `-PID` once it
stopped and was reaped, so a reused pid is never hit) and, on Linux, every process whose environment holds
`MANAGED_AGENTS_MESH_RUN=TOKEN` (each service, from the moment it is spawned, and their children that keep the
environment). A line `=JSON` is the mesh's state file as its owner wrote it; if STATE_FILE still holds exactly
that, it is removed, so that no stale `mesh.json` points the CLI at dead addresses.

Standard library only: it starts fast and small.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from pathlib import Path

RUN_ENV = "MANAGED_AGENTS_MESH_RUN"


def marked(token: str) -> set[int]:
    """Processes whose environment holds `MANAGED_AGENTS_MESH_RUN=token` (empty where /proc is missing)."""
    entry = f"\0{RUN_ENV}={token}\0".encode()
    found: set[int] = set()
    try:
        names = os.listdir("/proc")
    except OSError:
        return found
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as environ:
                if entry in b"\0" + environ.read() + b"\0":
                    found.add(int(name))
        except OSError:  # gone, or not ours to read
            continue
    return found


def alive(pid: int) -> bool:
    """True while `pid` runs (a zombie waiting to be reaped does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rpartition(b")")[2].split()[:1] != [b"Z"]
    except OSError:
        return True  # no /proc: trust kill(0)


def _send(pid: int, signum: int, *, group: bool = False) -> None:
    try:
        if group and os.getpgid(pid) == pid:
            os.killpg(pid, signum)
        else:
            os.kill(pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def stop(pids: set[int], grace: float) -> set[int]:
    """SIGTERM to `pids`, and SIGKILL to the groups of those still running after `grace` s; returns the
    pids that had to be killed."""
    running = {pid for pid in pids if alive(pid)}
    for pid in running:
        _send(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while running and time.monotonic() < deadline:
        time.sleep(0.05)
        running = {pid for pid in running if alive(pid)}
    for pid in running:
        _send(pid, signal.SIGKILL, group=True)
    return running


def _log(text: str) -> None:
    sys.stderr.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} mesh_watchdog: {text}\n")
    sys.stderr.flush()


def main(argv: list[str]) -> None:
    """Waits for end of file on stdin, then stops what is left of the mesh."""
    token, grace, state_file = argv[0], float(argv[1]), Path(argv[2])
    # Not stopped by the terminal's signals (it runs in a session of its own anyway): its owner's death counts.
    for signum in (signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    started: set[int] = set()
    state = None
    for raw in sys.stdin.buffer:
        line = raw.decode(errors="replace").strip()
        if line[:1] == "+" and line[1:].isdigit():
            started.add(int(line[1:]))
        elif line[:1] == "-" and line[1:].isdigit():
            started.discard(int(line[1:]))
        elif line[:1] == "=":
            try:
                state = json.loads(line[1:])
            except ValueError:
                state = None
    left = (started | marked(token)) - {os.getpid()}
    if left:
        _log(f"the mesh's owner exited; stopping pids {sorted(left)}")
        killed = stop(left, grace)
        if killed:
            _log(f"killed pids {sorted(killed)} after {grace:.0f} s")
    with contextlib.suppress(OSError, ValueError):
        if state is not None and json.loads(state_file.read_text()) == state:
            state_file.unlink()
            _log(f"removed {state_file}")


if __name__ == "__main__":
    main(sys.argv[1:])
