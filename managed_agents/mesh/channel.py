"""Client channels to mesh services: traced, with generous message limits, keepalive, and transparent retries
of idempotent methods on UNAVAILABLE through the gRPC service config (no handwritten retry loops)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import grpc
from opentelemetry.instrumentation.grpc import aio_client_interceptors
from opentelemetry.sdk.trace import TracerProvider

from managed_agents.mesh.auth import client_interceptors
from managed_agents.mesh.tls import MESH_NAME, MeshTls

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
    tls: MeshTls | None = None,
) -> grpc.aio.Channel:
    """An insecure `grpc.aio` channel to `target` (`host:port`).

    `target` may list several `host:port` separated by commas (replicas of one service, e.g. store servers
    sharing a PostgreSQL log): calls are spread round robin over the replicas that are up. `retry_methods`
    lists (full service name, method) pairs that are safe to retry on UNAVAILABLE. Calls are traced (and carry
    `traceparent`) only when a tracer provider is given. With `mesh_secret`, every call carries it (see
    `managed_agents.mesh.auth`). With `tls`, the channel is mutual TLS and the server must prove it is a mesh
    peer (`managed_agents.mesh.tls`).
    """
    balanced = "," in target
    if balanced:
        target = "ipv4:" + target
    interceptors: list[grpc.aio.ClientInterceptor] = []
    if tracer_provider is not None:
        interceptors.extend(aio_client_interceptors(tracer_provider=tracer_provider))
    if mesh_secret:
        interceptors.extend(client_interceptors(mesh_secret))
    options: list[tuple[str, Any]] = [
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
    ]
    if tls is None:
        return grpc.aio.insecure_channel(target, interceptors=interceptors or None, options=options)
    # Peers are checked against the mesh's one name, whatever address was dialled (see managed_agents.mesh.tls).
    options.append(("grpc.ssl_target_name_override", MESH_NAME))
    return grpc.aio.secure_channel(
        target, tls.channel_credentials(), interceptors=interceptors or None, options=options
    )
