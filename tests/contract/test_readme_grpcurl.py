"""The README's "Debug with grpcurl" commands, run verbatim with the real grpcurl against a running mesh."""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
from pathlib import Path

from managed_agents.standin.script import Script, step, text
from session_store.app import StoreServer
from tests.conftest import MESH_SECRET, StartBrain, StartStandin
from tests.helpers import ROOT

BIN = Path(sys.executable).parent


def readme_commands() -> list[str]:
    """The grpcurl lines of the README's grpcurl block (backslash continuations joined)."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Debug with grpcurl") :]
    block = re.search(r"```sh\n(.*?)```", section, re.DOTALL)
    assert block, "the README has a grpcurl code block"
    joined = block.group(1).replace("\\\n", " ")
    return [line.strip() for line in joined.splitlines() if line.strip().startswith("grpcurl ")]


async def test_the_readme_grpcurl_commands_work_verbatim(
    closed_store: StoreServer, start_standin: StartStandin, start_brain: StartBrain
) -> None:
    standin = await start_standin(Script(steps=(step(text("hello from the mesh")),)))
    brain = await start_brain(standin, store=closed_store.address, mesh_secret=MESH_SECRET)
    env = {
        **os.environ,
        "PATH": f"{BIN}:{os.environ['PATH']}",
        "S": closed_store.address,
        "B": brain.address,
        "H": f"authorization: Bearer {MESH_SECRET}",
    }
    commands = readme_commands()
    assert len(commands) >= 9
    outputs = {}
    for command in commands:
        streaming = "WatchSession" in command
        process = await asyncio.create_subprocess_exec(
            "bash",
            "-c",
            f"timeout 3 {command}" if streaming else command,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(process.communicate(), 30)
        expected = 124 if streaming else 0  # `timeout` stops the stream, which would otherwise follow the log
        assert process.returncode == expected, f"{command}\n{err.decode()}"
        outputs[command.split()[-1]] = out.decode()
        if command.endswith("/Wake"):
            await asyncio.sleep(1)  # let the turn finish before the reads below
    assert "managed_agents.v1.SessionService" in outputs["list"]
    assert json.loads(outputs["managed_agents.v1.BrainService/Wake"])["outcome"] == "WAKE_OUTCOME_STARTED"
    session = json.loads(outputs["managed_agents.v1.SessionService/GetSession"])
    assert [e["type"] for e in session["events"]][:2] == ["user.message", "session.status_running"]
    assert "hello from the mesh" in outputs["managed_agents.v1.SessionService/WatchSession"]
    assert json.loads(outputs["grpc.health.v1.Health/Check"])["status"] == "SERVING"
    # The same command without the secret is refused, with a sentence.
    refused = await asyncio.create_subprocess_exec(
        "bash",
        "-c",
        commands[0].replace('-H "$H" ', ""),
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await refused.communicate()
    assert refused.returncode != 0 and "accepts calls only from its mesh" in err.decode()
