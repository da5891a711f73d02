"""Shared fixtures: real servers on ephemeral loopback ports, real SQLite files in tmp_path."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from mcp_proxy import app as proxy_app
from mcp_proxy.client import McpProxyClient
from mcp_proxy.config import ProxyConfig
from mcp_proxy.vault import VaultKey
from session_store import app
from session_store.client import SessionStoreClient
from session_store.config import StoreConfig
from tests.helpers import ServiceProcess
from tests.mcp_proxy.servers import Upstream


@pytest.fixture
async def store_server(tmp_path: Path) -> AsyncIterator[app.StoreServer]:
    """A session store served in this process, tracing off, assembled as `python -m session_store` does."""
    server = await app.start(StoreConfig(listen="127.0.0.1:0", data_dir=tmp_path / "store"), None)
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
