"""A stand-in OTLP collector: a real gRPC server implementing `opentelemetry.proto`'s TraceService (every span
it receives is kept, so tests can check which processes took part in a trace and how) and MetricsService
(the names of the metrics each service exported are kept)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


@dataclass(frozen=True, slots=True)
class CollectedSpan:
    """One exported span, flattened."""

    service: str
    name: str
    kind: int
    trace_id: str
    span_id: str
    parent_span_id: str
    links: tuple[tuple[str, str], ...]
    attributes: dict[str, object]


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """Receives OTLP/gRPC trace exports."""

    def __init__(self) -> None:
        self.spans: list[CollectedSpan] = []
        self.metrics: dict[str, set[str]] = {}  # service name -> names of the metrics it exported
        self._server: grpc.aio.Server | None = None
        self.endpoint = ""

    async def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.aio.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        for resource_spans in request.resource_spans:
            service = next(
                (a.value.string_value for a in resource_spans.resource.attributes if a.key == "service.name"), ""
            )
            for scope in resource_spans.scope_spans:
                for span in scope.spans:
                    self.spans.append(
                        CollectedSpan(
                            service=service,
                            name=span.name,
                            kind=span.kind,
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_span_id=span.parent_span_id.hex(),
                            links=tuple((link.trace_id.hex(), link.span_id.hex()) for link in span.links),
                            attributes={
                                a.key: a.value.string_value or a.value.int_value or a.value.bool_value
                                for a in span.attributes
                            },
                        )
                    )
        return trace_service_pb2.ExportTraceServiceResponse()

    async def start(self) -> str:
        """Serves on a free loopback port; returns the endpoint URL for `OTEL_EXPORTER_OTLP_ENDPOINT`."""
        self._server = grpc.aio.server()
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self._server)
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(_Metrics(self), self._server)
        port = self._server.add_insecure_port("127.0.0.1:0")
        await self._server.start()
        self.endpoint = f"http://127.0.0.1:{port}"
        return self.endpoint

    async def stop(self) -> None:
        """Stops serving."""
        if self._server is not None:
            await self._server.stop(1)

    def trace(self, trace_id: str) -> list[CollectedSpan]:
        """The spans of one trace."""
        return [s for s in self.spans if s.trace_id == trace_id]

    async def wait_for(self, predicate: object, timeout: float = 20) -> None:
        """Waits until `predicate(self)` holds (exports arrive in batches)."""

        async def poll() -> None:
            while not predicate(self):  # type: ignore[operator]
                await asyncio.sleep(0.05)

        await asyncio.wait_for(poll(), timeout)


class _Metrics(metrics_service_pb2_grpc.MetricsServiceServicer):
    """Receives OTLP/gRPC metric exports for a `Collector`."""

    def __init__(self, collector: Collector) -> None:
        self._collector = collector

    async def Export(
        self, request: metrics_service_pb2.ExportMetricsServiceRequest, context: grpc.aio.ServicerContext
    ) -> metrics_service_pb2.ExportMetricsServiceResponse:
        for resource_metrics in request.resource_metrics:
            service = next(
                (a.value.string_value for a in resource_metrics.resource.attributes if a.key == "service.name"), ""
            )
            names = self._collector.metrics.setdefault(service, set())
            for scope in resource_metrics.scope_metrics:
                names.update(m.name for m in scope.metrics)
        return metrics_service_pb2.ExportMetricsServiceResponse()
