"""What service authentication costs per call: the same store process open, closed by the mesh secret, and on
mutual TLS.

Three session store processes (SQLite): no authentication, the mesh secret, mutual TLS (`managed-agents certs`);
the same client loop against each: sequential `EmitEvent` round trips (latency) and 16 concurrent writers
(throughput). Rounds alternate between the servers so that a noisy machine affects all alike.

    python bench/auth_bench.py [--calls 2000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from bench.common import service, summary_ms, table
from managed_agents import events
from managed_agents.mesh.auth import SECRET_ENV
from managed_agents.mesh.tls import TLS_DIR_ENV, MeshTls, write_dev_certs
from session_store.client import SessionStoreClient

SECRET = "bench-mesh-secret-0123456789-abcdefghijklmnop"


async def _sequential(address: str, secret: str, tls: MeshTls | None, calls: int) -> list[float]:
    async with SessionStoreClient.connect(address, mesh_secret=secret, tls=tls) as store:
        session = await store.create_session()
        for _ in range(50):  # warm the channel and the server
            await store.emit(session.id, events.user_message("warm"))
        samples = []
        for _ in range(calls):
            started = time.perf_counter()
            await store.emit(session.id, events.user_message("x"))
            samples.append(time.perf_counter() - started)
        return samples


async def _throughput(address: str, secret: str, tls: MeshTls | None, calls: int, writers: int = 16) -> float:
    async with SessionStoreClient.connect(address, mesh_secret=secret, tls=tls) as store:
        sessions = [(await store.create_session()).id for _ in range(writers)]

        async def writer(session_id: str) -> None:
            for _ in range(calls // writers):
                await store.emit(session_id, events.user_message("x"))

        started = time.perf_counter()
        await asyncio.gather(*(writer(s) for s in sessions))
        return (calls // writers * writers) / (time.perf_counter() - started)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=2000, help="calls per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per server")
    args = parser.parse_args()
    with ExitStack() as stack:
        data = stack.enter_context(tempfile.TemporaryDirectory())
        open_address = stack.enter_context(service("session_store", "--data-dir", f"{data}/open"))
        os.environ[SECRET_ENV] = SECRET  # inherited by the closed server's process only
        closed_address = stack.enter_context(service("session_store", "--data-dir", f"{data}/closed"))
        del os.environ[SECRET_ENV]
        write_dev_certs(Path(data) / "certs")
        tls = MeshTls.load(Path(data) / "certs")
        os.environ[TLS_DIR_ENV] = f"{data}/certs"  # likewise, for the TLS server only
        tls_address = stack.enter_context(service("session_store", "--data-dir", f"{data}/tls"))
        del os.environ[TLS_DIR_ENV]
        modes = (
            ("open", open_address, "", None),
            ("secret", closed_address, SECRET, None),
            ("mTLS", tls_address, "", tls),
        )
        latency: dict[str, list[float]] = {name: [] for name, *_ in modes}
        rates: dict[str, list[float]] = {name: [] for name, *_ in modes}
        for _ in range(args.rounds):
            for name, address, secret, credentials in modes:
                latency[name] += await _sequential(address, secret, credentials, args.calls)
                rates[name].append(await _throughput(address, secret, credentials, args.calls))
    rows = []
    for name in latency:
        rows.append((f"EmitEvent sequential, {name}", summary_ms(latency[name])))
        best = max(rates[name])
        rows.append((f"EmitEvent 16 writers, {name}", f"{best:8.0f} ev/s (best of {args.rounds})"))
    table("service authentication overhead (one store process each, SQLite)", rows)


if __name__ == "__main__":
    asyncio.run(main())
