"""A mesh of real processes for end-to-end tests: store, hands and brains as subprocesses; the stand-in model
(the one thing that may be stood in for) runs in the test process."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from managed_agents.procs import ServiceProcess
from managed_agents.standin.script import Script
from managed_agents.standin.server import StandinServer


@dataclass
class Mesh:
    """The processes of one test's mesh."""

    workdir: Path
    store: ServiceProcess
    hands: ServiceProcess
    standin: StandinServer
    brains: list[ServiceProcess] = field(default_factory=list)

    def start_brain(self, *, failpoints: str = "", name: str = "") -> ServiceProcess:
        """Starts one more brain process (failpoints: `MANAGED_AGENTS_FAILPOINTS` for it alone)."""
        env = {"ANTHROPIC_BASE_URL": self.standin.base_url, "ANTHROPIC_API_KEY": "test-key"}
        if failpoints:
            env["MANAGED_AGENTS_FAILPOINTS"] = failpoints
        brain = ServiceProcess(
            "brain",
            [
                "--store",
                self.store.address,
                "--hands",
                self.hands.address,
                "--lease-ttl",
                "2",
                "--scan-interval",
                "0.5",
                "--retry-delay",
                "0.05",
                "--log-level",
                "info",
            ],
            self.workdir / (name or f"brain{len(self.brains)}"),
            env=env,
        )
        self.brains.append(brain.start())
        return brain


@pytest.fixture
async def mesh(tmp_path: Path) -> AsyncIterator[Mesh]:
    """Store and hands processes and a stand-in model with an empty script (tests set theirs)."""
    store = ServiceProcess("session_store", ["--data-dir", str(tmp_path / "store")], tmp_path / "store-proc")
    hands = ServiceProcess("hands", ["--work-root", str(tmp_path / "sandboxes")], tmp_path / "hands-proc")
    standin = await StandinServer.start(Script(steps=()))
    started = Mesh(tmp_path, store.start(), hands.start(), standin)
    try:
        yield started
    finally:
        for brain in started.brains:
            brain.stop()
        hands.stop()
        store.stop()
        await standin.aclose()
