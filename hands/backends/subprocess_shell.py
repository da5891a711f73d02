"""`ShellProcess` over a local child process (bwrap and anything else started with a pipe to its shell)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal

from hands import procs


async def open_status_pipe(fd: int) -> asyncio.StreamReader:
    """A stream over the read end of a driver's status pipe (takes ownership of `fd`)."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=4096, loop=loop)
    try:
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb", 0))
    except BaseException:
        with contextlib.suppress(OSError):
            os.close(fd)
        raise
    return reader


class SubprocessShell:
    """A shell running as (a descendant of) a local child process."""

    def __init__(
        self, process: asyncio.subprocess.Process, status: asyncio.StreamReader, *, wrapper_names: frozenset[str]
    ) -> None:
        """`status` reads the driver's status channel; `wrapper_names` are the command names of processes between
        ours and the shell (e.g. `bwrap`)."""
        self._process = process
        self._status = status
        self._wrappers = wrapper_names

    async def write(self, data: bytes) -> None:
        assert self._process.stdin is not None
        self._process.stdin.write(data)
        await self._process.stdin.drain()

    async def read(self) -> bytes:
        assert self._process.stdout is not None
        return await self._process.stdout.read(65536)

    async def read_status(self) -> bytes:
        return await self._status.read(4096)

    def _sandbox_processes(self) -> tuple[int | None, list[int]]:
        """(the shell, every other process of the sandbox except the wrappers)."""
        tree = procs.descendants(self._process.pid)
        if not self._wrappers:
            return self._process.pid, tree
        inside = [pid for pid in tree if procs.command_name(pid) not in self._wrappers]
        if not inside:
            return None, []
        return inside[0], inside[1:]

    async def namespace_pid(self) -> int | None:
        # Right after the start, bwrap may not have forked the shell into the new namespaces yet.
        for _ in range(200):
            shell, _ = self._sandbox_processes()
            if shell is not None or self._process.returncode is not None:
                return shell
            await asyncio.sleep(0.01)
        return None

    async def kill_children(self) -> None:
        shell, _ = self._sandbox_processes()
        if shell is None:
            return
        # Everything but the driver goes, orphans re-parented to the namespace's init included. A fork bomb
        # refills freed slots faster than a sweep of kills empties them, so first stop everything (a stopped
        # process cannot fork), sweeping until no running process is left, then kill the lot.
        for _ in range(40):
            _, others = self._sandbox_processes()
            running = [pid for pid in others if not procs.stopped(pid)]
            if not running:
                break
            procs.kill(running, signal.SIGSTOP)
            await asyncio.sleep(0.01)
        for _ in range(40):
            _, others = self._sandbox_processes()
            if not others:
                break
            procs.kill(others, signal.SIGKILL)
            await asyncio.sleep(0.05)

    async def terminate(self) -> None:
        if self._process.returncode is None:
            procs.kill([*reversed(procs.descendants(self._process.pid)), self._process.pid], signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                self._process.kill()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._process.wait(), 5)
        if self._process.stdin is not None:
            self._process.stdin.close()
        # Let the transport see the pipes close, so it is released now rather than by the garbage collector.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._process.communicate(), 1)

    async def wait_exit(self, timeout: float) -> str | None:
        """How the shell ended, waiting up to `timeout` seconds for the kernel to report it."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._process.wait(), timeout)
        return self.exit_description()

    def exit_description(self) -> str | None:
        code = self._process.returncode
        if code is None:
            return None
        if code < 0:
            return f"killed by signal {signal.Signals(-code).name}"
        if code > 128:
            # bwrap reports a killed child as 128 + signal number.
            with contextlib.suppress(ValueError):
                return f"killed by signal {signal.Signals(code - 128).name}"
        return f"exited with code {code}"
