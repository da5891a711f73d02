"""Resource limits of bwrap sandboxes, by whatever this host allows: a cgroup v2 group per sandbox, else cgroup
v1 groups (memory, pids, cpu), else per-process rlimits. The mode is detected once, by trying it."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from pathlib import Path

from hands.backend import Enforcement, Limits

log = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")
GROUP = "managed-agents"
_PERIOD_US = 100_000


class LimitGroups:
    """Creates, joins, inspects and removes the limit groups of sandboxes."""

    def __init__(self, mode: Enforcement, root: Path = CGROUP_ROOT) -> None:
        self.mode = mode
        self._root = root

    @classmethod
    def detect(cls, root: Path = CGROUP_ROOT, prefer: Enforcement | None = None) -> LimitGroups:
        """The strongest mode that works here (tried for real with a probe group)."""
        candidates = [Enforcement.CGROUP_V2, Enforcement.CGROUP_V1, Enforcement.RLIMIT]
        if prefer is not None:
            candidates = candidates[candidates.index(prefer) :]
        for mode in candidates:
            groups = cls(mode, root)
            if mode is Enforcement.RLIMIT or groups._probe():
                log.info("sandbox limits enforced by %s", mode.name)
                return groups
        raise AssertionError("unreachable")

    def _dirs(self, sandbox_id: str) -> list[Path]:
        if self.mode is Enforcement.CGROUP_V2:
            return [self._root / GROUP / sandbox_id]
        if self.mode is Enforcement.CGROUP_V1:
            return [self._root / c / GROUP / sandbox_id for c in ("memory", "pids", "cpu")]
        return []

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
        quota = max(1000, limits.cpu_millis * _PERIOD_US // 1000)
        if self.mode is Enforcement.CGROUP_V2:
            parent = self._root / GROUP
            if not parent.exists():
                parent.mkdir()
                # Controllers must be enabled down the tree before a child group can use them.
                (self._root / "cgroup.subtree_control").write_text("+memory +pids +cpu")
                (parent / "cgroup.subtree_control").write_text("+memory +pids +cpu")
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

    def wrap(self, sandbox_id: str, limits: Limits, argv: list[str]) -> list[str]:
        """`argv` wrapped so that the process starts inside the sandbox's groups (or under its rlimits).

        The wrapper (`sh` writing its own pid to each group, then exec-ing the command) replaces a Python
        `preexec_fn`, which would force a plain fork of this multi-threaded gRPC server.
        """
        if self.mode is Enforcement.RLIMIT:
            return ["prlimit", f"--as={limits.memory_bytes}", f"--nproc={limits.max_processes}", "--", *argv]
        procs = " ".join(str(d / "cgroup.procs") for d in self._dirs(sandbox_id))
        script = f'for group in {procs}; do echo $$ > "$group" || exit 125; done; exec "$@"'
        return ["/bin/sh", "-c", script, "sh", *argv]

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

    def kill_all(self, sandbox_id: str) -> None:
        """Kills every process still in the sandbox's groups."""
        for group in self._dirs(sandbox_id):
            with contextlib.suppress(OSError):
                for pid in (group / "cgroup.procs").read_text().split():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pid), signal.SIGKILL)

    def exists(self, sandbox_id: str) -> bool:
        """True while any of the sandbox's groups exists."""
        return any(d.exists() for d in self._dirs(sandbox_id))

    def remove(self, sandbox_id: str) -> None:
        """Removes the groups (they must be empty: kill first)."""
        for group in self._dirs(sandbox_id):
            with contextlib.suppress(OSError):
                group.rmdir()
