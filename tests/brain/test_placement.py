"""Several hands servers behind one brain: least-loaded placement, placement labels, routing by owner after a
wake, and a session asking for labels nobody carries."""

from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from brain.client import BrainClient
from brain.hands_router import HandsRouter
from hands import app as hands_app
from hands.client import HandsClient
from hands.config import HandsConfig, parse_labels
from managed_agents import events
from managed_agents.mesh.errors import InvalidArgument, LabelsNotCarried, Unavailable
from managed_agents.standin.script import Script, step, text, tool
from managed_agents.v1 import sandbox_pb2, session_pb2
from session_store.client import SessionStoreClient
from tests.brain.conftest import StartBrain, StartStandin
from tests.brain.helpers import start_session, stop_reasons, wait_idle

StartHands = Callable[..., Awaitable[hands_app.HandsServer]]


@pytest.fixture
async def start_hands(tmp_path: Path) -> AsyncIterator[StartHands]:
    started: list[hands_app.HandsServer] = []

    async def start(name: str, labels: str = "") -> hands_app.HandsServer:
        config = HandsConfig(
            listen="127.0.0.1:0", work_root=tmp_path / name, instance=name, labels=parse_labels(labels)
        )
        server = await hands_app.start(config, None)
        started.append(server)
        return server

    yield start
    for server in started:
        await server.aclose(grace=1.0)


def _router(*servers: hands_app.HandsServer) -> HandsRouter:
    return HandsRouter([HandsClient.connect(s.address) for s in servers])


def _labels(**pairs: str) -> sandbox_pb2.Resources:
    return sandbox_pb2.Resources(labels=pairs)


async def test_least_loaded_placement_and_labels(start_hands: StartHands) -> None:
    plain = await start_hands("plain")
    gpu = await start_hands("gpu", "gpu=a100,zone=b")
    router = _router(plain, gpu)
    try:
        placed = Counter([(await router.provision()).hands_instance for _ in range(4)])
        assert placed == {"plain": 2, "gpu": 2}, "new sandboxes go to the least loaded server"
        labelled = [(await router.provision(resources=_labels(gpu="a100"))).hands_instance for _ in range(3)]
        assert labelled == ["gpu"] * 3, "only the server carrying the labels hosts them, however loaded"
        with pytest.raises(LabelsNotCarried, match="no reachable hands server carries the labels gpu=h100"):
            await router.provision(resources=_labels(gpu="h100"))
        with pytest.raises(InvalidArgument, match="label key"):
            await router.provision(resources=_labels(**{"bad key": "x"}))
        async with HandsClient.connect(plain.address) as direct:
            with pytest.raises(LabelsNotCarried, match=r"does not carry the labels gpu=a100 \(its labels: none\)"):
                await direct.provision(resources=_labels(gpu="a100"))
    finally:
        await router.aclose()


async def test_a_fresh_router_finds_each_sandbox_on_its_owner(start_hands: StartHands) -> None:
    first, second = await start_hands("one"), await start_hands("two")
    placing = _router(first, second)
    sandboxes = [await placing.provision() for _ in range(4)]
    await placing.aclose()
    woken = _router(first, second)  # a brain that never saw these sandboxes, as after a wake
    try:
        for sandbox in sandboxes:
            response = await woken.execute(
                sandbox.id, execution_id=f"x-{sandbox.id}", name="bash", input={"command": "echo here"}
            )
            assert response.output == "here\n" and not response.is_error
        await first.aclose(grace=0)
        on_first = [s for s in sandboxes if s.hands_instance == "one"]
        with pytest.raises(Unavailable, match="unreachable"):
            await _router(first, second).execute(
                on_first[0].id, execution_id="y", name="bash", input={"command": "true"}
            )
        assert (await woken.provision()).hands_instance == "two", "a server that is down is skipped"
    finally:
        await woken.aclose()


def test_bad_labels_on_the_command_line_are_a_usage_error() -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="is not key=value"):
        parse_labels("gpu")
    with pytest.raises(argparse.ArgumentTypeError, match="label value"):
        parse_labels("gpu=a 100")
    assert parse_labels("zone=b, gpu=a100") == (("gpu", "a100"), ("zone", "b"))


async def test_a_session_asking_for_labels_nobody_carries_hears_why_and_ends_its_turn(
    store: SessionStoreClient, start_hands: StartHands, start_standin: StartStandin, start_brain: StartBrain
) -> None:
    hands = await start_hands("plain")
    standin = await start_standin(Script(steps=(step(tool("bash", command="nvidia-smi")), step(text("no GPU")))))
    brain = await start_brain(standin, hands=hands.address)
    agent = session_pb2.AgentConfig(resources=_labels(gpu="a100"))
    session_id = await start_session(store, "train a model", agent=agent)
    async with BrainClient.connect(brain.address) as client:
        await client.wake(session_id)
    log = await wait_idle(store, session_id)
    results = [e.agent_tool_result for e in log if e.HasField("agent_tool_result")]
    assert len(results) == 1 and results[0].is_error
    assert "No sandbox could be provisioned" in events.plain_text(results[0].content)
    assert "gpu=a100" in events.plain_text(results[0].content)
    assert stop_reasons(log) == ["end_turn"]
