"""Assembles a running hands server: the backend, the sandbox manager and the `HandsService` server.
`__main__` and the tests build it the same way."""

from __future__ import annotations

import os

from opentelemetry.sdk.trace import TracerProvider

from hands import disk
from hands.backend import Limits, SandboxBackend
from hands.config import HandsConfig
from hands.identities import Identities, Identity
from hands.sandboxes import SandboxManager
from hands.server import SERVICE_NAME, HandsServicer
from managed_agents.mesh.metrics import ServiceMetrics
from managed_agents.mesh.server import MeshServer, Service
from managed_agents.v1 import hands_pb2_grpc
from mcp_proxy.client import McpProxyClient


class HandsServer:
    """A hands server that is serving; `aclose()` stops it (sandboxes stay on disk for a restart)."""

    def __init__(self, server: MeshServer, manager: SandboxManager, metrics: ServiceMetrics | None = None) -> None:
        self.server = server
        self.manager = manager
        self.metrics = metrics or ServiceMetrics.disabled()

    @property
    def address(self) -> str:
        """Bound `host:port`."""
        return self.server.address

    async def aclose(self, grace: float = 5.0) -> None:
        """Lets in-flight calls finish, then stops the shells."""
        await self.server.stop(grace)
        await self.manager.aclose()
        await self.metrics.aclose()


def make_backend(config: HandsConfig) -> SandboxBackend:
    """The configured backend; raises RuntimeError with a sentence saying what is missing."""
    if config.backend == "docker":
        from hands.backends.docker import DockerBackend

        return DockerBackend.connect(config.docker_url, default_image=config.default_image, work_root=config.work_root)
    from hands.backends.bwrap import BwrapBackend

    first, _ = config.sandbox_uids
    return BwrapBackend.create_default(
        config.work_root,
        probe_identity=Identity(first, first),
        without_user_namespace=config.without_user_namespace,
    )


async def start(
    config: HandsConfig, tracer_provider: TracerProvider | None, *, backend: SandboxBackend | None = None
) -> HandsServer:
    """Adopts sandboxes left on disk, then serves."""
    if missing := disk.tools_missing():
        raise RuntimeError(
            f"{', '.join(missing)} not found: each sandbox's disk is an ext4 image hands formats and mounts; "
            "install e2fsprogs and mount (make run/test do it)"
        )
    backend = backend or make_backend(config)
    defaults = Limits(
        image=config.default_image if backend.name == "docker" else "", disk_bytes=config.default_disk_bytes
    )
    metrics = ServiceMetrics.build("hands", os.environ, listen=config.metrics_listen)
    proxy = (
        McpProxyClient.connect(config.proxy, mesh_secret=config.mesh_secret, tls=config.mesh_tls)
        if config.proxy
        else None
    )
    first, count = config.sandbox_uids
    identities = Identities(config.work_root, first=first, count=count)
    manager = SandboxManager(
        backend, config.work_root, instance=config.instance_name, identities=identities, proxy=proxy
    )
    await manager.start()
    server = MeshServer(
        [
            Service(
                SERVICE_NAME,
                HandsServicer(manager, defaults, dict(config.labels), metrics),
                hands_pb2_grpc.add_HandsServiceServicer_to_server,
            )
        ],
        listen=config.listen,
        tracer_provider=tracer_provider,
        mesh_secret=config.mesh_secret,
        tls=config.mesh_tls,
        metrics=metrics,
    )
    try:
        await server.start()
        if config.metrics_listen:
            await metrics.serve(config.metrics_listen)
    except BaseException:
        await manager.aclose()
        await metrics.aclose()
        raise
    return HandsServer(server, manager, metrics)
