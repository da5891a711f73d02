"""A Node.js client (grpc-js + proto-loader, loading our .proto files directly) drives a real session."""

from __future__ import annotations

import asyncio
import json
import os
import shutil

from managed_agents.standin.script import Script, step, text
from session_store.app import StoreServer
from tests.conftest import MESH_SECRET, StartBrain, StartStandin
from tests.helpers import ROOT

CLIENT = ROOT / "examples" / "node" / "client.mjs"


async def test_the_node_client_creates_a_session_wakes_a_brain_and_tails_events(
    closed_store: StoreServer, start_standin: StartStandin, start_brain: StartBrain
) -> None:
    node = shutil.which("node")
    assert node, "node is required: Debian's nodejs package, or any Node.js 18+"
    assert (CLIENT.parent / "node_modules" / "@grpc" / "grpc-js").is_dir(), (
        "run `make test` (it runs npm ci in examples/node)"
    )
    standin = await start_standin(Script(steps=(step(text("hello, Node")),)))
    brain = await start_brain(standin, store=closed_store.address, mesh_secret=MESH_SECRET)
    process = await asyncio.create_subprocess_exec(
        node,
        str(CLIENT),
        closed_store.address,
        brain.address,
        "hi from node",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "MANAGED_AGENTS_MESH_SECRET": MESH_SECRET},
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode()
    lines = [json.loads(line) for line in out.decode().splitlines()]
    assert [e["type"] for e in lines] == [
        "user.message",
        "session.status_running",
        "span.model_request_start",
        "agent.message",
        "span.model_request_end",
        "session.status_idle",
    ]
    assert lines[3]["agent_message"]["content"][0]["text"]["text"] == "hello, Node"
    assert "wake: WAKE_OUTCOME_STARTED" in err.decode()
