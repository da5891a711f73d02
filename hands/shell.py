"""A persistent shell in a sandbox, driven so that nothing a command prints or does can forge its end.

The sandbox's shell process is a *driver* (the script `DRIVER` below), started from an interpreter the sandbox
may execute but not read: the kernel then makes the driver non-dumpable, so no process of the sandbox can open
its file descriptors (`/proc/1/fd/...`), read its memory or trace it. The driver holds two channels to hands
that no command ever holds:

- its standard input, on which hands writes one line per command: the command's sequence number (the command
  itself is in `cmd.sh` of the control directory, which the sandbox can read but not write);
- a status descriptor, on which the driver writes `<seq> <exit status> <token>` once the command's process
  has ended.

Each command runs in a child of the driver (a subshell) that closes both channels before the command's first
byte runs, so a command can only write output. The end of a call is the status line, which only the driver
writes; the output belonging to the call is what came before the line `__managed_agents_end_<token>`, whose
random token the driver draws after the command has ended, so no command can print it in advance.

A command's state carries over to the next call as a persistent shell's does: the subshell saves its
variables, functions, aliases, options, umask and working directory on exit, and the next one restores them.
Background processes keep running; what they print after their call ended shows up in the next call's output.
A command stopped at its time limit (killed) keeps the state from before it.

Every buffer here is bounded: output keeps a head and a tail once past `OUTPUT_LIMIT`, and status lines are
short by construction and cut if not.
"""

from __future__ import annotations

import asyncio
import os
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from hands.backend import ShellProcess

OUTPUT_LIMIT = 30_000  # bytes kept of one command's output (head and tail halves)
DRIVER = "driver.sh"
# The command of the current call, rewritten in place for each call: made with the driver, so that a sandbox
# whose disk is out of inodes (hands writes there as root, from the blocks ext4 keeps for root) still gets it.
COMMAND = "cmd.sh"
END_PREFIX = b"__managed_agents_end_"
STATE_MOUNT = "/run/shell"  # a private tmpfs of each shell, holding the state its calls carry over
_STATUS_LINE_LIMIT = 256
# Output held back from the capture while the end token is not yet known: the end line is the last thing the
# driver prints for a call, so it is within this window of the stream unless a background job floods it.
_HOLD = 64 * 1024
_END_GRACE_S = 2.0  # after the status: how long the end line may lag behind it on the output pipe
_KILL_GRACE_S = 3.0  # after a timeout: how long the driver gets to report the killed command
# Every variable name starts with one of these: a prefix expansion each lists all names without a fork.
_NAME_PREFIXES = " ".join(f"${{!{c}*}}" for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_")


def driver_script(control_inside: str, environment: Mapping[str, str]) -> str:
    """The driver, for bash (full state carried over) or a POSIX sh (working directory and exported variables
    only, for images without bash). Its one argument is the number of its status descriptor."""
    exports = "".join(f"export {key}={shlex.quote(value)}\n" for key, value in environment.items())
    return f"""# The shell driver of a managed-agents sandbox (see hands/shell.py). Not a place for commands.
if [ -n "${{BASH_VERSION:-}}" ]; then set +o posix; fi
cd -- "${{HOME:-/workspace}}" 2>/dev/null
{exports}__ma_dir={shlex.quote(control_inside)}
__ma_command={COMMAND}
__ma_state={STATE_MOUNT}/state
__ma_fd=${{1:-3}}
case $__ma_fd in [0-9]) ;; *) echo "the status descriptor must be one digit" >&2; exit 2 ;; esac
if [ -n "${{BASH_VERSION:-}}" ]; then
  # Variables by name (no fork: a prefix expansion per letter), less bash's own and the driver's, which a
  # new subshell has already and could not take again (a read-only one would end it).
  __ma_vars() {{
    local __ma_n
    for __ma_n in {_NAME_PREFIXES}; do
      case $__ma_n in
        BASH|BASH[A-Z_]*|EUID|PPID|UID|SHELLOPTS|SHLVL|RANDOM|SRANDOM|SECONDS|LINENO|EPOCH*|FUNCNAME|GROUPS) ;;
        HISTCMD|DIRSTACK|PIPESTATUS|OPTIND|OPTERR|PWD|OLDPWD|_|__ma_*|COMP_WORDBREAKS|HOSTNAME|HOSTTYPE) ;;
        MACHTYPE|OSTYPE|IFS|PS4) ;;
        *) declare -p "$__ma_n" ;;
      esac
    done
  }}
  __ma_save() {{
    {{ __ma_vars; declare -f; alias -p; shopt -p; set +o; umask -p; printf 'cd -- %q\\n' "$PWD"; }} \\
      >"$__ma_state" 2>/dev/null
  }}
  __ma_restore() {{ RANDOM=$SRANDOM; }}
  __ma_token() {{ __ma_end=$SRANDOM$SRANDOM$SRANDOM$SRANDOM; }}
else
  __ma_save() {{ export -p >"$__ma_state" 2>/dev/null; pwd >"$__ma_state.cwd" 2>/dev/null; }}
  __ma_restore() {{
    if [ -f "$__ma_state.cwd" ] && IFS= read -r __ma_cwd <"$__ma_state.cwd"; then cd -- "$__ma_cwd" 2>/dev/null; fi
  }}
  __ma_token() {{ __ma_end=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \\n'); }}
fi
# A command may signal PID 1, the driver: it ignores the signals a shell would otherwise act on while waiting.
trap '' INT QUIT
while IFS= read -r __ma_seq; do
  case $__ma_seq in ''|*[!0-9]*) continue ;; esac
  (
    eval "exec $__ma_fd>&-"
    exec </dev/null 2>&1
    trap - INT QUIT
    readonly __ma_seq __ma_dir __ma_command __ma_state __ma_fd
    if [ -f "$__ma_state" ]; then . "$__ma_state" 2>/dev/null; fi
    __ma_restore
    trap __ma_save EXIT
    . "$__ma_dir/$__ma_command"
  )
  __ma_code=$?
  __ma_token
  printf '\\n__managed_agents_end_%s\\n' "$__ma_end"
  printf '%s %s %s\\n' "$__ma_seq" "$__ma_code" "$__ma_end" >&"$__ma_fd"
done
"""


def write_driver(control: Path, control_inside: str, environment: Mapping[str, str]) -> None:
    """Writes the driver and the command file into a sandbox's control directory (read-only inside), once: a
    sandbox's environment never changes, and a new file would need an inode its filesystem may no longer have."""
    path = control / DRIVER
    if not path.exists():
        tmp = path.with_suffix(".tmp")
        tmp.write_text(driver_script(control_inside, environment))
        os.chmod(tmp, 0o644)
        tmp.replace(path)
    (control / COMMAND).touch(mode=0o644)


class CommandNotDelivered(Exception):
    """The command could not be written for the shell (its disk is full to the last block): nothing ran."""


@dataclass(frozen=True, slots=True)
class ShellResult:
    """The outcome of one command."""

    output: str
    exit_code: int | None
    timed_out: bool = False
    truncated: bool = False
    # The shell is gone: it was killed (the caller decides whether that means lost).
    shell_ended: bool = False
    restarted_after_timeout: bool = False


class _Capture:
    """Keeps the first and last `limit // 2` bytes of a stream and counts the rest."""

    def __init__(self, limit: int) -> None:
        self._half = limit // 2
        self._head = bytearray()
        self._tail = bytearray()
        self.total = 0

    def add(self, data: bytes | bytearray) -> None:
        self.total += len(data)
        room = self._half - len(self._head)
        if room > 0:
            self._head += data[:room]
            data = data[room:]
        if data:
            self._tail += data[-self._half :]
            if len(self._tail) > self._half:
                del self._tail[: len(self._tail) - self._half]

    def text(self) -> tuple[str, bool]:
        cut = self.total - len(self._head) - len(self._tail)
        head = self._head.decode(errors="replace")
        if cut <= 0:
            return head + self._tail.decode(errors="replace"), False
        marker = f"\n[... {cut} bytes of output cut here; the first and last {self._half} bytes are kept ...]\n"
        return head + marker + self._tail.decode(errors="replace"), True


@dataclass(frozen=True, slots=True)
class _Status:
    seq: int
    code: int
    token: bytes


def parse_status(line: bytes) -> _Status | None:
    """A status line of the driver, or None for anything else (never raises)."""
    parts = line.split()
    if len(parts) != 3 or not parts[0].isdigit() or not parts[1].isdigit() or not parts[2].isalnum():
        return None
    seq, code = int(parts[0]), int(parts[1])
    if seq >= 2**62 or code > 255:
        return None
    return _Status(seq, code, parts[2])


class Shell:
    """One sandbox shell (its driver) and the protocol to run commands in it, one at a time."""

    def __init__(self, process: ShellProcess, *, control_host: str) -> None:
        self._process = process
        self._control_host = control_host
        self._seq = 0
        self._status_buffer = bytearray()
        self._statuses: list[_Status] = []
        self._held = bytearray()
        self._output_task: asyncio.Task[bytes] | None = None
        self._status_task: asyncio.Task[bytes] | None = None
        self._output_ended = False
        self._status_ended = False
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
        self._seq += 1
        seq = self._seq
        script = os.path.join(self._control_host, COMMAND)
        try:
            # A few hundred bytes to a local file: cheaper inline than a hop to a thread. The previous call's
            # command has been read: its process ended before its status came.
            with open(script, "r+") as handle:  # noqa: ASYNC230
                handle.truncate()
                handle.write(command + "\n")
        except OSError as error:
            raise CommandNotDelivered(f"{error.strerror or error}") from None
        capture = _Capture(OUTPUT_LIMIT)
        try:
            await self._process.write(f"{seq}\n".encode())
        except OSError:
            self._ended = True
            return ShellResult("", None, shell_ended=True)
        loop = asyncio.get_running_loop()
        status = await self._until_status(seq, capture, loop.time() + timeout)
        timed_out = status is None and not self._status_ended
        if timed_out:
            await self._process.kill_children()
            status = await self._until_status(seq, capture, loop.time() + _KILL_GRACE_S)
            if status is None and not self._status_ended:
                # Nothing the driver runs should survive the kill; if it did, only a new shell is safe.
                await self.close()
                self._commit_held(capture)
                output, truncated = capture.text()
                note = (
                    f"\n[the command did not finish within {timeout:g} s and its processes could not be "
                    "stopped, so the shell was restarted: the working directory and environment variables "
                    "are back to their defaults]"
                )
                return ShellResult(
                    output + note, None, timed_out=True, truncated=truncated, restarted_after_timeout=True
                )
        if status is not None:
            await self._until_end(status.token, capture, loop.time() + _END_GRACE_S)
        self._commit_held(capture)
        output, truncated = capture.text()
        if status is None:
            self._ended = True
            return ShellResult(output, None, truncated=truncated, shell_ended=True)
        if timed_out:
            note = f"\n[the command did not finish within {timeout:g} s and was stopped; the shell is still usable]"
            return ShellResult(output + note, status.code, timed_out=True, truncated=truncated)
        return ShellResult(output, status.code, truncated=truncated)

    # Reading ---------------------------------------------------------------------------------------------

    def _commit_held(self, capture: _Capture) -> None:
        capture.add(self._held)
        self._held.clear()

    def _take_output(self, chunk: bytes, capture: _Capture) -> None:
        self._held += chunk
        if len(self._held) > _HOLD:
            capture.add(self._held[: len(self._held) - _HOLD])
            del self._held[: len(self._held) - _HOLD]

    def _take_status(self, chunk: bytes) -> None:
        self._status_buffer += chunk
        while (end := self._status_buffer.find(b"\n")) >= 0:
            status = parse_status(bytes(self._status_buffer[:end]))
            del self._status_buffer[: end + 1]
            if status is not None:
                self._statuses.append(status)
        # A line longer than any status is not one (the interpreter complaining on its own stderr, say).
        if len(self._status_buffer) > _STATUS_LINE_LIMIT:
            self._status_buffer.clear()

    async def _next(self, deadline: float) -> bool:
        """Waits for the next output or status bytes until `deadline`; False on time-out or both streams' end."""
        if self._output_task is None and not self._output_ended:
            self._output_task = asyncio.ensure_future(self._process.read())
        if self._status_task is None and not self._status_ended:
            self._status_task = asyncio.ensure_future(self._process.read_status())
        pending = {t for t in (self._output_task, self._status_task) if t is not None}
        if not pending:
            return False
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining <= 0:
            return False
        done, _ = await asyncio.wait(pending, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
        return bool(done)

    def _collect(self, capture: _Capture) -> None:
        """Takes what the finished reads brought."""
        if self._output_task is not None and self._output_task.done():
            task, self._output_task = self._output_task, None
            chunk = b"" if task.cancelled() or task.exception() else task.result()
            if chunk:
                self._take_output(chunk, capture)
            else:
                self._output_ended = True
        if self._status_task is not None and self._status_task.done():
            task, self._status_task = self._status_task, None
            chunk = b"" if task.cancelled() or task.exception() else task.result()
            if chunk:
                self._take_status(chunk)
            else:
                self._status_ended = True

    async def _until_status(self, seq: int, capture: _Capture, deadline: float) -> _Status | None:
        """The status of call `seq`, feeding output to `capture` meanwhile; None on time-out or the driver's end."""
        while True:
            while self._statuses:
                status = self._statuses.pop(0)
                if status.seq == seq:
                    return status
            if self._status_ended or not await self._next(deadline):
                return None
            self._collect(capture)

    async def _until_end(self, token: bytes, capture: _Capture, deadline: float) -> None:
        """Moves the output before the end line of `token` to `capture`, and drops the line."""
        line = b"\n" + END_PREFIX + token + b"\n"
        while True:
            index = self._held.find(line)
            if index >= 0:
                capture.add(self._held[:index])
                del self._held[: index + len(line)]
                return
            if self._output_ended or not await self._next(deadline):
                return
            self._collect(capture)

    async def close(self) -> None:
        """Kills the shell."""
        self._ended = True
        for task in (self._output_task, self._status_task):
            if task is not None:
                task.cancel()
        await self._process.terminate()
