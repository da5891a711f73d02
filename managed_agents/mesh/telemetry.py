"""OpenTelemetry set-up for one process.

Tracing is on when `OTEL_EXPORTER_OTLP_ENDPOINT` (or `..._TRACES_ENDPOINT`) is set: the process gets a
tracer provider exporting over OTLP, and its servers and channels get the gRPC instrumentation. When it is
unset there is no provider and no instrumentation at all, so tracing costs nothing (the interceptors alone
cost about 40% of a store's append throughput). A store still records the trace of a caller that traces,
from the caller's `traceparent` header.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from importlib import metadata

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor


def _version() -> str:
    try:
        return metadata.version("managed-agents")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def tracing_enabled(environ: Mapping[str, str]) -> bool:
    """True if an OTLP endpoint is configured."""
    return bool(environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def build_tracer_provider(service_name: str, environ: Mapping[str, str]) -> TracerProvider | None:
    """A tracer provider exporting over OTLP for `service_name`, or None when tracing is off.

    The caller owns the provider and must `shutdown()` it on exit, which flushes pending spans.
    """
    if not tracing_enabled(environ):
        return None
    # Imported only when used: the exporter pulls in a second gRPC channel stack.
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    resource = Resource.create(
        {
            "service.name": environ.get("OTEL_SERVICE_NAME", service_name),
            "service.namespace": "managed-agents",
            "service.version": _version(),
            "service.instance.id": f"{socket.gethostname()}:{os.getpid()}",
        }
    )
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return provider


_HEX = frozenset("0123456789abcdef")


def current_trace_ids() -> tuple[str, str]:
    """The (trace id, span id) of the current span as lowercase hex, or empty strings outside any trace."""
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return "", ""
    return format(context.trace_id, "032x"), format(context.span_id, "016x")


def trace_ids_from_traceparent(value: str) -> tuple[str, str]:
    """(trace id, parent span id) of a W3C `traceparent` header, or empty strings if it is malformed."""
    parts = value.strip().lower().split("-")
    if len(parts) < 4 or len(parts[1]) != 32 or len(parts[2]) != 16:
        return "", ""
    trace_id, span_id = parts[1], parts[2]
    if not (set(trace_id) <= _HEX and set(span_id) <= _HEX) or trace_id == "0" * 32 or span_id == "0" * 16:
        return "", ""
    return trace_id, span_id
