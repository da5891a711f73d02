"""The embedded default backend: bubblewrap.

Each sandbox's shell runs in new user, PID, IPC, UTS, mount, cgroup and network namespaces (no network at all,
not even to the host's loopback), as a host identity of its own (`hands.identities`: a uid no other sandbox or
account has), with no capabilities anywhere, no way to make further user namespaces, and a seccomp filter
(`hands.seccomp`) refusing the system calls a coding sandbox never needs. Its view of the filesystem is the
host's system directories read-only and its own disk (`hands.disk`) as /workspace and /tmp: no path of the host
appears anywhere inside, and its PID 1 is its own shell driver, not a host program naming host paths. Limits
are enforced by cgroups where the host allows (else rlimits). `--die-with-parent`: no sandbox outlives the
hands process.

Hosts that cannot give an unprivileged process a user namespace get a refusal at start, unless the operator
passes `--without-user-namespace`: then bwrap sets the namespaces up as root and the shell drops to the
sandbox's identity inside, so a sandbox is still an unprivileged uid with no capabilities, but that uid is
the same inside and out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import subprocess
from pathlib import Path

from hands import seccomp
from hands.backend import (
    CONTROL_MOUNT,
    EGRESS_CA_FILE,
    INSIDE_UID,
    SHELL_BINARY,
    WORKSPACE_MOUNT,
    Enforcement,
    LimitEvents,
    Limits,
    Posture,
    SandboxPaths,
)
from hands.backends.subprocess_shell import SubprocessShell, open_status_pipe
from hands.identities import Identity
from hands.limits import LimitGroups, scope_of
from hands.shell import DRIVER, STATE_MOUNT
from managed_agents.mesh.errors import SandboxUnavailable

log = logging.getLogger(__name__)

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
_STATUS_FD = 3  # the driver's status channel, inside
_STATE_BYTES = 16 << 20  # the tmpfs of the shell's carried-over state
_INTERPRETER = "/usr/bin/bash"


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


def user_namespace_problem(bwrap: str, identity: Identity) -> str:
    """Why an unprivileged process cannot make the sandbox's namespaces here ('' if it can)."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return "setpriv (util-linux) is missing"
    argv = [
        setpriv,
        f"--reuid={identity.uid}",
        f"--regid={identity.gid}",
        "--clear-groups",
        "--",
        bwrap,
        "--ro-bind",
        "/usr",
        "/usr",
        *_MERGED_USR_LINKS(),
        "--unshare-all",
        "--unshare-user",
        "--disable-userns",
        "--die-with-parent",
        "/usr/bin/true",
    ]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False, cwd="/")
    except (OSError, subprocess.TimeoutExpired) as error:
        return str(error)
    return "" if done.returncode == 0 else (done.stderr.strip() or f"exit status {done.returncode}")


def _MERGED_USR_LINKS() -> list[str]:  # a constant computed from the host
    """Debian's merged /usr: /bin, /lib, ... are symlinks into /usr."""
    links: list[str] = []
    for link in ("bin", "lib", "lib64", "sbin"):
        if os.path.islink(f"/{link}"):
            links += ["--symlink", os.readlink(f"/{link}"), f"/{link}"]
    return links


class BwrapBackend:
    """`SandboxBackend` on bubblewrap."""

    name = "bwrap"

    def __init__(self, groups: LimitGroups, bwrap: str, *, seccomp_program: Path, user_namespace: bool = True) -> None:
        self._groups = groups
        self._bwrap = bwrap
        self._setpriv = shutil.which("setpriv") or "/usr/bin/setpriv"
        self._seccomp = seccomp_program
        self._user_namespace = user_namespace

    @classmethod
    def create_default(
        cls, work_root: Path, *, probe_identity: Identity, without_user_namespace: bool = False
    ) -> BwrapBackend:
        """A backend with the strongest confinement and limits the host allows, for the sandboxes in `work_root`;
        refuses with a sentence if bwrap is missing or, unless told to do without, the host gives no user
        namespace. Removes the empty limit groups an earlier server there left behind."""
        bwrap = shutil.which("bwrap")
        if bwrap is None:
            raise RuntimeError(
                "bubblewrap (bwrap) is not installed: `sudo apt-get install bubblewrap` (make run/test do it), "
                "or start hands with --backend docker"
            )
        if os.geteuid() != 0:
            raise RuntimeError(
                "hands with --backend bwrap runs as root, to give every sandbox a host identity of its own and "
                "a disk of its own; start it as root, or use --backend docker"
            )
        user_namespace = True
        problem = user_namespace_problem(bwrap, probe_identity)
        if problem:
            if not without_user_namespace:
                raise RuntimeError(
                    f"this host does not let an unprivileged process make a user namespace ({problem}), so "
                    "sandboxes cannot be confined as designed. Enable user namespaces (sysctl "
                    "user.max_user_namespaces > 0, kernel.unprivileged_userns_clone=1 where it exists, and no "
                    "AppArmor rule refusing them to bwrap), or start hands with --without-user-namespace to run "
                    "sandboxes as unprivileged host uids without one"
                )
            log.warning(
                "running sandboxes WITHOUT a user namespace (--without-user-namespace): %s. Each sandbox is "
                "still an unprivileged uid of its own with no capabilities and the syscall filter",
                problem,
            )
            user_namespace = False
        groups = LimitGroups.detect(scope=scope_of(work_root))
        groups.sweep()
        work_root.mkdir(parents=True, exist_ok=True)
        program = seccomp.write_program(work_root / ".seccomp.bpf")
        return cls(groups, bwrap, seccomp_program=program, user_namespace=user_namespace)

    @property
    def enforcement(self) -> Enforcement:
        return self._groups.mode

    @property
    def posture(self) -> Posture:
        return Posture(
            user_namespace=self._user_namespace,
            own_identity=True,
            seccomp=seccomp.SUMMARY,
            read_only_system=True,
        )

    def needs_identity(self) -> bool:
        return True

    def argv(self, paths: SandboxPaths, identity: Identity, seccomp_fd: int) -> list[str]:
        """The bwrap command line of a sandbox's shell (host paths appear here, outside, and nowhere inside)."""
        # Directories bwrap makes on its own are 0700 when it runs as root (without a user namespace): closed to
        # the sandbox's identity. These are made open first.
        argv = [self._bwrap, "--perms", "0755", "--dir", "/etc", "--perms", "0755", "--dir", "/run"]
        for path in _SYSTEM_BINDS:
            if os.path.exists(path):
                argv += ["--ro-bind", path, path]
        argv += _MERGED_USR_LINKS()
        control = paths.control
        mounts = [
            ("--proc", "/proc"),
            ("--dev", "/dev"),
            ("--bind", str(paths.tmp), "/tmp"),
            ("--ro-bind", str(control / "passwd"), "/etc/passwd"),
            ("--ro-bind", str(control / "group"), "/etc/group"),
            ("--symlink", "/proc/self/mounts", "/etc/mtab"),
            ("--bind", str(paths.workspace), WORKSPACE_MOUNT),
            ("--ro-bind", str(control), CONTROL_MOUNT),
            ("--perms", "01777", "--size", str(_STATE_BYTES), "--tmpfs", STATE_MOUNT),
            ("--chdir", WORKSPACE_MOUNT),
        ]
        egress_ca = control / EGRESS_CA_FILE
        if egress_ca.exists() and os.path.exists(_SYSTEM_CA_BUNDLE):
            # A sandbox with secrets reaches HTTPS only through its egress relay, so the relay's CA is the one
            # it trusts, for programs that read the system bundle as well as for those told by SSL_CERT_FILE.
            mounts.insert(-1, ("--ro-bind", str(egress_ca), _SYSTEM_CA_BUNDLE))
        for mount in mounts:
            argv += mount
        # Every namespace; the user namespace below, with the mode (`--unshare-all` would make one even as root,
        # mapping only root, where the shell could then not become its identity).
        namespaces = ["--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try"]
        argv += [*namespaces, "--hostname", "sandbox", "--die-with-parent", "--new-session", "--as-pid-1"]
        argv += ["--seccomp", str(seccomp_fd), "--clearenv"]
        for key, value in sandbox_environment().items():
            argv += ["--setenv", key, value]
        driver = [f"{CONTROL_MOUNT}/{SHELL_BINARY}", f"{CONTROL_MOUNT}/{DRIVER}", str(_STATUS_FD)]
        if self._user_namespace:
            # bwrap runs as the sandbox's identity: the kernel maps it to uid 1000 in a user namespace it owns.
            argv += ["--unshare-user", "--disable-userns", "--uid", str(INSIDE_UID), "--gid", str(INSIDE_UID)]
            return [*argv, *driver]
        # Without a user namespace bwrap needs root to make the others; the shell drops to the identity inside.
        # setpriv keeps what it needs to drop, then drops it all; the workspace (0700, the identity's) is entered
        # by the driver once it runs as the identity, not by bwrap as root without capabilities.
        keep = ("CAP_SETUID", "CAP_SETGID", "CAP_SETPCAP")
        argv = [arg if arg != WORKSPACE_MOUNT or argv[i - 1] != "--chdir" else "/" for i, arg in enumerate(argv)]
        argv += ["--cap-drop", "ALL", *(arg for cap in keep for arg in ("--cap-add", cap))]
        return [*argv, *self._become(identity), "--no-new-privs", "--", *driver]

    def _become(self, identity: Identity) -> list[str]:
        """setpriv's arguments that make the rest run as `identity`, with no group and no capability left."""
        return [
            self._setpriv,
            f"--reuid={identity.uid}",
            f"--regid={identity.gid}",
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
        ]

    async def create(self, sandbox_id: str, paths: SandboxPaths, limits: Limits, identity: Identity | None) -> None:
        assert identity is not None, "bwrap sandboxes always have an identity"
        control = paths.control
        # Programs expect a user database; the sandbox gets its own two-line one, never the host's.
        uid = INSIDE_UID if self._user_namespace else identity.uid
        (control / "passwd").write_text(
            f"sandbox:x:{uid}:{uid}:sandbox:{WORKSPACE_MOUNT}:/bin/bash\nnobody:x:65534:65534::/nonexistent:/bin/false\n"
        )
        (control / "group").write_text(f"sandbox:x:{uid}:\nnogroup:x:65534:\n")
        # The interpreter of the shell's driver: executable by the sandbox, not readable (see hands.shell).
        shell = control / SHELL_BINARY
        if not shell.exists():
            await asyncio.to_thread(shutil.copyfile, _INTERPRETER, shell)
            os.chmod(shell, 0o111)
        try:
            await asyncio.to_thread(self._groups.create, sandbox_id, limits)
        except OSError as error:
            raise SandboxUnavailable(f"cannot set up the sandbox's limits: {error}") from error

    async def start_shell(
        self, sandbox_id: str, paths: SandboxPaths, limits: Limits, identity: Identity | None
    ) -> SubprocessShell:
        assert identity is not None, "bwrap sandboxes always have an identity"
        status_read, status_write = os.pipe()
        seccomp_fd = os.open(self._seccomp, os.O_RDONLY | os.O_CLOEXEC)
        os.set_inheritable(seccomp_fd, True)
        inner = self.argv(paths, identity, seccomp_fd)
        if self._user_namespace:
            inner = [*self._become(identity), "--", *inner]
        # The wrapper joins the limit groups (as root), puts the status pipe on the driver's fd 3, and execs the
        # rest, so the processes between hands and the shell are only bwrap's.
        move = f"exec {_STATUS_FD}>&{status_write} {status_write}>&-"
        try:
            process = await asyncio.create_subprocess_exec(
                *self._groups.wrap(sandbox_id, limits, inner, prelude=move),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                env=sandbox_environment(),
                cwd="/",
                pass_fds=(status_write, seccomp_fd),
            )
        finally:
            os.close(status_write)
            os.close(seccomp_fd)
        try:
            status = await open_status_pipe(status_read)
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            raise
        return SubprocessShell(process, status, wrapper_names=frozenset({"bwrap"}))

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
