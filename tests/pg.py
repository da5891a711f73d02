"""Throwaway PostgreSQL clusters and databases for the tests and benchmarks of the PostgreSQL session store.

A cluster is Debian's `postgresql` server binaries run on a free loopback port from a temporary directory
(as the `postgres` user when we are root: PostgreSQL refuses to run as root).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path


def _postgres_bin(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))), None)
    assert found, f"{name} is required for the PostgreSQL store: `make test` installs Debian's postgresql"
    return str(found)


@contextlib.contextmanager
def postgres_cluster(*, durable: bool = False) -> Iterator[str]:
    """A private cluster; yields the URL of its `postgres` database. Not `durable` (the tests) turns fsync
    and synchronous commit off; `durable` (the benchmarks) keeps PostgreSQL's defaults."""
    # Not under pytest's tmp root, which only root may enter.
    work = Path(tempfile.mkdtemp(prefix="managed-agents-pg-"))
    data, sockets = work / "data", work / "sockets"
    sockets.mkdir()
    as_user: list[str] = []
    if os.geteuid() == 0:
        as_user = ["runuser", "-u", "postgres", "--"]
        shutil.chown(work, "postgres")
        shutil.chown(sockets, "postgres")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    subprocess.run(
        [*as_user, _postgres_bin("initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync"],
        check=True,
        capture_output=True,
    )
    options = f"-c listen_addresses=127.0.0.1 -p {port} -k {sockets} -c max_connections=400"
    if not durable:
        options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
    subprocess.run(
        [*as_user, _postgres_bin("pg_ctl"), "-D", str(data), "-l", str(work / "log"), "-w", "-o", options, "start"],
        check=True,
        capture_output=True,
    )
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(
            [*as_user, _postgres_bin("pg_ctl"), "-D", str(data), "-m", "immediate", "stop"], capture_output=True
        )
        shutil.rmtree(work, ignore_errors=True)


@contextlib.asynccontextmanager
async def fresh_database(server: str) -> AsyncIterator[str]:
    """A new database on `server` with the store's schema applied; dropped afterwards."""
    import asyncpg

    from session_store.postgres import migrate

    name = f"t_{uuid.uuid4().hex[:16]}"
    admin = await asyncpg.connect(server)
    try:
        await admin.execute(f"CREATE DATABASE {name}")
    finally:
        await admin.close()
    url = server.rsplit("/", 1)[0] + f"/{name}"
    await migrate(url)
    try:
        yield url
    finally:
        admin = await asyncpg.connect(server)
        try:
            await admin.execute(f"DROP DATABASE {name} WITH (FORCE)")
        finally:
            await admin.close()
