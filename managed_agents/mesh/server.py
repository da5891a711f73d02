"""The single place that builds a gRPC server for a mesh service: servicers plus health checking, reflection,
tracing and error translation, bound to the address asked for, stopped gracefully on SIGTERM or SIGINT.

Every service, health checking and reflection included, is registered through a `GuardedRegistry`, so a
request whose bytes do not decode is answered INVALID_ARGUMENT (`managed_agents.mesh.decoding`)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc
from opentelemetry.instrumentation.grpc import aio_server_interceptor, filters
from opentelemetry.sdk.trace import TracerProvider

from managed_agents.mesh.auth import SECRET_FILE_ENV, RequireMeshSecret
from managed_agents.mesh.decoding import GuardedRegistry
from managed_agents.mesh.metrics import ServiceMetrics
from managed_agents.mesh.rpc_metrics import RpcMetrics
from managed_agents.mesh.status import ErrorTranslatingServicer
from managed_agents.mesh.tls import TLS_DIR_ENV, MeshTls

log = logging.getLogger(__name__)

MIB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Service:
    """A servicer to serve: its full proto name, the servicer, and the generated `add_*_to_server`."""

    name: str
    servicer: object
    add_to_server: Callable[[Any, grpc.aio.Server], None]


class MeshServer:
    """A started-on-demand `grpc.aio` server with the mesh's standard equipment."""

    def __init__(
        self,
        services: Sequence[Service],
        *,
        listen: str,
        tracer_provider: TracerProvider | None,
        max_message_bytes: int = 32 * MIB,
        on_stopping: Sequence[Callable[[], Awaitable[None]]] = (),
        mesh_secret: str = "",
        tls: MeshTls | None = None,
        metrics: ServiceMetrics | None = None,
    ) -> None:
        """`on_stopping` hooks run once health reports NOT_SERVING and before in-flight calls are drained;
        services use them to end their streams. Without a tracer provider the server is not instrumented. With
        `mesh_secret`, calls without it are refused (`managed_agents.mesh.auth`). With `tls`, the port speaks
        mutual TLS and only clients certified by the mesh's CA get through the handshake
        (`managed_agents.mesh.tls`). With `metrics` enabled, every call is counted by method and status code
        (`managed_agents.mesh.rpc_metrics`)."""
        self._services = tuple(services)
        self._listen = listen
        self._on_stopping = tuple(on_stopping)
        self._health = health.aio.HealthServicer()
        self._stopped = asyncio.Event()
        self._stopping = False
        self.port = 0
        interceptors: list[grpc.aio.ServerInterceptor] = []
        if metrics is not None and metrics.enabled:
            interceptors.append(RpcMetrics(metrics))  # outermost: refused calls count too
        if mesh_secret:
            interceptors.append(RequireMeshSecret(mesh_secret))
        self._tls = tls
        self._authenticated = bool(mesh_secret) or tls is not None
        if tracer_provider is not None:
            interceptors.append(
                aio_server_interceptor(tracer_provider=tracer_provider, filter_=filters.negate(filters.health_check()))
            )
        self._server = grpc.aio.server(
            interceptors=interceptors,
            options=[
                ("grpc.max_receive_message_length", max_message_bytes),
                ("grpc.max_send_message_length", max_message_bytes),
                # Without this, a second server on a taken port would silently share it.
                ("grpc.so_reuseport", 0),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ],
        )
        registry = GuardedRegistry(self._server)
        for service in self._services:
            service.add_to_server(ErrorTranslatingServicer(service.servicer, domain=service.name), registry)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, registry)
        # What `reflection.enable_server_reflection` does for a grpc.aio server, through the registry.
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
            reflection.aio.ReflectionServicer(
                [s.name for s in self._services] + [health.SERVICE_NAME, reflection.SERVICE_NAME]
            ),
            registry,
        )

    @property
    def address(self) -> str:
        """`host:port` the server listens on, with the real port when 0 was asked for."""
        host = self._listen.rsplit(":", 1)[0]
        return f"{host}:{self.port}"

    async def start(self) -> str:
        """Binds, starts serving and reports SERVING; returns the bound address."""
        try:
            if self._tls is None:
                self.port = self._server.add_insecure_port(self._listen)
            else:
                self.port = self._server.add_secure_port(self._listen, self._tls.server_credentials())
        except RuntimeError as exc:
            raise OSError(f"cannot listen on {self._listen}: the address is in use or not local ({exc})") from exc
        await self._server.start()
        await self._health.set("", health_pb2.HealthCheckResponse.SERVING)
        for service in self._services:
            await self._health.set(service.name, health_pb2.HealthCheckResponse.SERVING)
        log.info("listening on %s", self.address)
        if not self._authenticated:
            log.warning(
                "no mesh secret (%s) nor TLS (%s) is configured: this server accepts calls from anyone who can "
                "reach %s",
                SECRET_FILE_ENV,
                TLS_DIR_ENV,
                self.address,
            )
        return self.address

    async def stop(self, grace: float = 10.0) -> None:
        """Reports NOT_SERVING, runs the stopping hooks, lets in-flight calls finish for `grace` seconds."""
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        await self._health.enter_graceful_shutdown()
        for hook in self._on_stopping:
            await hook()
        await self._server.stop(grace)
        self._stopped.set()

    async def wait_stopped(self) -> None:
        """Returns once `stop` has finished."""
        await self._stopped.wait()


def announce(address: str, port_file: Path | None) -> None:
    """Tells whoever started the process where it listens: one stdout line, and the port file if asked.

    The port file is written atomically (rename), so a reader never sees half an address.
    """
    sys.stdout.write(f"listening on {address}\n")
    sys.stdout.flush()
    if port_file is not None:
        tmp = port_file.with_name(port_file.name + ".tmp")
        tmp.write_text(address + "\n")
        os.replace(tmp, port_file)


async def wait_for_signal() -> int:
    """Returns the number of the first SIGTERM or SIGINT the process receives."""
    loop = asyncio.get_running_loop()
    received: asyncio.Future[int] = loop.create_future()

    def on_signal(number: int) -> None:
        if not received.done():
            received.set_result(number)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, int(sig))
    try:
        return await received
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
