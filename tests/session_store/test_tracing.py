"""With tracing on, store calls are spans and events name the trace that wrote them; with it off, a caller's
`traceparent` is still recorded."""

from __future__ import annotations

from pathlib import Path

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from managed_agents import events
from managed_agents.mesh.channel import dial
from managed_agents.v1 import session_pb2, session_pb2_grpc
from session_store import app
from session_store.client import SessionStoreClient
from session_store.config import StoreConfig


async def test_a_traced_append_records_the_client_trace_on_the_event(tmp_path: Path) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    server = await app.start(StoreConfig(listen="127.0.0.1:0", data_dir=tmp_path / "store"), provider)
    try:
        async with SessionStoreClient.connect(server.address, tracer_provider=provider) as store:
            session = await store.create_session()
            with provider.get_tracer("test").start_as_current_span("turn") as turn:
                stored = (await store.emit(session.id, events.user_message("hi"))).event
            expected_trace = format(turn.get_span_context().trace_id, "032x")
    finally:
        await server.aclose(grace=1)
    assert stored.trace_id == expected_trace
    spans = {(s.name, s.kind.name) for s in exporter.get_finished_spans()}
    assert ("/managed_agents.v1.SessionService/EmitEvent", "SERVER") in spans
    assert ("/managed_agents.v1.SessionService/EmitEvent", "CLIENT") in spans
    server_span = next(s for s in exporter.get_finished_spans() if s.kind.name == "SERVER" and "Emit" in s.name)
    assert format(server_span.context.span_id, "016x") == stored.span_id


async def test_an_untraced_store_records_the_callers_traceparent(store_server: app.StoreServer) -> None:
    channel = dial(store_server.address)
    try:
        stub = session_pb2_grpc.SessionServiceStub(channel)
        session = (await stub.CreateSession(session_pb2.CreateSessionRequest())).session
        traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        response = await stub.EmitEvent(
            session_pb2.EmitEventRequest(session_id=session.id, event=events.user_message("hi")),
            metadata=[("traceparent", traceparent)],
        )
        garbled = await stub.EmitEvent(
            session_pb2.EmitEventRequest(session_id=session.id, event=events.user_message("hi")),
            metadata=[("traceparent", "00-zz-yy-01")],
        )
    finally:
        await channel.close()
    assert response.event.trace_id == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert response.event.span_id == "00f067aa0ba902b7"
    assert garbled.event.trace_id == ""
