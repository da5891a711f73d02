"""Shared fixtures: real servers on ephemeral loopback ports, real SQLite files in tmp_path."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from session_store import app
from session_store.client import SessionStoreClient
from session_store.config import StoreConfig
from tests.helpers import ServiceProcess


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
