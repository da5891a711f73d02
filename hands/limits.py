"""Resource limits of bwrap sandboxes, by whatever this host allows: a cgroup v2 group per sandbox, else cgroup
v1 groups (memory, pids, cpu), else per-process rlimits. The mode is detected once, by trying it.

Groups live under `managed-agents/<scope>/<sandbox id>`, the scope naming the server's work root. A server
killed with SIGKILL cannot remove its groups, and the kernel keeps an empty group forever (cgroup v1 allows
65,535 memory groups per host: enough leaks and no sandbox can be made). So a starting server removes the empty
groups of its own scope: sandboxes it adopts get theirs again, and another server's groups are not its to touch.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import signal
from pathlib import Path

from hands.backend import Enforcement, Limits

log = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")
GROUP = "managed-agents"
_PERIOD_US = 100_000
_CONTROLLERS = "+memory +pids +cpu"
_V1_HIERARCHIES = ("memory", "pids", "cpu")


def scope_of(work_root: Path) -> str:
    """The group scope of the server whose sandboxes live in `work_root` (one per work root on a host)."""
    return "w-" + hashlib.sha256(str(work_root.resolve()).encode()).hexdigest()[:16]


class LimitGroups:
    """Creates, joins, inspects and removes the limit groups of sandboxes."""

    def __init__(self, mode: Enforcement, root: Path = CGROUP_ROOT, scope: str = "shared") -> None:
        self.mode = mode
        self._root = root
        self.scope = scope

    @classmethod
    def detect(
        cls, root: Path = CGROUP_ROOT, prefer: Enforcement | None = None, *, scope: str = "shared"
    ) -> LimitGroups:
        """The strongest mode that works here (tried for real with a probe group)."""
        candidates = [Enforcement.CGROUP_V2, Enforcement.CGROUP_V1, Enforcement.RLIMIT]
        if prefer is not None:
            candidates = candidates[candidates.index(prefer) :]
        for mode in candidates:
            groups = cls(mode, root, scope)
            if mode is Enforcement.RLIMIT or groups._probe():
                log.info("sandbox limits enforced by %s", mode.name)
                return groups
        raise AssertionError("unreachable")

    def _scopes(self) -> list[Path]:
        if self.mode is Enforcement.CGROUP_V2:
            return [self._root / GROUP / self.scope]
        if self.mode is Enforcement.CGROUP_V1:
            return [self._root / c / GROUP / self.scope for c in _V1_HIERARCHIES]
        return []

    def _dirs(self, sandbox_id: str) -> list[Path]:
        return [scope / sandbox_id for scope in self._scopes()]

    def sweep(self) -> int:
        """Removes the empty groups of this scope (left by a killed server); returns how many went.

        Groups with processes in them are kept: the kernel refuses to remove them. Also removes empty groups
        of the earlier flat layout (`managed-agents/<sandbox id>`), which no server makes any more.
        """
        removed = 0
        for scope in self._scopes():
            # Scopes of servers that have no sandbox left (a test's work root, a retired host path) go too.
            others = [p for p in scope.parent.glob("w-*") if p != scope] if scope.parent.is_dir() else []
            for other in others:
                with contextlib.suppress(OSError):
                    other.rmdir()
            flat = [*scope.parent.glob("sbx_*"), *scope.parent.glob("probe-*")] if scope.parent.is_dir() else []
            legacy = [p for p in flat if p.is_dir()]
            current = [p for p in scope.iterdir() if p.is_dir()] if scope.is_dir() else []
            for group in (*current, *legacy):
                try:
                    group.rmdir()
                    removed += 1
                except OSError:
                    pass  # still has processes (or sub-groups): in use
        if removed:
            log.info("removed %d empty sandbox limit group(s) left by an earlier server", removed)
        return removed

    def _probe(self) -> bool:
        # The hierarchy must really be there: on hybrid hosts /sys/fs/cgroup is a tmpfs where mkdir and writing
        # `memory.max` "work" as plain files and limit nothing.
        if self.mode is Enforcement.CGROUP_V2:
            controllers = self._root / "cgroup.controllers"
            if not controllers.exists() or not {"memory", "pids", "cpu"} <= set(controllers.read_text().split()):
                log.info("cgroup v2 limits unavailable here: no memory, pids and cpu controllers at %s", self._root)
                return False
        elif not all(
            (self._root / c / f).exists()
            for c, f in (("memory", "memory.limit_in_bytes"), ("pids", "cgroup.procs"), ("cpu", "cpu.cfs_quota_us"))
        ):
            log.info("cgroup v1 limits unavailable here: no memory, pids and cpu hierarchies under %s", self._root)
            return False
        probe = f"probe-{os.getpid()}"
        try:
            self.create(probe, Limits(memory_bytes=64 << 20, max_processes=16, cpu_millis=500))
            return True
        except OSError as error:
            log.info("%s limits unavailable here: %s", self.mode.name, error)
            return False
        finally:
            self.remove(probe)

    def create(self, sandbox_id: str, limits: Limits) -> None:
        """Makes the sandbox's groups with its limits. Raises OSError if the host refuses."""
        for attempt in range(3):
            try:
                return self._create(sandbox_id, limits)
            except FileNotFoundError:
                # Another server's sweep removed our scope while it was empty, between its mkdir and ours.
                if attempt == 2:
                    raise

    def _create(self, sandbox_id: str, limits: Limits) -> None:
        quota = max(1000, limits.cpu_millis * _PERIOD_US // 1000)
        if self.mode is Enforcement.CGROUP_V2:
            parent = self._root / GROUP / self.scope
            if not parent.exists():
                # Controllers must be enabled down the tree before a child group can use them.
                (self._root / "cgroup.subtree_control").write_text(_CONTROLLERS)
                for level in (parent.parent, parent):
                    level.mkdir(exist_ok=True)
                    (level / "cgroup.subtree_control").write_text(_CONTROLLERS)
            group = parent / sandbox_id
            group.mkdir(exist_ok=True)
            (group / "memory.max").write_text(str(limits.memory_bytes))
            with contextlib.suppress(OSError):
                (group / "memory.swap.max").write_text("0")
            (group / "pids.max").write_text(str(limits.max_processes))
            (group / "cpu.max").write_text(f"{quota} {_PERIOD_US}")
        elif self.mode is Enforcement.CGROUP_V1:
            memory, pids, cpu = self._dirs(sandbox_id)
            for group in (memory, pids, cpu):
                group.mkdir(parents=True, exist_ok=True)
            (memory / "memory.limit_in_bytes").write_text(str(limits.memory_bytes))
            with contextlib.suppress(OSError):
                (memory / "memory.memsw.limit_in_bytes").write_text(str(limits.memory_bytes))
            (pids / "pids.max").write_text(str(limits.max_processes))
            (cpu / "cpu.cfs_period_us").write_text(str(_PERIOD_US))
            (cpu / "cpu.cfs_quota_us").write_text(str(quota))

    def wrap(self, sandbox_id: str, limits: Limits, argv: list[str], *, prelude: str = "") -> list[str]:
        """`argv` wrapped so that the process starts inside the sandbox's groups (or under its rlimits), after
        the shell statement `prelude` (fd plumbing).

        The wrapper (a shell writing its own pid to each group, then exec-ing the command) replaces a Python
        `preexec_fn`, which would force a plain fork of this multi-threaded gRPC server.
        """
        statements = []
        if self.mode is Enforcement.RLIMIT:
            rlimits = f"prlimit --as={limits.memory_bytes} --nproc={limits.max_processes} --"
        else:
            rlimits = ""
            procs = " ".join(str(d / "cgroup.procs") for d in self._dirs(sandbox_id))
            statements.append(f'for group in {procs}; do echo $$ > "$group" || exit 125; done')
        if prelude:
            statements.append(prelude)
        statements.append(f'exec {rlimits} "$@"'.replace("  ", " "))
        # bash, not sh: dash cannot redirect descriptors above 9, which the prelude moves.
        return ["/bin/bash", "-c", "; ".join(statements), "sh", *argv]

    def _counter(self, path: Path, key: str) -> int:
        try:
            for line in path.read_text().splitlines():
                name, _, value = line.partition(" ")
                if name == key:
                    return int(value)
        except (OSError, ValueError):
            pass
        return 0

    def oom_kills(self, sandbox_id: str) -> int:
        """Processes of the sandbox killed for memory so far."""
        dirs = self._dirs(sandbox_id)
        if not dirs:
            return 0
        name = "memory.events" if self.mode is Enforcement.CGROUP_V2 else "memory.oom_control"
        return self._counter(dirs[0] / name, "oom_kill")

    def process_limit_hits(self, sandbox_id: str) -> int:
        """Forks refused because the sandbox was at its process limit, so far."""
        dirs = self._dirs(sandbox_id)
        if not dirs:
            return 0
        return self._counter(dirs[0 if self.mode is Enforcement.CGROUP_V2 else 1] / "pids.events", "max")

    def pids(self, sandbox_id: str) -> list[int]:
        """The processes in the sandbox's groups (none if it has no groups)."""
        found: set[int] = set()
        for group in self._dirs(sandbox_id):
            with contextlib.suppress(OSError):
                found.update(int(pid) for pid in (group / "cgroup.procs").read_text().split())
        return sorted(found)

    def kill_all(self, sandbox_id: str) -> None:
        """Kills every process still in the sandbox's groups."""
        for pid in self.pids(sandbox_id):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def exists(self, sandbox_id: str) -> bool:
        """True while any of the sandbox's groups exists."""
        return any(d.exists() for d in self._dirs(sandbox_id))

    def remove(self, sandbox_id: str) -> None:
        """Removes the groups (they must be empty: kill first)."""
        for group in self._dirs(sandbox_id):
            with contextlib.suppress(OSError):
                group.rmdir()
