"""Metrics: after a real session, each server's Prometheus endpoint shows what happened; with an OTLP
endpoint set, the same instruments reach the collector."""

from __future__ import annotations

import os
import re
from pathlib import Path

import aiohttp
import pytest

from brain.client import BrainClient
from hands import app as hands_app
from hands.config import HandsConfig
from managed_agents import events
from managed_agents.mesh.errors import NotFound, NotMeshPeer
from managed_agents.mesh.metrics import ServiceMetrics
from managed_agents.procs import ServiceProcess, stop_all
from managed_agents.standin.script import Script, step, text, tool
from session_store import app as store_app
from session_store.client import SessionStoreClient
from session_store.config import StoreConfig
from tests.brain.helpers import wait_idle
from tests.conftest import MESH_SECRET, StartBrain, StartStandin
from tests.e2e.collector import Collector
from tests.helpers import assert_eventually


async def _scrape(address: str) -> dict[str, float]:
    async with aiohttp.ClientSession() as http, http.get(f"http://{address}/metrics") as response:
        assert response.status == 200 and response.content_type == "text/plain"
        body = await response.text()
    samples = {}
    for line in body.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


async def _running_is(address: str, value: float) -> bool:
    return (await _scrape(address))["managed_agents_brain_sessions_running"] == value


def _sum(samples: dict[str, float], pattern: str) -> float:
    return sum(v for k, v in samples.items() if re.fullmatch(pattern, k))


async def test_prometheus_endpoints_show_a_session(
    tmp_path: Path, start_standin: StartStandin, start_brain: StartBrain
) -> None:
    store = await store_app.start(
        StoreConfig(listen="127.0.0.1:0", data_dir=tmp_path / "metered-store", metrics_listen="127.0.0.1:0"), None
    )
    hands = await hands_app.start(
        HandsConfig(listen="127.0.0.1:0", work_root=tmp_path / "metered-sb", metrics_listen="127.0.0.1:0"), None
    )
    try:
        standin = await start_standin(Script(steps=(step(tool("bash", command="echo hi")), step(text("done")))))
        brain = await start_brain(standin, store=store.address, hands=hands.address, metrics_listen="127.0.0.1:0")
        async with SessionStoreClient.connect(store.address) as client:
            session = await client.create_session()
            await client.emit(session.id, events.user_message("say hi"))
            async with BrainClient.connect(brain.address) as wake:
                await wake.wake(session.id)
            log = await wait_idle(client, session.id)
        store_samples = await _scrape(store.metrics.address)
        appended = _sum(store_samples, r'managed_agents_store_events_appended_total\{type=".*"\}')
        assert appended == len(log)
        assert store_samples['managed_agents_store_events_appended_total{type="user_message"}'] == 1
        assert store_samples["managed_agents_store_append_duration_seconds_count"] > 0
        assert store_samples['managed_agents_store_append_duration_seconds_bucket{le="+Inf"}'] > 0
        brain_samples = await _scrape(brain.metrics.address)
        assert brain_samples['managed_agents_brain_model_tokens_total{kind="input"}'] > 0
        assert brain_samples['managed_agents_brain_model_tokens_total{kind="output"}'] > 0
        assert brain_samples['managed_agents_brain_model_calls_total{outcome="ok"}'] == 2
        assert brain_samples['managed_agents_brain_tool_calls_total{error="False",route="hands",tool="bash"}'] == 1
        # The run ends just after it logs the idle event (it releases the lease, then looks for late input).
        await assert_eventually(lambda: _running_is(brain.metrics.address, 0))
        assert _sum(brain_samples, r'rpc_server_calls_total\{.*rpc_method="Wake".*\}') == 1
        hands_samples = await _scrape(hands.metrics.address)
        assert _sum(hands_samples, r'rpc_server_calls_total\{rpc_grpc_status_code="OK",rpc_method="Execute",.*\}') == 1
        assert hands_samples['managed_agents_hands_executions_total{error="False",status="completed",tool="bash"}'] == 1
        assert hands_samples["managed_agents_hands_sandboxes_live"] == 1
    finally:
        await hands.aclose(grace=1)
        await store.aclose(grace=1)


def test_metrics_cost_nothing_unless_asked_for() -> None:
    assert not ServiceMetrics.build("x", {}).enabled
    assert ServiceMetrics.build("x", {}, listen="127.0.0.1:0").enabled
    assert ServiceMetrics.build("x", {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:1"}).enabled
    assert ServiceMetrics.build("x", {"OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "http://127.0.0.1:1"}).enabled
    # An endpoint for traces only exports no metrics (they would go to the exporter's default, localhost:4317).
    assert not ServiceMetrics.build("x", {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:1"}).enabled


@pytest.mark.slow
async def test_with_an_otlp_endpoint_metrics_reach_the_collector(tmp_path: Path) -> None:
    collector = Collector()
    await collector.start()
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint,
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_METRIC_EXPORT_INTERVAL": "200",
    }
    store = ServiceProcess("session_store", ["--data-dir", str(tmp_path / "store")], tmp_path, env=env).start()
    try:
        async with SessionStoreClient.connect(store.address) as client:
            session = await client.create_session()
            await client.emit(session.id, events.user_message("counted"))
        await collector.wait_for(
            lambda c: "managed_agents.store.events_appended" in c.metrics.get("session-store", set())
        )
    finally:
        await stop_all(store)
        await collector.stop()
    assert "managed_agents.store.append_duration" in collector.metrics["session-store"]
    assert os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") is None, "the test process itself exported nothing"


async def test_rpcs_are_counted_by_method_and_status_code(tmp_path: Path) -> None:
    store = await store_app.start(
        StoreConfig(
            listen="127.0.0.1:0",
            data_dir=tmp_path / "store",
            metrics_listen="127.0.0.1:0",
            mesh_secret=MESH_SECRET,
        ),
        None,
    )
    try:
        async with SessionStoreClient.connect(store.address, mesh_secret=MESH_SECRET) as client:
            session = await client.create_session()
            await client.emit(session.id, events.user_message("counted"))
            with pytest.raises(NotFound):
                await client.get_session("no-such-session")
            async for _ in client.watch(session.id):
                break  # the client leaves the stream: the server sees it cancelled
        async with SessionStoreClient.connect(store.address) as stranger:
            with pytest.raises(NotMeshPeer):
                await stranger.list_sessions()
        samples: dict[str, float] = {}

        def calls(method: str, code: str) -> float:
            return samples.get(
                f'rpc_server_calls_total{{rpc_grpc_status_code="{code}",rpc_method="{method}",'
                f'rpc_service="managed_agents.v1.SessionService"}}',
                0,
            )

        async def watch_counted() -> bool:
            nonlocal samples
            samples = await _scrape(store.metrics.address)
            return calls("WatchSession", "CANCELLED") == 1

        await assert_eventually(watch_counted)
        assert calls("CreateSession", "OK") == 1
        assert calls("EmitEvent", "OK") == 1
        assert calls("GetSession", "NOT_FOUND") == 1
        assert calls("ListSessions", "UNAUTHENTICATED") == 1
        duration = (
            'rpc_server_call_duration_seconds_count{rpc_method="EmitEvent",'
            'rpc_service="managed_agents.v1.SessionService"}'
        )
        assert samples[duration] == 1
    finally:
        await store.aclose(grace=1)


async def test_a_service_process_announces_its_metrics_address(tmp_path: Path) -> None:
    store = ServiceProcess(
        "session_store",
        ["--data-dir", str(tmp_path / "store"), "--metrics-listen", "127.0.0.1:0"],
        tmp_path,
    ).start()
    try:
        found = re.search(r"metrics on http://(127\.0\.0\.1:\d+)/metrics", store.log())
        assert found, store.log()
        async with SessionStoreClient.connect(store.address) as client:
            await client.create_session()
        samples = await _scrape(found.group(1))
    finally:
        store.stop()
    assert _sum(samples, r'rpc_server_calls_total\{rpc_grpc_status_code="OK",rpc_method="CreateSession",.*\}') == 1
