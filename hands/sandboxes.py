"""The sandboxes of one hands server: provisioning (idempotent on a request id), tool calls (idempotent on an
execution id, one at a time per sandbox), loss detection, idle reaping and destruction.

What survives a restart of the hands server: each sandbox's directory (workspace and execution records) and
its metadata. Its processes cannot: bwrap sandboxes die with their parent (`--die-with-parent`), which is what
guarantees no sandbox outlives a crashed server unwatched. On start, a server adopts the sandboxes it finds on
disk: the workspace is intact, the next call gets a fresh shell (working directory and environment back to
defaults), and a call that was running when the old server died is reported as interrupted, never re-run.
A graceful stop therefore destroys nothing; only `Destroy` and the idle time-to-live remove sandboxes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shlex
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from hands import disk
from hands.backend import CONTROL_MOUNT, DISKS, Limits, SandboxBackend, SandboxPaths
from hands.doors import EGRESS_PORT, GIT_PORT, SandboxDoors, door_socket
from hands.egress_relay import EgressRelays, SandboxEgress, SecretPlaceholder, sandbox_environment
from hands.executions import ExecResult, ExecStatus, ExecutionLog, call_fingerprint
from hands.git_relay import GitRelays, Repository, SandboxRelay
from hands.identities import Identities, Identity
from hands.shell import CommandNotDelivered, Shell, write_driver
from hands.tools import bash, text_editor
from managed_agents.mesh.errors import FailedPrecondition, IdempotencyKeyReused, SandboxNotFound, SandboxUnavailable
from managed_agents.mesh.ids import SANDBOX_PREFIX, new_id
from mcp_proxy.client import McpProxyClient

log = logging.getLogger(__name__)

READY, LOST, DESTROYED = "ready", "lost", "destroyed"
CLONE_TIMEOUT = 600.0
EDITOR_TIMEOUT = 30.0  # seconds one text-editor call may take (on a sandbox's own disk, far more than enough)
TOOLS = (bash.NAME, text_editor.NAME)


@dataclass(slots=True)
class Sandbox:
    """One sandbox and its live state."""

    id: str
    paths: SandboxPaths
    limits: Limits
    create_time: float
    session_id: str = ""
    request_id: str = ""
    state: str = READY
    lost_reason: str = ""
    last_used: float = 0.0
    shell: Shell | None = None
    identity: Identity | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    inflight: dict[str, asyncio.Task[ExecResult]] = field(default_factory=dict)
    inflight_calls: dict[str, str] = field(default_factory=dict)  # execution id -> call fingerprint
    executions: ExecutionLog | None = None
    oom_seen: int = 0
    repositories: list[Repository] = field(default_factory=list)
    relay: SandboxRelay | None = None
    secrets: list[SecretPlaceholder] = field(default_factory=list)
    egress: SandboxEgress | None = None
    doors: SandboxDoors = field(default_factory=SandboxDoors)
    # Set while `destroy` runs: the shell it kills is not a loss to report, and the directory is going away.
    destroying: bool = False

    def metadata(self) -> dict[str, Any]:
        """What is written to `sandbox.json`."""
        return {
            "id": self.id,
            "limits": asdict(self.limits),
            "create_time": self.create_time,
            "session_id": self.session_id,
            "request_id": self.request_id,
            "state": self.state,
            "lost_reason": self.lost_reason,
            "identity": asdict(self.identity) if self.identity else None,
            "repositories": [asdict(r) for r in self.repositories],
            # Names and placeholders only: no value of a secret is ever on this side of the proxy.
            "secrets": [asdict(s) for s in self.secrets],
        }

    async def close_relays(self) -> None:
        """Stops the forwarder and both relays (a new shell opens them again)."""
        await self.doors.aclose()
        if self.relay is not None:
            await self.relay.aclose()
            self.relay = None
        if self.egress is not None:
            await self.egress.aclose()
            self.egress = None


class SandboxManager:
    """All sandboxes of this server, on one backend, under one work root."""

    def __init__(
        self,
        backend: SandboxBackend,
        work_root: Path,
        *,
        instance: str,
        identities: Identities | None = None,
        proxy: McpProxyClient | None = None,
    ) -> None:
        self.backend = backend
        # Host identities, one per sandbox, when the backend asks for them.
        self._identities = identities if backend.needs_identity() else None
        # Repositories and secrets are relayed through the proxy; without one, sandboxes asking for them are
        # refused with a sentence.
        self._proxy = proxy
        self._git = GitRelays(proxy)
        self._egress = EgressRelays(proxy, work_root / ".egress-ca")
        self.instance = instance
        self._root = work_root
        self._sandboxes: dict[str, Sandbox] = {}
        self._by_request: dict[str, str] = {}
        self._provisioning: dict[str, asyncio.Task[Sandbox]] = {}
        self._reaper: asyncio.Task[None] | None = None

    # Lifecycle -------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Adopts the sandboxes a previous server left on disk and starts the idle reaper."""
        self._root.mkdir(parents=True, exist_ok=True)
        for meta_path in sorted(self._root.glob(f"{SANDBOX_PREFIX}*/sandbox.json")):
            try:
                meta = json.loads(meta_path.read_text())
                sandbox = Sandbox(
                    id=meta["id"],
                    paths=SandboxPaths(meta_path.parent),
                    limits=Limits(**meta["limits"]),
                    create_time=float(meta["create_time"]),
                    session_id=meta.get("session_id", ""),
                    request_id=meta.get("request_id", ""),
                    state=meta.get("state", READY),
                    lost_reason=meta.get("lost_reason", ""),
                    last_used=time.time(),
                    repositories=[Repository(**r) for r in meta.get("repositories", [])],
                    secrets=[SecretPlaceholder(**s) for s in meta.get("secrets", [])],
                    identity=Identity(**meta["identity"]) if meta.get("identity") else None,
                )
            except (OSError, ValueError, KeyError, TypeError) as error:
                log.warning("ignoring %s: %s", meta_path, error)
                continue
            sandbox.executions = ExecutionLog(sandbox.paths.state / "executions")
            if sandbox.state == READY:
                await self._adopt(sandbox)
            self._sandboxes[sandbox.id] = sandbox
            if sandbox.request_id:
                self._by_request[sandbox.request_id] = sandbox.id
        if self._sandboxes:
            log.info("adopted %d sandbox(es) from %s", len(self._sandboxes), self._root)
        if self._identities is not None:
            kept = [s.id for s in self._sandboxes.values() if s.identity is not None and s.state != DESTROYED]
            self._identities.sweep(kept)
        known = {s.id for s in self._sandboxes.values() if s.state != DESTROYED}
        if swept := await asyncio.to_thread(disk.sweep, DISKS, self._root, known):
            log.info("unmounted %d sandbox disk(s) that earlier servers left behind", swept)
        self._reaper = asyncio.create_task(self._reap_idle(), name="idle-reaper")

    async def _adopt(self, sandbox: Sandbox) -> None:
        """Makes a ready sandbox found on disk usable again: its disk mounted, its identity held, its limits set;
        one that cannot be (made by an older hands, its identity taken) is marked lost with the reason."""
        try:
            if not sandbox.paths.image.exists():
                raise SandboxUnavailable("it was made by an earlier hands without a disk of its own")
            if self._identities is not None:
                if sandbox.identity is None:
                    raise SandboxUnavailable("it was made by an earlier hands without an identity of its own")
                self._identities.reclaim(sandbox.id, sandbox.identity)
            await asyncio.to_thread(disk.mount, sandbox.paths.image, sandbox.paths.mount)
            await self.backend.create(sandbox.id, sandbox.paths, sandbox.limits, sandbox.identity)
        except (OSError, disk.DiskError, SandboxUnavailable) as error:
            sandbox.state, sandbox.lost_reason = LOST, f"it could not be adopted after a restart of hands: {error}"
            log.warning("sandbox %s is lost: %s", sandbox.id, sandbox.lost_reason)
            self._save(sandbox)

    async def aclose(self) -> None:
        """Stops the reaper and the shells; sandboxes stay on disk for the next server to adopt."""
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        for sandbox in self._sandboxes.values():
            for task in sandbox.inflight.values():
                task.cancel()
            if sandbox.shell is not None:
                await sandbox.shell.close()
            await sandbox.close_relays()
        await self.backend.aclose()
        if self._proxy is not None:
            await self._proxy.aclose()

    async def _reap_idle(self) -> None:
        while True:
            ttls = [s.limits.idle_ttl_s for s in self._sandboxes.values() if s.state != DESTROYED]
            await asyncio.sleep(min([5.0, *(t / 2 for t in ttls)]))
            now = time.time()
            for sandbox in list(self._sandboxes.values()):
                idle = now - sandbox.last_used
                if sandbox.state != DESTROYED and not sandbox.inflight and idle > sandbox.limits.idle_ttl_s:
                    log.info(
                        "destroying %s: idle for %.0f s (idle_ttl %.0f s)",
                        sandbox.id,
                        idle,
                        sandbox.limits.idle_ttl_s,
                    )
                    await self.destroy(sandbox.id)

    def _save(self, sandbox: Sandbox) -> None:
        path = sandbox.paths.root / "sandbox.json"
        if sandbox.paths.root.exists():
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(sandbox.metadata()))
            tmp.replace(path)

    # Provisioning ----------------------------------------------------------------------------------------

    async def provision(
        self,
        limits: Limits,
        *,
        session_id: str = "",
        request_id: str = "",
        repositories: Sequence[Repository] = (),
        secrets: Sequence[SecretPlaceholder] = (),
        credential_token: str = "",
    ) -> Sandbox:
        """A new ready sandbox, its repositories cloned (or, for a request id seen before, the sandbox made
        for it)."""
        if request_id:
            known = self._by_request.get(request_id)
            if known is not None:
                return self._sandboxes[known]
            pending = self._provisioning.get(request_id)
            if pending is not None:
                return await asyncio.shield(pending)
        task = asyncio.create_task(
            self._provision(limits, session_id, request_id, list(repositories), list(secrets), credential_token)
        )
        if request_id:
            self._provisioning[request_id] = task
        try:
            return await asyncio.shield(task)
        finally:
            if request_id:
                self._provisioning.pop(request_id, None)

    async def _provision(
        self,
        limits: Limits,
        session_id: str,
        request_id: str,
        repositories: list[Repository],
        secrets: list[SecretPlaceholder],
        token: str,
    ) -> Sandbox:
        sandbox_id = new_id(SANDBOX_PREFIX)
        paths = SandboxPaths(self._root / sandbox_id)
        paths.create()
        now = time.time()
        sandbox = Sandbox(
            id=sandbox_id,
            paths=paths,
            limits=limits,
            create_time=now,
            session_id=session_id,
            request_id=request_id,
            last_used=now,
            repositories=repositories,
            secrets=secrets,
        )
        sandbox.executions = ExecutionLog(paths.state / "executions")
        try:
            if self._identities is not None:
                sandbox.identity = self._identities.claim(sandbox_id)
            try:
                await asyncio.to_thread(
                    disk.create,
                    paths.image,
                    paths.mount,
                    limits.disk_bytes,
                    sandbox.identity,
                    templates=self._root / ".disk-templates",
                )
            except (OSError, disk.DiskError) as error:
                raise SandboxUnavailable(f"cannot make the sandbox's disk: {error}") from None
            await self.backend.create(sandbox_id, paths, limits, sandbox.identity)
            # A warm shell now makes the first call as fast as the next ones.
            sandbox.shell = await self._start_shell(sandbox, token)
            await self._clone(sandbox)
        except BaseException:
            if sandbox.shell is not None:
                await sandbox.shell.close()
            await sandbox.close_relays()
            await self.backend.destroy(sandbox_id, paths)
            await self._remove(sandbox)
            raise
        self._save(sandbox)
        self._sandboxes[sandbox_id] = sandbox
        if request_id:
            self._by_request[request_id] = sandbox_id
        log.info("provisioned %s (%s, session %s)", sandbox_id, self.backend.name, session_id or "-")
        return sandbox

    async def _start_shell(self, sandbox: Sandbox, token: str = "") -> Shell:
        # The relays first: the egress relay writes the CA the new shell must trust into its control directory.
        if sandbox.repositories and sandbox.relay is None:
            sandbox.relay = await self._git.open(sandbox.repositories, door_socket(sandbox.id, "git"))
        if sandbox.secrets and sandbox.egress is None:
            sandbox.egress = await self._egress.open(
                sandbox.secrets, sandbox.paths.control, door_socket(sandbox.id, "egress")
            )
        self.update_credential_token(sandbox, token)
        write_driver(sandbox.paths.control, CONTROL_MOUNT, sandbox_environment(sandbox.secrets, CONTROL_MOUNT))
        process = await self.backend.start_shell(sandbox.id, sandbox.paths, sandbox.limits, sandbox.identity)
        shell = Shell(process, control_host=str(sandbox.paths.control))
        doors = {}
        if sandbox.relay is not None:
            doors[GIT_PORT] = sandbox.relay.socket
        if sandbox.egress is not None:
            doors[EGRESS_PORT] = sandbox.egress.socket
        if doors:
            # Every shell is a fresh set of namespaces: the doors follow it into the new network.
            try:
                await sandbox.doors.attach(await process.namespace_pid(), doors)
            except BaseException:
                await shell.close()
                raise
        return shell

    async def _clone(self, sandbox: Sandbox) -> None:
        """Clones the sandbox's repositories into its workspace, through its relay, from inside the sandbox."""
        for index, repository in enumerate(sandbox.repositories):
            branch = f"--branch {shlex.quote(repository.branch)} " if repository.branch else ""
            command = (
                f"git clone --quiet {branch}{shlex.quote(repository.remote(index))} {shlex.quote(repository.path)} 2>&1"
            )
            result = await self._bash(sandbox, {"command": command}, CLONE_TIMEOUT)
            if result.is_error:
                raise FailedPrecondition(
                    f"cloning {repository.url} into {repository.path} failed: {result.output.strip()[-2000:]}"
                )

    def update_credential_token(self, sandbox: Sandbox, token: str) -> None:
        """A fresher session token for the sandbox's relays (sent along with a tool call)."""
        for relay in (sandbox.relay, sandbox.egress):
            if token and relay is not None:
                relay.update_token(token)

    # Lookup ----------------------------------------------------------------------------------------------

    def get(self, sandbox_id: str) -> Sandbox:
        """The sandbox, its loss noticed if its shell was killed. Raises `SandboxNotFound`."""
        sandbox = self._sandboxes.get(sandbox_id)
        if sandbox is None:
            raise SandboxNotFound(f"sandbox {sandbox_id} does not exist on this hands server ({self.instance})")
        return sandbox

    async def refresh(self, sandbox: Sandbox) -> Sandbox:
        """Marks the sandbox lost if its shell was killed while idle."""
        shell = sandbox.shell
        idle = sandbox.state == READY and not sandbox.destroying and not sandbox.lock.locked()
        if idle and shell is not None and shell.ended:
            await self._shell_ended(sandbox, shell)
        return sandbox

    def list(self) -> list[Sandbox]:
        """Every sandbox this server knows, newest first."""
        return sorted(self._sandboxes.values(), key=lambda s: (s.create_time, s.id), reverse=True)

    async def _shell_ended(self, sandbox: Sandbox, shell: Shell) -> str | None:
        """After the shell ended: the reason if the sandbox is lost, else None (the shell merely exited)."""
        sandbox.shell = None
        how = await shell.process.wait_exit(2.0) or "stopped responding"
        await shell.close()
        if how.startswith("exited"):
            return None  # `exit` in a command: the next call starts a new shell
        reason = await self.backend.lost_reason(sandbox.id) or f"its processes were killed from outside ({how})"
        await self._mark_lost(sandbox, reason)
        return reason

    async def _mark_lost(self, sandbox: Sandbox, reason: str) -> None:
        if sandbox.state != READY or sandbox.destroying:
            return
        sandbox.state, sandbox.lost_reason = LOST, reason
        log.warning("sandbox %s is lost: %s", sandbox.id, reason)
        self._save(sandbox)
        await sandbox.close_relays()
        # Whatever is left of it (other processes, groups) goes now; its workspace stays until Destroy.
        await self.backend.destroy(sandbox.id, sandbox.paths)

    # Execution -------------------------------------------------------------------------------------------

    async def execute(
        self,
        sandbox_id: str,
        execution_id: str,
        name: str,
        tool_input: Mapping[str, Any],
        timeout: float | None,
    ) -> ExecResult:
        """Runs a tool call once; a repeated execution id returns (or waits for) the first call's result."""
        sandbox = await self.refresh(self.get(sandbox_id))
        assert sandbox.executions is not None
        fingerprint = call_fingerprint(name, tool_input)
        running = sandbox.inflight.get(execution_id)
        if running is not None:
            self._same_call(execution_id, sandbox.inflight_calls.get(execution_id, ""), fingerprint)
            return replace(await asyncio.shield(running), replayed=True)
        known = sandbox.executions.lookup(execution_id)
        if known is not None:
            self._same_call(execution_id, known.fingerprint, fingerprint)
        if known is not None and known.result is not None:
            return replace(known.result, replayed=True)
        if known is not None:
            return ExecResult(
                output="This call was interrupted when the hands server running it stopped; whether it took "
                "effect is unknown, and it was not re-run.",
                is_error=True,
                status=ExecStatus.INTERRUPTED,
                replayed=True,
            )
        if sandbox.state != READY:
            return ExecResult(
                output=f"The sandbox {sandbox.id} is gone: {sandbox.lost_reason or sandbox.state}. This call did "
                "not run; the next call should use a new sandbox.",
                is_error=True,
                status=ExecStatus.REJECTED,
                sandbox_lost=True,
            )
        task = asyncio.create_task(self._execute_now(sandbox, execution_id, fingerprint, name, tool_input, timeout))
        sandbox.inflight[execution_id] = task
        sandbox.inflight_calls[execution_id] = fingerprint

        def forget(_: object = None) -> None:
            sandbox.inflight.pop(execution_id, None)
            sandbox.inflight_calls.pop(execution_id, None)

        try:
            # Shielded: a caller that goes away must not cut the call short; a retry will collect the result.
            return await asyncio.shield(task)
        finally:
            if task.done():
                forget()
            else:
                task.add_done_callback(forget)

    @staticmethod
    def _same_call(execution_id: str, recorded: str, asked: str) -> None:
        """Refuses an execution id reused for another call (records of an older hands carry no fingerprint)."""
        if recorded and recorded != asked:
            raise IdempotencyKeyReused(
                f"execution id {execution_id!r} was already used for a different call (another tool or input) in "
                "this sandbox; a retry must send the same call, and a new call needs a new id"
            )

    async def _execute_now(
        self,
        sandbox: Sandbox,
        execution_id: str,
        fingerprint: str,
        name: str,
        tool_input: Mapping[str, Any],
        timeout: float | None,
    ) -> ExecResult:
        assert sandbox.executions is not None
        async with sandbox.lock:
            started = time.monotonic()
            if name not in TOOLS:
                result = ExecResult(
                    f"There is no tool named {name!r}; the tools are: {', '.join(TOOLS)}.",
                    is_error=True,
                    status=ExecStatus.REJECTED,
                )
            else:
                sandbox.executions.started(execution_id, name, fingerprint)
                if name == bash.NAME:
                    # The sandbox's command_timeout is a ceiling no call can raise, only lower.
                    ceiling = sandbox.limits.command_timeout_s
                    result = await self._bash(sandbox, tool_input, min(timeout or ceiling, ceiling))
                    if timeout is not None and timeout > ceiling and result.status == ExecStatus.TIMED_OUT:
                        note = (
                            f"\n[This call asked for {timeout:g} s; {ceiling:g} s (the sandbox's command_timeout) "
                            "is the most any call gets.]"
                        )
                        result = replace(result, output=result.output + note)
                else:
                    identity = sandbox.identity
                    edited = await text_editor.run_async(
                        tool_input,
                        sandbox.paths.workspace,
                        uid=identity.uid if identity else None,
                        gid=identity.gid if identity else None,
                        timeout=EDITOR_TIMEOUT,
                    )
                    result = ExecResult(edited.output, edited.is_error, ExecStatus.COMPLETED)
            result = replace(result, duration_s=time.monotonic() - started)
            sandbox.executions.finished(execution_id, name, fingerprint, result)
            sandbox.last_used = time.time()
            return result

    async def _bash(self, sandbox: Sandbox, tool_input: Mapping[str, Any], timeout: float) -> ExecResult:
        try:
            command, restart = bash.parse(tool_input)
        except ValueError as error:
            return ExecResult(f"bash: {error}", is_error=True, status=ExecStatus.REJECTED)
        if restart:
            if sandbox.shell is not None:
                await sandbox.shell.close()
            sandbox.shell = await self._start_shell(sandbox)
            return ExecResult("The shell was restarted.", is_error=False, status=ExecStatus.COMPLETED)
        if sandbox.shell is None or sandbox.shell.ended:
            sandbox.shell = await self._start_shell(sandbox)
        shell = sandbox.shell
        before = await self.backend.limit_events(sandbox.id)
        try:
            outcome = await shell.run(command, timeout=timeout)
        except CommandNotDelivered as error:
            return ExecResult(
                f"This call did not run: hands could not write it for the sandbox's shell ({error}). The sandbox's "
                "disk is full to its last block; remove files (`rm`) to make room.",
                is_error=True,
                status=ExecStatus.REJECTED,
            )
        output = outcome.output
        if outcome.shell_ended and not outcome.restarted_after_timeout:
            reason = await self._shell_ended(sandbox, shell)
            if reason is not None:
                return ExecResult(
                    f"{output}\n[The sandbox died during this call: {reason}. Its outcome is unknown and it "
                    "was "
                    "not re-run; the next call gets a new sandbox.]".lstrip(),
                    is_error=True,
                    status=ExecStatus.INTERRUPTED,
                    truncated=outcome.truncated,
                    sandbox_lost=True,
                )
            how = shell.process.exit_description() or ""
            code = int(how.rsplit(" ", 1)[1]) if how.startswith("exited with code ") else None
            note = "[The shell exited; the next command starts a new one.]"
            return ExecResult(
                f"{output}\n{note}".lstrip("\n"),
                is_error=code != 0,
                status=ExecStatus.COMPLETED,
                exit_code=code,
                truncated=outcome.truncated,
            )
        if outcome.restarted_after_timeout:
            sandbox.shell = None
        after = await self.backend.limit_events(sandbox.id)
        if after.oom_kills > before.oom_kills:
            output += (
                f"\n[A process was killed for exceeding the sandbox's memory limit of "
                f"{sandbox.limits.memory_bytes >> 20} MiB.]"
            )
        if after.process_limit_hits > before.process_limit_hits:
            output += (
                f"\n[The sandbox reached its limit of {sandbox.limits.max_processes} processes: "
                f"{after.process_limit_hits - before.process_limit_hits} process creations were refused.]"
            )
        usage = await asyncio.to_thread(disk.usage, sandbox.paths.mount)
        if usage is not None and usage.full:
            output += (
                f"\n[The sandbox's disk is full (less than 1 MiB left): /workspace and /tmp share a quota of "
                f"{usage.size >> 20} MiB, and writes fail with 'No space left on device' until files are removed.]"
            )
        if outcome.timed_out:
            return ExecResult(
                output,
                is_error=True,
                status=ExecStatus.TIMED_OUT,
                exit_code=outcome.exit_code,
                truncated=outcome.truncated,
            )
        code = outcome.exit_code
        return ExecResult(
            output,
            is_error=code not in (0, None),
            status=ExecStatus.COMPLETED,
            exit_code=code,
            truncated=outcome.truncated,
        )

    # Destruction -----------------------------------------------------------------------------------------

    async def _remove(self, sandbox: Sandbox) -> None:
        """Unmounts the sandbox's disk, deletes its directory and gives its identity back (its processes are
        gone: the backend's destroy has run)."""
        try:
            await asyncio.to_thread(disk.unmount, sandbox.paths.mount)
        except disk.DiskError as error:
            log.warning("sandbox %s: %s", sandbox.id, error)
        await asyncio.to_thread(shutil.rmtree, sandbox.paths.root, True)
        if self._identities is not None and sandbox.identity is not None:
            self._identities.release(sandbox.identity)

    async def destroy(self, sandbox_id: str) -> Sandbox:
        """Removes every trace of the sandbox; destroying it twice is fine."""
        sandbox = self.get(sandbox_id)
        if sandbox.state == DESTROYED:
            return sandbox
        sandbox.destroying = True
        for task in sandbox.inflight.values():
            task.cancel()
        if sandbox.shell is not None:
            await sandbox.shell.close()
            sandbox.shell = None
        await sandbox.close_relays()
        await self.backend.destroy(sandbox.id, sandbox.paths)
        await self._remove(sandbox)
        sandbox.state = DESTROYED
        if sandbox.request_id:
            self._by_request.pop(sandbox.request_id, None)
        log.info("destroyed %s", sandbox_id)
        return sandbox
