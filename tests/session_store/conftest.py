"""The store's contract suite runs against both backends: SQLite, and PostgreSQL in a private cluster."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from session_store import app
from session_store.config import StoreConfig
from tests.pg import fresh_database


@pytest.fixture(params=["sqlite", "postgres"])
async def store_url(request: pytest.FixtureRequest) -> AsyncIterator[str]:
    """Empty for SQLite; the URL of a fresh database for PostgreSQL."""
    if request.param == "sqlite":
        yield ""
        return
    async with fresh_database(request.getfixturevalue("postgres_server")) as url:
        yield url


@pytest.fixture
async def store_server(store_url: str, tmp_path: Path) -> AsyncIterator[app.StoreServer]:
    """A session store on the backend under test (overrides the SQLite-only fixture of tests/conftest.py)."""
    server = await app.start(StoreConfig(listen="127.0.0.1:0", data_dir=tmp_path / "store", store_url=store_url), None)
    yield server
    await server.aclose(grace=1.0)
