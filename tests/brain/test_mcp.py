"""The brain with MCP servers behind the real mcp_proxy: tools offered, calls routed, failures as results,
and no MCP call sent twice after a brain stops mid-call."""

from __future__ import annotations

import asyncio

from brain.client import BrainClient
from managed_agents import events
from managed_agents.standin.script import Script, step, text, tool
from managed_agents.v1 import events_pb2, session_pb2
from mcp_proxy.app import ProxyServer
from mcp_proxy.client import McpProxyClient
from session_store.client import SessionStoreClient
from tests.brain.conftest import StartBrain, StartStandin
from tests.brain.helpers import start_session, stop_reasons, types, wait_idle
from tests.mcp_proxy.servers import Upstream, credential_for


def _mcp_results(log: list[events_pb2.Event]) -> list[tuple[bool, str]]:
    return [
        (e.agent_mcp_tool_result.is_error, events.plain_text(e.agent_mcp_tool_result.content))
        for e in log
        if e.HasField("agent_mcp_tool_result")
    ]


async def _granted_session(store: SessionStoreClient, text_: str, servers: list[str]) -> str:
    return await start_session(store, text_, agent=session_pb2.AgentConfig(mcp_servers=servers))


async def test_granted_mcp_tools_are_offered_and_called_through_the_proxy(
    store: SessionStoreClient,
    proxy_server: ProxyServer,
    proxy: McpProxyClient,
    mcp_upstream: Upstream,
    start_standin: StartStandin,
    start_brain: StartBrain,
) -> None:
    await proxy.put_credential(*credential_for(mcp_upstream))
    script = Script(
        steps=(
            step(tool("files__add", a=2, b=3)),
            step(tool("files__fail")),
            step(tool("tickets__echo", text="not granted")),
            step(text("sum was in the log")),
        )
    )
    standin = await start_standin(script)
    brain = await start_brain(standin, proxy=proxy_server.address)
    session_id = await _granted_session(store, "add two numbers", ["files"])
    async with BrainClient.connect(brain.address) as client:
        await client.wake(session_id)
    log = await wait_idle(store, session_id)

    offered = [t["name"] for t in standin.standin.requests[0]["tools"]]
    assert {"files__add", "files__echo", "files__slow", "files__fail", "read_session_events"} <= set(offered)
    uses = [e.agent_mcp_tool_use for e in log if e.HasField("agent_mcp_tool_use")]
    assert [(u.server_name, u.name) for u in uses] == [("files", "add"), ("files", "fail")]
    results = _mcp_results(log)
    assert results[0] == (False, "5")
    assert results[1][0] and "failed on purpose" in results[1][1]
    # A server the session was not granted is not offered, so its tool is unknown to the brain.
    unknown = [e.agent_tool_result for e in log if e.HasField("agent_tool_result")]
    assert len(unknown) == 1 and unknown[0].is_error
    assert "no tool named 'tickets__echo'" in events.plain_text(unknown[0].content)
    assert mcp_upstream.calls == ["add"]
    assert stop_reasons(log) == ["end_turn"]
    # The session token lives in the brain's memory only: nothing in the log looks like one.
    assert b"mst1." not in b"".join(e.SerializeToString() for e in log)
    # Claude saw the results as tool results of its calls.
    assert "failed on purpose" in str(standin.standin.requests[2]["messages"][-1])


async def test_an_upstream_that_goes_down_is_an_error_result_and_the_turn_goes_on(
    store: SessionStoreClient,
    proxy_server: ProxyServer,
    proxy: McpProxyClient,
    mcp_upstream: Upstream,
    start_standin: StartStandin,
    start_brain: StartBrain,
) -> None:
    await proxy.put_credential(*credential_for(mcp_upstream))
    script = Script(
        steps=(step(tool("files__echo", text="hi")), step(tool("files__echo", text="again"), latency_s=1.0))
    )
    script = Script(steps=(*script.steps, step(text("gave up on the server"))))
    standin = await start_standin(script)
    brain = await start_brain(standin, proxy=proxy_server.address)
    session_id = await _granted_session(store, "echo twice", ["files"])
    async with BrainClient.connect(brain.address) as client:
        await client.wake(session_id)
    async for event in store.watch(session_id):
        if event.HasField("agent_mcp_tool_result"):
            break
    await mcp_upstream.stop()  # down while the model thinks about the second call
    log = await wait_idle(store, session_id)
    results = _mcp_results(log)
    assert results[0] == (False, "hi")
    assert results[1][0], results
    assert stop_reasons(log) == ["end_turn"]


async def test_a_session_granted_mcp_servers_on_a_brain_without_a_proxy_says_so_and_runs(
    store: SessionStoreClient, start_standin: StartStandin, start_brain: StartBrain
) -> None:
    standin = await start_standin(Script(steps=(step(text("no MCP for me")),)))
    brain = await start_brain(standin)
    session_id = await _granted_session(store, "use files", ["files"])
    async with BrainClient.connect(brain.address) as client:
        await client.wake(session_id)
    log = await wait_idle(store, session_id)
    errors = [e.session_error for e in log if e.HasField("session_error")]
    assert [e.kind for e in errors] == ["mcp_unavailable"]
    assert "--proxy is empty" in errors[0].message
    assert stop_reasons(log) == ["end_turn"]


async def test_an_mcp_call_cut_off_by_a_stopping_brain_is_not_sent_again(
    store: SessionStoreClient,
    proxy_server: ProxyServer,
    proxy: McpProxyClient,
    mcp_upstream: Upstream,
    start_standin: StartStandin,
    start_brain: StartBrain,
) -> None:
    await proxy.put_credential(*credential_for(mcp_upstream))
    standin = await start_standin(Script(steps=(step(tool("files__slow", seconds=3)), step(text("checked")))))
    first = await start_brain(standin, proxy=proxy_server.address, scan_interval=60)
    session_id = await _granted_session(store, "do the slow thing", ["files"])
    async with BrainClient.connect(first.address) as client:
        await client.wake(session_id)
    while mcp_upstream.calls != ["slow"]:
        await asyncio.sleep(0.02)
    await first.aclose(grace=0)  # the brain goes away mid-call; its lease is released
    second = await start_brain(standin, proxy=proxy_server.address)
    async with BrainClient.connect(second.address) as client:
        await client.wake(session_id)
    log = await wait_idle(store, session_id)
    results = _mcp_results(log)
    assert len(results) == 1 and results[0][0]
    assert "not sent again" in results[0][1]
    await asyncio.sleep(3.5)  # long enough for a second call to have reached the server, had one been sent
    assert mcp_upstream.calls == ["slow"]
    assert "session.status_rescheduling" in types(log)
    assert stop_reasons(log) == ["end_turn"]
    assert [e.seq for e in log] == list(range(1, len(log) + 1))
