"""Session store benchmark: EmitEvent latency and throughput, and GetSession time by log length.

Runs a real store process (SQLite, WAL, synchronous=normal) and drives it over loopback gRPC from this
process, so client and server share the machine's cores, as a brain and its store would on one host.

    python bench/store_bench.py [--quick] [--backend sqlite|postgres|both] [--store-url postgresql://...]

With PostgreSQL the same figures are printed, then the throughput of two store servers sharing one log.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.common import service, summary_ms, table
from managed_agents import events
from managed_agents.mesh.channel import dial
from session_store.client import SessionStoreClient
from session_store.postgres import migrate
from tests.pg import postgres_cluster


def _event(i: int) -> object:
    # About 150 bytes serialized, like a short message or a status change.
    return events.user_message(f"benchmark event {i:08d} " + "x" * 100, producer="bench")


async def grpc_floor(address: str, count: int) -> list[float]:
    """Round trips of the server's own health check: what any unary call costs on this machine."""
    channel = dial(address)
    stub = health_pb2_grpc.HealthStub(channel)
    request = health_pb2.HealthCheckRequest()
    samples = []
    for i in range(count + 50):
        started = time.perf_counter()
        await stub.Check(request)
        if i >= 50:
            samples.append(time.perf_counter() - started)
    await channel.close()
    return samples


async def sequential_latency(store: SessionStoreClient, count: int) -> list[float]:
    session = await store.create_session()
    for i in range(50):  # warm-up
        await store.emit(session.id, _event(i))  # type: ignore[arg-type]
    samples = []
    for i in range(count):
        started = time.perf_counter()
        await store.emit(session.id, _event(i))  # type: ignore[arg-type]
        samples.append(time.perf_counter() - started)
    return samples


async def concurrent_throughput(store: SessionStoreClient, writers: int, seconds: float) -> tuple[float, list[float]]:
    sessions = [(await store.create_session()).id for _ in range(min(writers, 64))]
    done = 0
    samples: list[float] = []
    stop_at = time.perf_counter() + seconds

    async def writer(w: int) -> None:
        nonlocal done
        i = 0
        while time.perf_counter() < stop_at:
            started = time.perf_counter()
            await store.emit(sessions[w % len(sessions)], _event(i))  # type: ignore[arg-type]
            samples.append(time.perf_counter() - started)
            done += 1
            i += 1

    started = time.perf_counter()
    await asyncio.gather(*(writer(w) for w in range(writers)))
    return done / (time.perf_counter() - started), samples


async def batch_throughput(store: SessionStoreClient, writers: int, batch: int, seconds: float) -> float:
    sessions = [(await store.create_session()).id for _ in range(writers)]
    done = 0
    stop_at = time.perf_counter() + seconds
    payload = [_event(i) for i in range(batch)]

    async def writer(w: int) -> None:
        nonlocal done
        while time.perf_counter() < stop_at:
            await store.emit_batch(sessions[w], payload)  # type: ignore[arg-type]
            done += batch

    started = time.perf_counter()
    await asyncio.gather(*(writer(w) for w in range(writers)))
    return done / (time.perf_counter() - started)


async def get_session_time(store: SessionStoreClient, size: int) -> tuple[float, float]:
    session = await store.create_session()
    for start in range(0, size, 1000):
        await store.emit_batch(session.id, [_event(i) for i in range(start, min(size, start + 1000))])  # type: ignore[misc]
    await store.read_session(session.id)  # warm the page cache
    first_page = []
    whole = []
    for _ in range(5):
        started = time.perf_counter()
        page = await store.get_session(session.id, page_size=10_000)
        first_page.append(time.perf_counter() - started)
        assert len(page.events) == min(size, 10_000)
        started = time.perf_counter()
        _, log = await store.read_session(session.id)
        whole.append(time.perf_counter() - started)
        assert len(log) == size
    return min(first_page), min(whole)


async def _suite(address: str, *, quick: bool, label: str) -> None:
    seconds = 1.0 if quick else 4.0
    count = 300 if quick else 3000
    async with SessionStoreClient.connect(address) as store:
        floor = await grpc_floor(address.split(",")[0], count)
        latency = await sequential_latency(store, count)
        table(
            f"EmitEvent, one session, sequential [{label}]",
            [
                (f"{count} appends", summary_ms(latency)),
                ("gRPC floor (Health/Check)", summary_ms(floor)),
            ],
        )
        rows = []
        for writers in (1, 16, 64):
            rate, samples = await concurrent_throughput(store, writers, seconds)
            rows.append(
                (
                    f"{writers:>2} writers (unary EmitEvent)",
                    f"{rate:8.0f} events/s   {summary_ms(samples)}",
                )
            )
        for writers, batch in ((1, 100), (16, 100)):
            rate = await batch_throughput(store, writers, batch, seconds)
            rows.append((f"{writers:>2} writers (BatchEmitEvents of {batch})", f"{rate:8.0f} events/s"))
        table(f"Append throughput over many sessions [{label}]", rows)
        rows = []
        for size in (1_000, 10_000) if quick else (1_000, 10_000, 100_000):
            first, whole = await get_session_time(store, size)
            rows.append(
                (
                    f"{size:>7} events",
                    f"first page {first * 1e3:8.1f} ms   whole log {whole * 1e3:8.1f} ms",
                )
            )
        table(f"GetSession (pages of up to 10,000 events) [{label}]", rows)


async def _shared_log(first: str, second: str, *, quick: bool) -> None:
    """Throughput of one store server, then of two sharing the same PostgreSQL log (calls round robin)."""
    seconds = 1.0 if quick else 4.0
    rows = []
    for label, target in (("1 store server", first), ("2 store servers", f"{first},{second}")):
        async with SessionStoreClient.connect(target) as store:
            for writers in (16, 64):
                rate, samples = await concurrent_throughput(store, writers, seconds)
                rows.append((f"{label}, {writers} writers (unary)", f"{rate:8.0f} events/s   {summary_ms(samples)}"))
            rate = await batch_throughput(store, 16, 100, seconds)
            rows.append((f"{label}, 16 writers (batches of 100)", f"{rate:8.0f} events/s"))
    table("Store servers sharing one PostgreSQL log", rows)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="shorter runs, for a smoke check")
    parser.add_argument(
        "--backend",
        choices=["sqlite", "postgres", "both"],
        default="sqlite",
        help="sqlite (default); postgres starts a throwaway PostgreSQL cluster with its default durability "
        "(fsync and synchronous commit on) unless --store-url names one; both runs one after the other",
    )
    parser.add_argument("--store-url", help="an existing postgresql:// database (its schema is migrated)")
    args = parser.parse_args()
    if args.backend in ("sqlite", "both"):
        with tempfile.TemporaryDirectory() as tmp, service("session_store", "--data-dir", tmp) as address:
            await _suite(address, quick=args.quick, label="SQLite, synchronous=normal")
    if args.backend in ("postgres", "both"):
        with contextlib.ExitStack() as stack:
            url = args.store_url or stack.enter_context(postgres_cluster(durable=True))
            await migrate(url)
            first = stack.enter_context(service("session_store", "--store-url", url))
            await _suite(first, quick=args.quick, label="PostgreSQL, synchronous_commit=on")
            second = stack.enter_context(service("session_store", "--store-url", url))
            await _shared_log(first, second, quick=args.quick)


if __name__ == "__main__":
    asyncio.run(main())
