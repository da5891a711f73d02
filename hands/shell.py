"""A persistent shell in a sandbox, driven like a terminal: commands run one after another in the same bash,
so the working directory, environment variables and background jobs carry over between calls.

Each command is written to a script in the sandbox's control directory and `source`d, so that any command
text (unbalanced quotes, heredocs, a syntax error) cannot derail the protocol; its end is a marker line with a
random nonce and the exit status. Output is stdout and stderr interleaved, kept to a head and a tail once it
passes the limit, with a line saying how much was cut.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
from collections.abc import Mapping
from dataclasses import dataclass

from hands.backend import ShellProcess

OUTPUT_LIMIT = 30_000  # characters kept of one command's output (head and tail halves)


@dataclass(frozen=True, slots=True)
class ShellResult:
    """The outcome of one command."""

    output: str
    exit_code: int | None
    timed_out: bool = False
    truncated: bool = False
    # The shell is gone: it exited (`exit`) or was killed (the caller decides whether that means lost).
    shell_ended: bool = False
    restarted_after_timeout: bool = False


class _Capture:
    """Keeps the first and last `limit // 2` bytes of a stream and counts the rest."""

    def __init__(self, limit: int) -> None:
        self._half = limit // 2
        self._head = bytearray()
        self._tail = bytearray()
        self.total = 0

    def add(self, data: bytes) -> None:
        self.total += len(data)
        room = self._half - len(self._head)
        if room > 0:
            self._head += data[:room]
            data = data[room:]
        if data:
            self._tail += data
            if len(self._tail) > self._half:
                del self._tail[: len(self._tail) - self._half]

    def text(self) -> tuple[str, bool]:
        cut = self.total - len(self._head) - len(self._tail)
        head = self._head.decode(errors="replace")
        if cut <= 0:
            return head + self._tail.decode(errors="replace"), False
        marker = f"\n[... {cut} bytes of output cut here; the first and last {self._half} bytes are kept ...]\n"
        return head + marker + self._tail.decode(errors="replace"), True


class Shell:
    """One bash process and the protocol to run commands in it, one at a time."""

    def __init__(
        self,
        process: ShellProcess,
        *,
        control_host: str,
        control_inside: str,
        environment: Mapping[str, str] | None = None,
    ) -> None:
        self._process = process
        self._environment = dict(environment or {})
        self._control_host = control_host
        self._control_inside = control_inside
        self._buffer = bytearray()
        self._counter = 0
        self._ended = False

    @property
    def process(self) -> ShellProcess:
        """The underlying shell process."""
        return self._process

    @property
    def ended(self) -> bool:
        """True once the shell has exited or been killed."""
        return self._ended or self._process.exit_description() is not None

    async def run(self, command: str, *, timeout: float) -> ShellResult:
        """Runs `command`; on timeout, stops what it started and returns what it printed."""
        if self._counter == 0:
            # An interrupt (sent on timeout) ends the command being sourced, not the shell. Variables of the
            # sandbox's own (its secrets' placeholders) are set in the shell, so every backend gets them alike.
            setup = "trap 'return 130 2>/dev/null' INT\n"
            setup += "".join(f"export {k}={shlex.quote(v)}\n" for k, v in self._environment.items())
            with contextlib.suppress(OSError):
                await self._process.write(setup.encode())
        self._counter += 1
        nonce = os.urandom(8).hex()
        name = f"cmd-{self._counter}-{nonce}.sh"
        script = os.path.join(self._control_host, name)
        # A few hundred bytes to a local file: cheaper inline than a hop to a thread.
        with open(script, "w") as handle:  # noqa: ASYNC230
            handle.write(command + "\n")
        marker = f"__managed_agents_done_{nonce}__".encode()
        # `printf` puts the marker on a line of its own even if the output did not end with a newline.
        # `.` (POSIX `source`) keeps the command's cd, exports and jobs in this shell.
        line = f". {self._control_inside}/{name} </dev/null 2>&1; printf '\\n%s %d\\n' {marker.decode()} $?\n"
        capture = _Capture(OUTPUT_LIMIT)
        try:
            try:
                await self._process.write(line.encode())
            except OSError:
                self._ended = True
                return ShellResult("", None, shell_ended=True)
            try:
                code = await asyncio.wait_for(self._until(marker, capture), timeout)
            except TimeoutError:
                return await self._after_timeout(marker, capture, timeout)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(script)
        output, truncated = capture.text()
        if code is None:
            self._ended = True
            return ShellResult(output, None, truncated=truncated, shell_ended=True)
        return ShellResult(output, code, truncated=truncated)

    async def _until(self, marker: bytes, capture: _Capture) -> int | None:
        """Feeds output to `capture` until the marker line; returns the exit status, or None at end of stream."""
        while True:
            index = self._buffer.find(marker)
            if index >= 0:
                end = self._buffer.find(b"\n", index)
                if end >= 0:
                    before = bytes(self._buffer[:index])
                    # Drop the newline printf added before the marker.
                    capture.add(before[:-1] if before.endswith(b"\n") else before)
                    status = int(self._buffer[index + len(marker) : end].strip() or b"0")
                    del self._buffer[: end + 1]
                    return status
            else:
                # Everything before a possible partial marker at the end is output.
                keep = len(marker) + 32
                if len(self._buffer) > keep:
                    capture.add(bytes(self._buffer[:-keep]))
                    del self._buffer[:-keep]
            chunk = await self._process.read()
            if not chunk:
                capture.add(bytes(self._buffer))
                self._buffer.clear()
                return None
            self._buffer += chunk

    async def _after_timeout(self, marker: bytes, capture: _Capture, timeout: float) -> ShellResult:
        await self._process.kill_children()
        try:
            code = await asyncio.wait_for(self._until(marker, capture), 3)
        except TimeoutError:
            # The command runs inside the shell itself (a shell loop): only a new shell stops it.
            await self._process.terminate()
            self._ended = True
            output, truncated = capture.text()
            note = (
                f"\n[the command did not finish within {timeout:g} s and was stopped by restarting the "
                "shell: the working directory and environment variables are back to their defaults]"
            )
            return ShellResult(output + note, None, timed_out=True, truncated=truncated, restarted_after_timeout=True)
        output, truncated = capture.text()
        note = f"\n[the command did not finish within {timeout:g} s and was stopped; the shell is still usable]"
        return ShellResult(output + note, code, timed_out=True, truncated=truncated, shell_ended=code is None)

    async def close(self) -> None:
        """Kills the shell."""
        self._ended = True
        await self._process.terminate()
