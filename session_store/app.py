"""Assembles a running session store: the SQLite event store behind a `MeshServer`. `__main__` and the tests
build it the same way."""

from __future__ import annotations

import os

from opentelemetry.sdk.trace import TracerProvider

from managed_agents.mesh.metrics import ServiceMetrics
from managed_agents.mesh.server import MeshServer, Service
from managed_agents.v1 import session_pb2_grpc
from session_store.config import StoreConfig
from session_store.postgres import PostgresEventStore, is_postgres_url
from session_store.server import SERVICE_NAME, SessionServicer
from session_store.sqlite import SqliteEventStore

Backend = SqliteEventStore | PostgresEventStore


class StoreServer:
    """A session store that is serving; `aclose()` stops it gracefully."""

    def __init__(self, server: MeshServer, store: Backend, metrics: ServiceMetrics | None = None) -> None:
        self.server = server
        self.store = store
        self.metrics = metrics or ServiceMetrics.disabled()

    @property
    def address(self) -> str:
        """Bound `host:port`."""
        return self.server.address

    async def aclose(self, grace: float = 5.0) -> None:
        """Ends watches, lets in-flight calls finish, then closes the database."""
        await self.server.stop(grace)
        await self.store.aclose()
        await self.metrics.aclose()


def build(
    config: StoreConfig, store: Backend, tracer_provider: TracerProvider | None, metrics: ServiceMetrics | None = None
) -> MeshServer:
    """A (not yet started) server for `store`."""
    servicer = SessionServicer(store, metrics)

    async def end_watches() -> None:
        # Streams would otherwise hold the graceful stop for its whole grace period.
        store.tail.close()

    return MeshServer(
        [Service(SERVICE_NAME, servicer, session_pb2_grpc.add_SessionServiceServicer_to_server)],
        listen=config.listen,
        tracer_provider=tracer_provider,
        mesh_secret=config.mesh_secret,
        tls=config.mesh_tls,
        metrics=metrics,
        on_stopping=[end_watches],
    )


async def start(config: StoreConfig, tracer_provider: TracerProvider | None) -> StoreServer:
    """Opens the database and starts serving."""
    store: Backend
    if config.store_url:
        if not is_postgres_url(config.store_url):
            raise RuntimeError("--store-url must be a postgresql:// URL")
        store = await PostgresEventStore.open(config.store_url)
    else:
        store = await SqliteEventStore.open(config.data_dir, synchronous=config.synchronous)
    metrics = ServiceMetrics.build("session-store", os.environ, listen=config.metrics_listen)
    try:
        server = build(config, store, tracer_provider, metrics)
        await server.start()
        if config.metrics_listen:
            await metrics.serve(config.metrics_listen)
    except BaseException:
        await store.aclose()
        await metrics.aclose()
        raise
    return StoreServer(server, store, metrics)
