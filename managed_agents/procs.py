"""Mesh services as child processes on loopback: started with `--listen 127.0.0.1:0`, found through the port
file they write once serving. The CLI's `demo`/`up` and the tests start services this way."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class ServiceProcess:
    """One service process (`python -m MODULE`), logging to a file in `workdir`."""

    def __init__(self, module: str, args: Sequence[str], workdir: Path, env: Mapping[str, str] | None = None) -> None:
        self.module = module
        self.args = list(args)
        self.workdir = workdir
        self.env = {**os.environ, **(env or {})}
        self.port_file = workdir / f"{module}.port"
        self.log_path = workdir / f"{module}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.address = ""

    def start(self, timeout: float = 30.0, *, listen: str = "127.0.0.1:0") -> ServiceProcess:
        """Starts the process and waits until it serves; raises with its log if it dies or hangs."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port_file.unlink(missing_ok=True)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    self.module,
                    "--listen",
                    listen,
                    "--port-file",
                    str(self.port_file),
                    *self.args,
                ],
                cwd=ROOT,
                env=self.env,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while not self.port_file.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.module} exited with code {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"{self.module} did not start within {timeout:.0f} s:\n{self.log()}")
            time.sleep(0.02)
        self.address = self.port_file.read_text().strip()
        return self

    def restart(self, timeout: float = 30.0) -> ServiceProcess:
        """Starts the process again on the address it had (after it died or was killed)."""
        return self.start(timeout, listen=self.address)

    @property
    def pid(self) -> int:
        """Process id."""
        assert self.proc is not None
        return self.proc.pid

    def running(self) -> bool:
        """True while the process lives."""
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        """What the process wrote so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self) -> None:
        """SIGKILL, as a crash would; waits for the process to be gone."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM (graceful stop) and wait; returns the exit code."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def stop(self) -> None:
        """Stops the process if it still runs: SIGTERM, then SIGKILL after 10 s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


async def stop_all(*processes: ServiceProcess) -> None:
    """Stops processes at once, off the event loop: a stopping service flushes to servers that may live on
    this very loop (a test's OTLP collector, a stand-in model), which a blocking wait would starve."""
    await asyncio.gather(*(asyncio.to_thread(process.stop) for process in processes))
