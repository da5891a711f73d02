"""`managed-agents up` stops its whole mesh on SIGTERM and SIGHUP as on Ctrl-C, and its services do not
outlive it even when it is SIGKILLed (its watchdog stops them). Real processes throughout: `up` as a child of
the test, its services found in the process tree and in what it prints."""

from __future__ import annotations

import fcntl
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.slow

SERVICES = ("model", "store", "mcp_proxy", "hands", "brain")


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state first), or None if it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_bytes().rpartition(b")")[2].decode().split()
    except OSError:
        return None


def _alive(pid: int) -> bool:
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"


def _children(pid: int) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat(int(entry.name))) and int(fields[1]) == pid:
            found.add(int(entry.name))
    return found


class Up:
    """`managed-agents up` in `home`, its output in a file."""

    def __init__(self, home: Path, output: Path) -> None:
        self.home = home
        self.output = output
        env = {k: v for k, v in os.environ.items() if k not in ("ANTHROPIC_API_KEY", "FORCE_COLOR")}
        with output.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "managed_agents.cli", "up"],
                cwd=ROOT,
                env={**env, "MANAGED_AGENTS_HOME": str(home), "NO_COLOR": "1"},
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def text(self) -> str:
        return self.output.read_text(errors="replace")

    def serving(self, timeout: float = 90) -> set[int]:
        """Waits until the mesh is up; returns the pids of every process `up` started (services and watchdog)."""
        deadline = time.monotonic() + timeout
        while "stops it." not in self.text():
            assert self.proc.poll() is None, f"up exited with {self.proc.returncode}:\n{self.text()}"
            assert time.monotonic() < deadline, f"up did not serve within {timeout} s:\n{self.text()}"
            time.sleep(0.05)
        announced = {name: int(pid) for name, pid in re.findall(r"^(\w+)\s+\S+\s+pid (\d+)", self.text(), re.MULTILINE)}
        assert sorted(announced) == sorted(SERVICES), self.text()
        started = _children(self.proc.pid)
        assert set(announced.values()) < started, "the services, and the watchdog"
        assert (self.home / "mesh.json").exists()
        return started

    def signal(self, signum: int) -> int:
        self.proc.send_signal(signum)
        try:
            return self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()  # its watchdog stops the services
            self.proc.wait()
            name = signal.Signals(signum).name
            raise AssertionError(f"up did not stop within 15 s of {name}:\n{self.text()}") from None


def _store_lock_free(home: Path) -> bool:
    """True if a new store could take the data directory's lock (`session_store.sqlite._lock`)."""
    fd = os.open(home / "store" / "LOCK", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True


def _assert_gone(pids: set[int], within: float) -> None:
    deadline = time.monotonic() + within
    while (left := {pid for pid in pids if _alive(pid)}) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not left, f"still running: {left}"


@pytest.mark.parametrize(
    ("signum", "code"),
    [pytest.param(signal.SIGTERM, 143, id="SIGTERM"), pytest.param(signal.SIGHUP, 129, id="SIGHUP")],
)
def test_a_signal_stops_the_whole_mesh_as_ctrl_c_does(tmp_path: Path, signum: int, code: int) -> None:
    home = tmp_path / "home"
    first = Up(home, tmp_path / "first.out")
    started = first.serving()
    assert first.signal(signum) == code, first.text()
    _assert_gone(started, within=1)  # `up` waited for each of them
    assert "stopping the mesh" in first.text()
    assert not (home / "mesh.json").exists()
    assert _store_lock_free(home)
    if signum != signal.SIGTERM:
        return

    second = Up(home, tmp_path / "second.out")  # the same home: the store's lock is free again
    started = second.serving()
    assert second.signal(signal.SIGINT) == 130, second.text()
    _assert_gone(started, within=1)
    assert not (home / "mesh.json").exists()


def test_the_services_do_not_outlive_a_killed_up(tmp_path: Path) -> None:
    home = tmp_path / "home"
    up = Up(home, tmp_path / "up.out")
    started = up.serving()
    assert up.signal(signal.SIGKILL) == -signal.SIGKILL
    _assert_gone(started, within=15)
    assert _store_lock_free(home)
    assert not (home / "mesh.json").exists(), "the watchdog removed the stale addresses"
    assert "the mesh's owner exited" in (home / "logs" / "mesh_watchdog.log").read_text()
