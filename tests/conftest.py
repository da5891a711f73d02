"""Shared fixtures: real servers on ephemeral loopback ports, real SQLite files in tmp_path."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from brain import app as brain_app
from brain.config import BrainConfig
from hands import app as hands_app
from hands import disk
from hands.app import HandsServer
from hands.backend import DISKS
from hands.client import HandsClient
from hands.config import HandsConfig
from managed_agents.standin.script import Script
from managed_agents.standin.server import StandinServer
from mcp_proxy import app as proxy_app
from mcp_proxy.client import McpProxyClient
from mcp_proxy.config import ProxyConfig
from mcp_proxy.vault import VaultKey
from session_store import app
from session_store.client import SessionStoreClient
from session_store.config import StoreConfig
from tests.helpers import ServiceProcess
from tests.mcp_proxy.servers import Upstream
from tests.pg import fresh_database, postgres_cluster
from tests.podman import podman_service


@pytest.fixture(scope="session", autouse=True)
def _sandbox_disks_unmounted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Unmounts, at the end of the run, the disks of sandboxes the tests left (servers killed on purpose, work
    roots in tmp dirs): each holds a loop device until unmounted, and many slow every later mount."""
    yield
    base = str(tmp_path_factory.getbasetemp().resolve())
    for mounted in disk.mounted(DISKS):
        if mounted.image.startswith(base) or mounted.image_deleted:
            with contextlib.suppress(disk.DiskError):
                disk.unmount(mounted.mountpoint)


@pytest.fixture
async def store_server(tmp_path: Path) -> AsyncIterator[app.StoreServer]:
    """A session store served in this process, tracing off, assembled as `python -m session_store` does."""
    server = await app.start(StoreConfig(listen="127.0.0.1:0", data_dir=tmp_path / "store"), None)
    yield server
    await server.aclose(grace=1.0)


# A mesh secret for servers closed to outsiders (managed_agents.mesh.auth).
MESH_SECRET = "tests-mesh-secret-0123456789-abcdefghijklmnop"


@pytest.fixture
async def closed_store(tmp_path: Path) -> AsyncIterator[app.StoreServer]:
    """A session store that accepts only calls carrying `MESH_SECRET`."""
    config = StoreConfig(listen="127.0.0.1:0", data_dir=tmp_path / "closed-store", mesh_secret=MESH_SECRET)
    server = await app.start(config, None)
    yield server
    await server.aclose(grace=1.0)


@pytest.fixture
async def store(store_server: app.StoreServer) -> AsyncIterator[SessionStoreClient]:
    """A client connected to `store_server` over loopback gRPC."""
    async with SessionStoreClient.connect(store_server.address) as client:
        yield client


@pytest.fixture
def store_process(tmp_path: Path) -> Iterator[ServiceProcess]:
    """A session store running as its own process; the test starts, kills and restarts it."""
    process = ServiceProcess("session_store", ["--data-dir", str(tmp_path / "store-data")], tmp_path)
    yield process
    process.stop()


StartStandin = Callable[[Script], Awaitable[StandinServer]]
StartBrain = Callable[..., Awaitable[brain_app.BrainServer]]


@pytest.fixture
async def start_standin() -> AsyncIterator[StartStandin]:
    """Starts stand-in Messages API servers playing the given scripts."""
    started: list[StandinServer] = []

    async def start(script: Script) -> StandinServer:
        server = await StandinServer.start(script)
        started.append(server)
        return server

    yield start
    for server in started:
        await server.aclose()


@pytest.fixture
async def start_brain(store_server: app.StoreServer) -> AsyncIterator[StartBrain]:
    """Starts brain servers on the test's store; keyword arguments override `BrainConfig` fields."""
    started: list[brain_app.BrainServer] = []

    async def start(
        standin: StandinServer, *, hands: str = "", holder: str | None = None, **overrides: object
    ) -> brain_app.BrainServer:
        config = BrainConfig(
            listen="127.0.0.1:0",
            store=store_server.address,
            hands=hands,
            api_key="test-key",
            base_url=standin.base_url,
            lease_ttl=2.0,
            scan_interval=0.5,
            retry_base_delay=0.05,
        )
        server = await brain_app.start(replace(config, **overrides), None, holder=holder)  # type: ignore[arg-type]
        started.append(server)
        return server

    yield start
    for server in started:
        await server.aclose(grace=1)


@pytest.fixture
async def hands_server(tmp_path: Path) -> AsyncIterator[HandsServer]:
    """A hands server with the bwrap backend, served in this process on a loopback port."""
    server = await hands_app.start(HandsConfig(listen="127.0.0.1:0", work_root=tmp_path / "sandboxes"), None)
    yield server
    await server.aclose(grace=1.0)


@pytest.fixture
async def hands(hands_server: HandsServer) -> AsyncIterator[HandsClient]:
    """A client of `hands_server`."""
    async with HandsClient.connect(hands_server.address) as client:
        yield client


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """A private PostgreSQL cluster on a free loopback port, thrown away after the tests."""
    with postgres_cluster() as url:
        yield url


@pytest.fixture
async def postgres_url(postgres_server: str) -> AsyncIterator[str]:
    """A fresh database with the store's schema applied."""
    async with fresh_database(postgres_server) as url:
        yield url


# The MCP proxy ---------------------------------------------------------------------------------------------


@pytest.fixture
def vault_key() -> VaultKey:
    """A fresh random vault key."""
    return VaultKey.generate()


@pytest.fixture
async def proxy_server(tmp_path: Path, vault_key: VaultKey) -> AsyncIterator[proxy_app.ProxyServer]:
    """An mcp_proxy served in this process, tracing off, assembled as `python -m mcp_proxy` does."""
    config = ProxyConfig(listen="127.0.0.1:0", data_dir=tmp_path / "proxy")
    server = await proxy_app.start(config, vault_key, None)
    yield server
    await server.aclose(grace=1.0)


@pytest.fixture
async def proxy(proxy_server: proxy_app.ProxyServer) -> AsyncIterator[McpProxyClient]:
    """A client connected to `proxy_server` over loopback gRPC."""
    async with McpProxyClient.connect(proxy_server.address) as client:
        yield client


@pytest.fixture
async def mcp_upstream() -> AsyncIterator[Upstream]:
    """A real MCP server (`mcp` SDK, streamable HTTP) demanding a bearer token, plus its token endpoint."""
    upstream = await Upstream().start()
    yield upstream
    await upstream.stop()


@pytest.fixture(scope="session")
def container_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The Docker Engine API socket of a private Podman service, shared by the session's docker tests."""
    with podman_service(tmp_path_factory.mktemp("podman")) as url:
        yield url
