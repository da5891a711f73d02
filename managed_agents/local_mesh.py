"""The whole mesh on one machine: store, hands, mcp_proxy and brain (and, without an API key, the stand-in
model) as separate processes on free loopback ports, started in dependency order and stopped in reverse.

The mesh is closed to outsiders from the first start: a mesh secret (`<home>/mesh.secret`) that every process
and the CLI present, and a vault key (`<home>/vault.key`), both made once with mode 0600 and kept.

`managed-agents up` keeps it running until Ctrl-C (or SIGTERM, SIGHUP); `managed-agents demo` starts it, runs
one session and stops it. The addresses are written to `<home>/mesh.json`, where the other commands find them.

The services do not outlive the process that started them, even if it is SIGKILLed: a watchdog
(`managed_agents.mesh_watchdog`), started first, stops what is left of the mesh when its owner is gone.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from managed_agents.mesh.auth import SECRET_FILE_ENV, mesh_secret, write_secret_file
from managed_agents.mesh_watchdog import RUN_ENV
from managed_agents.procs import ROOT, ServiceProcess

STATE_FILE = "mesh.json"
SECRET_FILE = "mesh.secret"
VAULT_KEY_FILE = "vault.key"
# How long a service may take to stop on SIGTERM before it is killed (as `ServiceProcess.stop` waits).
STOP_GRACE_S = 10.0


def mesh_home(environ: Mapping[str, str]) -> Path:
    """Where the local mesh keeps data, logs and addresses: `$MANAGED_AGENTS_HOME`, or `.managed-agents`, made
    absolute here because the services it starts run from another directory."""
    return Path(environ.get("MANAGED_AGENTS_HOME", ".managed-agents")).absolute()


@dataclass(frozen=True, slots=True)
class MeshAddresses:
    """Where each service of a running local mesh listens."""

    store: str
    hands: str
    brain: str
    model: str  # the model endpoint: the stand-in's URL, or empty for the real API
    proxy: str = ""

    def save(self, home: Path) -> None:
        """Writes `mesh.json` atomically."""
        home.mkdir(parents=True, exist_ok=True)
        tmp = home / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2) + "\n")
        os.replace(tmp, home / STATE_FILE)

    @classmethod
    def load(cls, home: Path) -> MeshAddresses | None:
        """The addresses of the mesh `up` started here, if any."""
        try:
            data = json.loads((home / STATE_FILE).read_text())
            return cls(**{k: str(data.get(k, "")) for k in ("store", "hands", "brain", "model", "proxy")})
        except (OSError, ValueError, TypeError):
            return None


class LocalMesh:
    """Starts and stops the mesh's processes; `say` reports progress to the user."""

    def __init__(self, home: Path, environ: Mapping[str, str], say: Callable[[str], None]) -> None:
        self.home = home
        self._environ = dict(environ)
        self._say = say
        self._processes: list[ServiceProcess] = []
        self.addresses: MeshAddresses | None = None
        self.uses_standin = not environ.get("ANTHROPIC_API_KEY")
        self._secret_file = home / SECRET_FILE
        # Marks every process of this mesh (in its environment) for the watchdog.
        self._run_token = secrets.token_hex(16)
        self._watchdog: subprocess.Popen[bytes] | None = None

    def _ensure_keys(self) -> Path:
        """Makes the mesh secret and the vault key on first start; later starts reuse them."""
        from mcp_proxy.vault import VaultKey, write_key_file

        if not self._secret_file.exists():
            write_secret_file(self._secret_file)
        vault_key = self.home / VAULT_KEY_FILE
        if not vault_key.exists():
            write_key_file(vault_key, VaultKey.generate())
        return vault_key

    def _start_watchdog(self) -> None:
        """Starts the process that stops the mesh if this one dies without stopping it (`mesh_watchdog`)."""
        logs = self.home / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in self._environ.items() if k != RUN_ENV}
        with (logs / "mesh_watchdog.log").open("ab") as log:
            self._watchdog = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "managed_agents.mesh_watchdog",
                    self._run_token,
                    str(STOP_GRACE_S),
                    str(self.home / STATE_FILE),
                ],
                stdin=subprocess.PIPE,
                stdout=log,
                stderr=log,
                cwd=ROOT,
                env=env,
                start_new_session=True,  # the terminal's Ctrl-C and hangup are for `up`, not for it
            )

    def _tell_watchdog(self, line: str) -> None:
        if self._watchdog is None or self._watchdog.stdin is None or self._watchdog.stdin.closed:
            return
        with contextlib.suppress(OSError):  # it died: nothing to tell
            self._watchdog.stdin.write(line.encode() + b"\n")
            self._watchdog.stdin.flush()

    def _stop_watchdog(self) -> None:
        """Closes the watchdog's pipe (it then stops whatever of the mesh is left) and waits for it."""
        watchdog, self._watchdog = self._watchdog, None
        if watchdog is None:
            return
        if watchdog.stdin is not None:
            with contextlib.suppress(OSError):
                watchdog.stdin.close()
        try:
            watchdog.wait(STOP_GRACE_S + 5)
        except subprocess.TimeoutExpired:
            watchdog.kill()
            watchdog.wait()

    def _start(self, label: str, module: str, args: list[str], env: Mapping[str, str] | None = None) -> str:
        env = {
            **self._environ,
            SECRET_FILE_ENV: str(self._secret_file.resolve()),
            RUN_ENV: self._run_token,
            **(env or {}),
        }
        process = ServiceProcess(module, args, self.home / "logs", env=env)
        # Listed before it starts: if starting is interrupted (Ctrl-C, SIGTERM), `stop` stops it too.
        self._processes.append(process)
        process.start(timeout=60)
        self._tell_watchdog(f"+{process.pid}")
        self._say(f"{label:<12} {process.address:<22} pid {process.pid:<7} log {process.log_path}")
        return process.address

    def start(self, *, standin_script: str = "demo", hands_backend: str = "bwrap") -> MeshAddresses:
        """Starts every service and waits until each serves."""
        brain_env: dict[str, str] = {}
        model = ""
        vault_key = self._ensure_keys()
        try:
            self._start_watchdog()
            if self.uses_standin:
                address = self._start("model", "managed_agents.standin", ["--script", standin_script])
                model = f"http://{address}"
                brain_env = {"ANTHROPIC_BASE_URL": model, "ANTHROPIC_API_KEY": "stand-in"}
            store = self._start("store", "session_store", ["--data-dir", str(self.home / "store")])
            proxy = self._start(
                "mcp_proxy", "mcp_proxy", ["--data-dir", str(self.home / "proxy"), "--key-file", str(vault_key)]
            )
            hands = self._start(
                "hands",
                "hands",
                ["--work-root", str(self.home / "sandboxes"), "--backend", hands_backend, "--proxy", proxy],
            )
            brain = self._start("brain", "brain", ["--store", store, "--hands", hands, "--proxy", proxy], env=brain_env)
        except BaseException:
            self.stop()
            raise
        self.addresses = MeshAddresses(store=store, hands=hands, brain=brain, model=model, proxy=proxy)
        self.addresses.save(self.home)
        self._tell_watchdog("=" + json.dumps(asdict(self.addresses)))
        return self.addresses

    def stop(self) -> None:
        """Stops the processes, newest first (the brain releases its sessions before the store goes): SIGTERM,
        then SIGKILL after `STOP_GRACE_S`; removes `mesh.json`."""
        for process in reversed(self._processes):
            process.stop()
            if process.proc is not None:
                self._tell_watchdog(f"-{process.pid}")
        self._processes.clear()
        (self.home / STATE_FILE).unlink(missing_ok=True)
        self._stop_watchdog()

    def kill(self) -> None:
        """SIGKILL to every process still running, without waiting (safe in a signal handler while `stop` runs,
        which then finishes at once)."""
        for process in list(self._processes):
            if process.proc is not None and process.running():
                process.proc.kill()

    def dead(self) -> list[str]:
        """Modules whose process has exited."""
        return [p.module for p in self._processes if not p.running()]


def local_mesh_secret(home: Path) -> str:
    """The secret of the mesh `up` started under `home` ('' if it never ran there)."""
    try:
        return mesh_secret({SECRET_FILE_ENV: str(home / SECRET_FILE)})
    except ValueError:
        return ""
