"""The `SandboxBackend` interface and the plain records it speaks.

A backend knows how to make an isolated place with a private workspace and start a shell in it; everything
above (tools, execution records, idempotency, idle reaping) is shared by all backends. Another engine
(Kubernetes, Firecracker) is another file in `hands/backends/` implementing these few methods.
"""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from hands.identities import Identity


class Enforcement(enum.IntEnum):
    """How limits are enforced; numbers match `managed_agents.v1.LimitEnforcement`."""

    CGROUP_V2 = 1
    CGROUP_V1 = 2
    RLIMIT = 3
    CONTAINER = 4


@dataclass(frozen=True, slots=True)
class Limits:
    """Resource limits of one sandbox, defaults filled in."""

    memory_bytes: int = 1 << 30
    max_processes: int = 256
    cpu_millis: int = 1000
    command_timeout_s: float = 120.0
    idle_ttl_s: float = 1800.0
    image: str = ""
    disk_bytes: int = 4 << 30


@dataclass(frozen=True, slots=True)
class LimitEvents:
    """Counters of a sandbox running into its limits."""

    oom_kills: int = 0
    process_limit_hits: int = 0


@dataclass(frozen=True, slots=True)
class Posture:
    """What confines a backend's sandboxes on this host, as the `Sandbox` resource states it."""

    user_namespace: bool
    # True when every sandbox runs as a host uid of its own (else they share hands' identity, or root's).
    own_identity: bool
    seccomp: str
    read_only_system: bool


@dataclass(frozen=True, slots=True)
class SandboxPaths:
    """Host paths of one sandbox. Its disk (`hands.disk`: a filesystem of its own, the size of its quota) is
    mounted at `mount`: `workspace` and `tmp` are what the sandbox sees as /workspace and /tmp, `control` holds
    the shell's driver and command files (read-only inside). `state` (execution records) stays outside the
    disk, never visible inside and never filled by the sandbox. The image file is in `root`."""

    root: Path

    @property
    def image(self) -> Path:
        return self.root / "disk.img"

    @property
    def mount(self) -> Path:
        # Not under the work root: bwrap runs as the sandbox's identity, which must be able to reach its disk,
        # and the work root's ancestors may be closed to other users (a home directory, pytest's tmp).
        return DISKS / self.root.name

    @property
    def workspace(self) -> Path:
        return self.mount / "workspace"

    @property
    def tmp(self) -> Path:
        return self.mount / "tmp"

    @property
    def control(self) -> Path:
        return self.mount / "control"

    @property
    def state(self) -> Path:
        return self.root / "state"

    def create(self) -> None:
        """Makes the host-side directories (the disk's own are made with it)."""
        for path in (self.root, self.state):
            path.mkdir(parents=True, exist_ok=True)


# Where the disks of sandboxes are mounted on the host, one directory per sandbox id (ids are unique).
DISKS = Path("/run/managed-agents/disks")
# Where the control directory appears inside every sandbox.
CONTROL_MOUNT = "/run/managed-agents"
# The shell's interpreter in the control directory: executable by the sandbox but not readable, so the kernel
# makes the process running it non-dumpable (see `hands.shell`). Named `sh` so that a busybox, which picks its
# applet by the name it runs as, is a shell; bash run as `sh` starts in POSIX mode, which the driver turns off.
SHELL_BINARY = "sh"
# The uid and gid a sandbox's processes have inside their user namespace (a host identity of its own outside).
INSIDE_UID = 1000
# The CA certificate of the egress relay, in the control directory of a sandbox that has secrets.
EGRESS_CA_FILE = "egress-ca.crt"
WORKSPACE_MOUNT = "/workspace"


class ShellProcess(Protocol):
    """A running shell in a sandbox: bytes in, bytes out (stdout and stderr merged), and its end."""

    async def write(self, data: bytes) -> None:
        """Sends bytes to the shell's stdin."""
        ...

    async def read(self) -> bytes:
        """The next output bytes; empty once the shell has exited."""
        ...

    async def read_status(self) -> bytes:
        """The next bytes of the driver's status channel (see `hands.shell`); empty once the shell has exited."""
        ...

    async def kill_children(self) -> None:
        """Kills every process of the sandbox but the shell's driver (to cut a command short)."""
        ...

    async def terminate(self) -> None:
        """Kills the shell and everything in it."""
        ...

    def exit_description(self) -> str | None:
        """None while the shell runs; else how it ended, for humans (`killed by signal 9`, ...).

        Called on the event loop before every tool call, so it must answer from what the backend already
        knows (a child's return code, the end of the shell's output stream, a status watch), never with a
        round trip to an engine or API; `wait_exit` is where waiting belongs."""
        ...

    async def wait_exit(self, timeout: float) -> str | None:
        """Like `exit_description`, after waiting up to `timeout` seconds for the shell to be reaped."""
        ...

    async def namespace_pid(self) -> int | None:
        """A host pid of a process inside the sandbox's namespaces (its shell), through which hands can enter
        the sandbox's network namespace; None if the sandbox does not run on this host's kernel."""
        ...


class SandboxBackend(Protocol):
    """Makes sandboxes and starts shells in them."""

    name: str

    @property
    def enforcement(self) -> Enforcement:
        """How this backend enforces limits on this host."""
        ...

    @property
    def posture(self) -> Posture:
        """What confines this backend's sandboxes on this host."""
        ...

    def needs_identity(self) -> bool:
        """True if every sandbox should be given a host identity of its own (`hands.identities`)."""
        ...

    async def create(self, sandbox_id: str, paths: SandboxPaths, limits: Limits, identity: Identity | None) -> None:
        """Prepares the sandbox (limit groups, container, the shell's interpreter in its control directory), its
        disk already mounted. Raises `SandboxUnavailable` if it cannot."""
        ...

    async def start_shell(
        self, sandbox_id: str, paths: SandboxPaths, limits: Limits, identity: Identity | None
    ) -> ShellProcess:
        """Starts a fresh shell in the sandbox: the driver (`hands.shell.DRIVER`, already written to the control
        directory) with its status channel, cwd /workspace, a clean environment, as `identity`."""
        ...

    async def lost_reason(self, sandbox_id: str) -> str | None:
        """Why the sandbox's shell died, if the backend can tell (out of memory, container removed)."""
        ...

    async def limit_events(self, sandbox_id: str) -> LimitEvents:
        """How often the sandbox ran into its limits so far (zeros if the backend cannot tell)."""
        ...

    async def destroy(self, sandbox_id: str, paths: SandboxPaths) -> None:
        """Removes the sandbox's processes, groups and container (not the directories)."""
        ...

    async def aclose(self) -> None:
        """Releases backend resources."""
        ...


async def read_all(stream: asyncio.StreamReader) -> bytes:
    """Reads whatever is available (at most 64 KiB), or b'' at end of stream."""
    return await stream.read(65536)
