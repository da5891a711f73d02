"""One trace per turn across every process: the client's Wake, the brain's turn and model calls, EmitEvent in
the store, Execute in hands, CallTool in the mcp_proxy; and a turn resumed by another brain after a crash
links back to the one cut off."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from brain.client import BrainClient
from managed_agents import events
from managed_agents.procs import ServiceProcess, stop_all
from managed_agents.standin.script import Script, step, text, tool
from managed_agents.standin.server import StandinServer
from managed_agents.v1 import session_pb2
from mcp_proxy.client import McpProxyClient
from mcp_proxy.vault import VaultKey, write_key_file
from session_store.client import SessionStoreClient
from tests.brain.helpers import wait_idle
from tests.e2e.collector import CollectedSpan, Collector
from tests.mcp_proxy.servers import Upstream, credential_for

pytestmark = pytest.mark.slow

SERVER, CLIENT = 2, 3  # OTLP span kinds


@pytest.fixture
async def collector() -> AsyncIterator[Collector]:
    collector = Collector()
    await collector.start()
    yield collector
    await collector.stop()


def _tracing_env(collector: Collector) -> dict[str, str]:
    # Export at once: a killed process keeps only what it already sent.
    return {
        "OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint,
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_BSP_SCHEDULE_DELAY": "50",
    }


def _by_id(spans: list[CollectedSpan]) -> dict[str, CollectedSpan]:
    return {s.span_id: s for s in spans}


def _ancestors(span: CollectedSpan, index: dict[str, CollectedSpan]) -> list[CollectedSpan]:
    chain = []
    while span.parent_span_id in index:
        span = index[span.parent_span_id]
        chain.append(span)
    return chain


async def test_one_trace_follows_a_turn_through_every_process(tmp_path: Path, collector: Collector) -> None:
    env = _tracing_env(collector)
    standin = await StandinServer.start(
        Script(
            steps=(
                step(tool("bash", command="echo traced")),
                step(tool("files__add", a=1, b=2)),
                step(text("done")),
            )
        )
    )
    upstream = await Upstream().start()
    key_file = tmp_path / "vault.key"
    write_key_file(key_file, VaultKey.generate())
    proxy = ServiceProcess(
        "mcp_proxy",
        ["--data-dir", str(tmp_path / "proxy"), "--key-file", str(key_file)],
        tmp_path / "p",
        env=env,
    ).start()
    store = ServiceProcess("session_store", ["--data-dir", str(tmp_path / "store")], tmp_path / "s", env=env).start()
    hands = ServiceProcess("hands", ["--work-root", str(tmp_path / "sb")], tmp_path / "h", env=env).start()
    brain = ServiceProcess(
        "brain",
        ["--store", store.address, "--hands", hands.address, "--proxy", proxy.address],
        tmp_path / "b",
        env={**env, "ANTHROPIC_BASE_URL": standin.base_url, "ANTHROPIC_API_KEY": "k"},
    ).start()
    client_provider = TracerProvider(resource=Resource.create({"service.name": "test-client"}))
    client_provider.add_span_processor(
        # A batch processor exports from its own thread: a synchronous export from this event loop would block
        # the very collector it sends to.
        BatchSpanProcessor(OTLPSpanExporter(endpoint=collector.endpoint, insecure=True))
    )
    try:
        async with McpProxyClient.connect(proxy.address) as vault:
            await vault.put_credential(*credential_for(upstream))
        async with SessionStoreClient.connect(store.address) as store_client:
            session = await store_client.create_session(agent=session_pb2.AgentConfig(mcp_servers=["files"]))
            await store_client.emit(session.id, events.user_message("trace me"))
            async with BrainClient.connect(brain.address, tracer_provider=client_provider) as brain_client:
                with client_provider.get_tracer("test").start_as_current_span("client.turn") as root:
                    await brain_client.wake(session.id)
                trace_id = format(root.get_span_context().trace_id, "032x")
            log = await wait_idle(store_client, session.id)
        await asyncio.to_thread(client_provider.force_flush)
        await collector.wait_for(lambda c: any(s.name == "brain.turn" for s in c.trace(trace_id)))
        await collector.wait_for(
            lambda c: {"session-store", "hands", "brain", "mcp-proxy"} <= {s.service for s in c.trace(trace_id)}
        )
    finally:
        await stop_all(brain, proxy, hands, store)
        await upstream.stop()
        client_provider.shutdown()
        await standin.aclose()
    spans = collector.trace(trace_id)
    index = _by_id(spans)
    services = {s.service for s in spans}
    assert {"test-client", "brain", "session-store", "hands", "mcp-proxy"} <= services
    turn = next(s for s in spans if s.name == "brain.turn")
    wake_server = index[turn.parent_span_id]
    assert (wake_server.service, wake_server.kind) == ("brain", SERVER) and wake_server.name.endswith("/Wake")
    execute = next(s for s in spans if s.service == "hands" and s.name.endswith("/Execute") and s.kind == SERVER)
    chain = [s.name for s in _ancestors(execute, index)]
    assert chain[:3] == ["/managed_agents.v1.HandsService/Execute", "brain.tool_call", "brain.turn"]
    assert chain[-1] == "client.turn"
    call_tool = next(s for s in spans if s.service == "mcp-proxy" and s.name.endswith("/CallTool") and s.kind == SERVER)
    chain = [s.name for s in _ancestors(call_tool, index)]
    assert chain[:3] == ["/managed_agents.v1.McpProxyService/CallTool", "brain.tool_call", "brain.turn"]
    emits = [s for s in spans if s.service == "session-store" and s.name.endswith("/BatchEmitEvents")]
    assert emits and all("brain.turn" in [a.name for a in _ancestors(e, index)] for e in emits)
    model_calls = [s for s in spans if s.name == "brain.model_call"]
    assert len(model_calls) == 3 and all(s.attributes.get("gen_ai.usage.output_tokens") for s in model_calls)
    # Every event the brain wrote in this turn names this trace.
    written = [e for e in log if e.producer.startswith("brain/")]
    assert written and {e.trace_id for e in written} == {trace_id}


async def test_a_turn_resumed_after_a_crash_links_to_the_one_cut_off(tmp_path: Path, collector: Collector) -> None:
    env = _tracing_env(collector)
    standin = await StandinServer.start(Script(steps=(step(tool("bash", command="echo once")), step(text("ok")))))
    brain_env = {**env, "ANTHROPIC_BASE_URL": standin.base_url, "ANTHROPIC_API_KEY": "k"}
    store = ServiceProcess("session_store", ["--data-dir", str(tmp_path / "store")], tmp_path / "s", env=env).start()
    hands = ServiceProcess("hands", ["--work-root", str(tmp_path / "sb")], tmp_path / "h", env=env).start()
    brain_args = ["--store", store.address, "--hands", hands.address, "--lease-ttl", "2", "--scan-interval", "0.5"]
    doomed = ServiceProcess(
        "brain",
        brain_args,
        tmp_path / "b1",
        env={**brain_env, "MANAGED_AGENTS_FAILPOINTS": "brain.after_tool_use_logged=crash"},
    )
    survivor = ServiceProcess("brain", brain_args, tmp_path / "b2", env=brain_env)
    try:
        doomed.start()
        async with SessionStoreClient.connect(store.address) as store_client:
            session = await store_client.create_session()
            await store_client.emit(session.id, events.user_message("crash in the middle"))
            async with BrainClient.connect(doomed.address) as brain_client:
                await brain_client.wake(session.id)
            await asyncio.to_thread(doomed.proc.wait, 30)  # type: ignore[union-attr]
            survivor.start()
            log = await wait_idle(store_client, session.id, timeout=60)
        first_trace = next(e.trace_id for e in log if e.HasField("agent_tool_use"))
        await collector.wait_for(lambda c: any(s.name == "brain.turn" and s.links for s in c.spans))
    finally:
        await stop_all(survivor, doomed, hands, store)
        await standin.aclose()
    resumed = next(s for s in collector.spans if s.name == "brain.turn" and s.links)
    assert resumed.trace_id != first_trace, "the resumed turn is a trace of its own"
    assert resumed.links[0][0] == first_trace, "and it links to the turn that was cut off"
    result = next(e for e in log if e.HasField("agent_tool_result"))
    assert result.trace_id == resumed.trace_id
