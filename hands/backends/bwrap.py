"""The embedded default backend: bubblewrap. Each sandbox is a shell in new user, PID, IPC, UTS, mount, cgroup
and network namespaces (no network at all, not even to the host's loopback), with read-only system
directories, a private writable /workspace, a private /tmp, a clean environment, and its limits enforced by
cgroups where the host allows (else rlimits). `--die-with-parent`: no sandbox outlives the hands process."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

from hands.backend import CONTROL_MOUNT, EGRESS_CA_FILE, WORKSPACE_MOUNT, Enforcement, LimitEvents, Limits, SandboxPaths
from hands.backends.subprocess_shell import SubprocessShell
from hands.limits import LimitGroups, scope_of
from managed_agents.mesh.errors import SandboxUnavailable

# Read-only views of the host that programs need to run; nothing else of the host is visible.
_SYSTEM_BINDS = (
    "/usr",
    "/etc/alternatives",
    "/etc/ssl",
    "/etc/ld.so.cache",
    "/etc/localtime",
    "/etc/mime.types",
)
_SYSTEM_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
SANDBOX_PATH = "/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin"


def sandbox_environment() -> dict[str, str]:
    """The whole environment a sandboxed shell starts with: nothing from the server's own."""
    return {
        "PATH": SANDBOX_PATH,
        "HOME": WORKSPACE_MOUNT,
        "LANG": "C.UTF-8",
        "TERM": "dumb",
        "USER": "sandbox",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PAGER": "cat",
        "GIT_PAGER": "cat",
    }


class BwrapBackend:
    """`SandboxBackend` on bubblewrap."""

    name = "bwrap"

    def __init__(self, groups: LimitGroups, bwrap: str) -> None:
        self._groups = groups
        self._bwrap = bwrap

    @classmethod
    def create_default(cls, work_root: Path) -> BwrapBackend:
        """A backend with the strongest limits the host allows, for the sandboxes in `work_root`; refuses with a
        sentence if bwrap is missing. Removes the empty limit groups an earlier server there left behind."""
        bwrap = shutil.which("bwrap")
        if bwrap is None:
            raise RuntimeError(
                "bubblewrap (bwrap) is not installed: `sudo apt-get install bubblewrap` (make run/test do it), "
                "or start hands with --backend docker"
            )
        groups = LimitGroups.detect(scope=scope_of(work_root))
        groups.sweep()
        return cls(groups, bwrap)

    @property
    def enforcement(self) -> Enforcement:
        return self._groups.mode

    def argv(self, paths: SandboxPaths) -> list[str]:
        """The bwrap command line of a sandbox's shell."""
        argv = [self._bwrap]
        for path in _SYSTEM_BINDS:
            if os.path.exists(path):
                argv += ["--ro-bind", path, path]
        # Debian's merged /usr: /bin, /lib, ... are symlinks into /usr.
        for link in ("bin", "lib", "lib64", "sbin"):
            if os.path.islink(f"/{link}"):
                argv += ["--symlink", os.readlink(f"/{link}"), f"/{link}"]
        mounts = [
            ("--proc", "/proc"),
            ("--dev", "/dev"),
            ("--tmpfs", "/tmp"),
            ("--ro-bind", str(paths.root / "etc" / "passwd"), "/etc/passwd"),
            ("--ro-bind", str(paths.root / "etc" / "group"), "/etc/group"),
            ("--symlink", "/proc/self/mounts", "/etc/mtab"),
            ("--bind", str(paths.workspace), WORKSPACE_MOUNT),
            ("--ro-bind", str(paths.control), CONTROL_MOUNT),
            ("--chdir", WORKSPACE_MOUNT),
        ]
        egress_ca = paths.control / EGRESS_CA_FILE
        if egress_ca.exists() and os.path.exists(_SYSTEM_CA_BUNDLE):
            # A sandbox with secrets reaches HTTPS only through its egress relay, so the relay's CA is the one
            # it trusts, for programs that read the system bundle as well as for those told by SSL_CERT_FILE.
            mounts.insert(-1, ("--ro-bind", str(egress_ca), _SYSTEM_CA_BUNDLE))
        for mount in mounts:
            argv += mount
        argv += ["--unshare-all", "--hostname", "sandbox", "--die-with-parent", "--new-session", "--clearenv"]
        for key, value in sandbox_environment().items():
            argv += ["--setenv", key, value]
        return [*argv, "/bin/bash", "--noprofile", "--norc"]

    async def create(self, sandbox_id: str, paths: SandboxPaths, limits: Limits) -> None:
        # Programs expect a user database; the sandbox gets its own two-line one, never the host's.
        etc = paths.root / "etc"
        etc.mkdir(exist_ok=True)
        (etc / "passwd").write_text(
            f"root:x:0:0:sandbox:{WORKSPACE_MOUNT}:/bin/bash\nnobody:x:65534:65534::/nonexistent:/bin/false\n"
        )
        (etc / "group").write_text("root:x:0:\nnogroup:x:65534:\n")
        try:
            await asyncio.to_thread(self._groups.create, sandbox_id, limits)
        except OSError as error:
            raise SandboxUnavailable(f"cannot set up the sandbox's limits: {error}") from error

    async def start_shell(self, sandbox_id: str, paths: SandboxPaths, limits: Limits) -> SubprocessShell:
        process = await asyncio.create_subprocess_exec(
            *self._groups.wrap(sandbox_id, limits, self.argv(paths)),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=sandbox_environment(),
            cwd=str(paths.workspace),
        )
        # The `sh`/`prlimit` wrappers exec into bwrap, so only bwrap processes stand between us and the shell.
        return SubprocessShell(process, wrapper_names=frozenset({"bwrap"}))

    async def lost_reason(self, sandbox_id: str) -> str | None:
        if self._groups.oom_kills(sandbox_id):
            return "it ran out of memory (the kernel killed its shell at the sandbox's memory limit)"
        return None

    async def limit_events(self, sandbox_id: str) -> LimitEvents:
        return LimitEvents(self._groups.oom_kills(sandbox_id), self._groups.process_limit_hits(sandbox_id))

    async def destroy(self, sandbox_id: str, paths: SandboxPaths) -> None:
        self._groups.kill_all(sandbox_id)
        # Groups can only be removed once the kernel has reaped their last process.
        for _ in range(50):
            self._groups.remove(sandbox_id)
            if not self._groups.exists(sandbox_id):
                return
            await asyncio.sleep(0.02)

    async def aclose(self) -> None:
        return None
