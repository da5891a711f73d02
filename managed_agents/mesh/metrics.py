"""Metrics of one process: OpenTelemetry instruments, exported over OTLP and/or served as Prometheus text.

Like tracing, metrics cost nothing unless asked for: with neither `OTEL_EXPORTER_OTLP_ENDPOINT` set nor a
`--metrics-listen` address, `ServiceMetrics.disabled()` hands out no-op instruments. With an OTLP endpoint
they are exported every `OTEL_METRIC_EXPORT_INTERVAL` ms (60 s by default); with `--metrics-listen HOST:PORT`
a small HTTP server answers `GET /metrics` in the Prometheus text format, collected at scrape time.

Names follow the OpenTelemetry conventions (dotted, unit suffixes in the unit field); the Prometheus text
turns dots into underscores and adds `_total`, `_seconds`, `_bucket` as Prometheus expects.
"""

from __future__ import annotations

import logging
import math
import os
import re
import socket
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from aiohttp import web
from opentelemetry import metrics
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    Histogram,
    InMemoryMetricReader,
    MetricReader,
    PeriodicExportingMetricReader,
    Sum,
)
from opentelemetry.sdk.resources import Resource

from managed_agents.mesh.telemetry import _version

log = logging.getLogger(__name__)

# Latency buckets in seconds: sub-millisecond appends up to minutes-long tool calls.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


class ServiceMetrics:
    """The meter of one service process, and what serves or exports its readings."""

    def __init__(self, provider: MeterProvider | None, scrape: InMemoryMetricReader | None, service: str) -> None:
        self._provider = provider
        self._scrape = scrape
        self._runner: web.AppRunner | None = None
        self.address = ""
        self.meter: metrics.Meter = (
            provider.get_meter(service) if provider is not None else metrics.NoOpMeterProvider().get_meter(service)
        )

    @property
    def enabled(self) -> bool:
        """True if readings go anywhere (hot paths skip recording otherwise)."""
        return self._provider is not None

    @classmethod
    def disabled(cls) -> ServiceMetrics:
        """No-op instruments (tests and processes that export nothing)."""
        return cls(None, None, "disabled")

    @classmethod
    def build(cls, service: str, environ: Mapping[str, str], *, listen: str = "") -> ServiceMetrics:
        """Instruments exported over OTLP when an endpoint is set, and scraped when `listen` is given."""
        readers: list[MetricReader] = []
        scrape = None
        if listen:
            scrape = InMemoryMetricReader()
            readers.append(scrape)
        # Not `tracing_enabled`: a traces-only endpoint would send metrics to the exporter's default,
        # localhost:4317, where nothing may listen.
        if environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"):
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

            readers.append(PeriodicExportingMetricReader(OTLPMetricExporter()))
        if not readers:
            return cls.disabled()
        resource = Resource.create(
            {
                "service.name": environ.get("OTEL_SERVICE_NAME", service),
                "service.namespace": "managed-agents",
                "service.version": _version(),
                "service.instance.id": f"{socket.gethostname()}:{os.getpid()}",
            }
        )
        return cls(MeterProvider(metric_readers=readers, resource=resource), scrape, service)

    async def serve(self, listen: str) -> str:
        """Serves `GET /metrics` on `listen` (port 0 picks one); returns the bound `host:port`."""
        if self._scrape is None:
            return ""
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        host, _, port = listen.rpartition(":")
        site = web.TCPSite(self._runner, host or "127.0.0.1", int(port))
        await site.start()
        bound = site._server.sockets[0].getsockname()  # type: ignore[union-attr]
        self.address = f"{bound[0]}:{bound[1]}"
        log.info("metrics on http://%s/metrics", self.address)
        return self.address

    async def _metrics(self, _: web.Request) -> web.Response:
        assert self._scrape is not None
        return web.Response(text=prometheus_text(self._scrape.get_metrics_data()), content_type="text/plain")

    async def aclose(self) -> None:
        """Stops serving, flushes and stops the exporters."""
        if self._runner is not None:
            await self._runner.cleanup()
        if self._provider is not None:
            self._provider.shutdown()

    # Instruments ---------------------------------------------------------------------------------------------

    def counter(self, name: str, description: str, unit: str = "1") -> metrics.Counter:
        """A monotonic counter."""
        return self.meter.create_counter(name, unit=unit, description=description)

    def latency(self, name: str, description: str) -> metrics.Histogram:
        """A latency histogram in seconds."""
        return self.meter.create_histogram(
            name, unit="s", description=description, explicit_bucket_boundaries_advisory=list(LATENCY_BUCKETS)
        )

    def gauge(self, name: str, description: str, read: Callable[[], int]) -> None:
        """A value read at collection time."""

        def observe(_: metrics.CallbackOptions) -> Iterable[metrics.Observation]:
            return [metrics.Observation(read())]

        self.meter.create_observable_gauge(name, callbacks=[observe], description=description)


_INVALID = re.compile(r"[^a-zA-Z0-9_:]")


def _name(name: str, unit: str) -> str:
    base = _INVALID.sub("_", name)
    if unit == "s" and not base.endswith("_seconds"):
        base += "_seconds"
    return base


def _labels(attributes: Mapping[str, Any], extra: Sequence[tuple[str, str]] = ()) -> str:
    pairs = [(_INVALID.sub("_", str(k)), str(v)) for k, v in sorted(attributes.items())] + list(extra)
    if not pairs:
        return ""
    escaped = (v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") for _, v in pairs)
    return "{" + ",".join(f'{k}="{v}"' for (k, _), v in zip(pairs, escaped, strict=True)) + "}"


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if isinstance(value, float) and not value.is_integer() else str(int(value))


def prometheus_text(data: Any) -> str:
    """MetricsData in the Prometheus text exposition format (0.0.4)."""
    lines: list[str] = []
    if data is None:
        return ""
    for resource_metrics in data.resource_metrics:
        for scope in resource_metrics.scope_metrics:
            for metric in scope.metrics:
                name = _name(metric.name, metric.unit)
                points = metric.data
                if isinstance(points, Sum) and points.is_monotonic:
                    name = name if name.endswith("_total") else f"{name}_total"
                    kind = "counter"
                elif isinstance(points, Histogram):
                    kind = "histogram"
                else:
                    kind = "gauge"
                lines.append(f"# HELP {name} {metric.description}")
                lines.append(f"# TYPE {name} {kind}")
                for point in points.data_points:
                    attrs = dict(point.attributes or {})
                    if kind == "histogram":
                        cumulative = 0
                        for bound, count in zip([*point.explicit_bounds, math.inf], point.bucket_counts, strict=True):
                            cumulative += count
                            lines.append(f"{name}_bucket{_labels(attrs, [('le', _number(bound))])} {cumulative}")
                        lines.append(f"{name}_sum{_labels(attrs)} {_number(point.sum)}")
                        lines.append(f"{name}_count{_labels(attrs)} {point.count}")
                    else:
                        lines.append(f"{name}{_labels(attrs)} {_number(point.value)}")
    return "\n".join(lines) + "\n"
