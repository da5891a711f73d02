"""Client channels to mesh services: traced, with generous message limits, keepalive, and transparent retries
of idempotent methods on UNAVAILABLE through the gRPC service config (no handwritten retry loops)."""

from __future__ import annotations

import json
from collections.abc import Sequence

import grpc
from opentelemetry.instrumentation.grpc import aio_client_interceptors
from opentelemetry.sdk.trace import TracerProvider

from managed_agents.mesh.auth import client_interceptors

MIB = 1024 * 1024


def _service_config(retry_methods: Sequence[tuple[str, str]], *, balanced: bool) -> str:
    config: dict[str, object] = {}
    if balanced:
        config["loadBalancingConfig"] = [{"round_robin": {}}]
    if not retry_methods:
        return json.dumps(config)
    return json.dumps(
        {
            **config,
            "methodConfig": [
                {
                    "name": [{"service": service, "method": method} for service, method in retry_methods],
                    "retryPolicy": {
                        "maxAttempts": 5,
                        "initialBackoff": "0.05s",
                        "maxBackoff": "2s",
                        "backoffMultiplier": 2,
                        "retryableStatusCodes": ["UNAVAILABLE"],
                    },
                }
            ],
        }
    )


def dial(
    target: str,
    *,
    tracer_provider: TracerProvider | None = None,
    retry_methods: Sequence[tuple[str, str]] = (),
    max_message_bytes: int = 64 * MIB,
    mesh_secret: str = "",
) -> grpc.aio.Channel:
    """An insecure `grpc.aio` channel to `target` (`host:port`).

    `target` may list several `host:port` separated by commas (replicas of one service, e.g. store servers
    sharing a PostgreSQL log): calls are spread round robin over the replicas that are up. `retry_methods`
    lists (full service name, method) pairs that are safe to retry on UNAVAILABLE. Calls are traced (and carry
    `traceparent`) only when a tracer provider is given. With `mesh_secret`, every call carries it (see
    `managed_agents.mesh.auth`).
    """
    balanced = "," in target
    if balanced:
        target = "ipv4:" + target
    interceptors: list[grpc.aio.ClientInterceptor] = []
    if tracer_provider is not None:
        interceptors.extend(aio_client_interceptors(tracer_provider=tracer_provider))
    if mesh_secret:
        interceptors.extend(client_interceptors(mesh_secret))
    return grpc.aio.insecure_channel(
        target,
        interceptors=interceptors or None,
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.enable_retries", 1),
            ("grpc.service_config", _service_config(retry_methods, balanced=balanced)),
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            # gRPC's default reconnect backoff grows to 120 s, tuned for clients on the internet. Mesh peers are
            # restarted in about a second and the caller retries, so a peer that is back must be seen soon.
            ("grpc.initial_reconnect_backoff_ms", 250),
            ("grpc.max_reconnect_backoff_ms", 3_000),
        ],
    )
