"""Shared pieces of the benchmarks: percentiles, a results table, and services started as subprocesses."""

from __future__ import annotations

import statistics
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from managed_agents.procs import ServiceProcess


def percentile(samples: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) of `samples`, by nearest rank."""
    ordered = sorted(samples)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def summary_ms(samples: Sequence[float]) -> str:
    """`p50 / p99 / mean` of samples given in seconds, in milliseconds."""
    return (
        f"p50 {percentile(samples, 50) * 1e3:7.3f} ms  p99 {percentile(samples, 99) * 1e3:7.3f} ms  "
        f"mean {statistics.fmean(samples) * 1e3:7.3f} ms"
    )


def table(title: str, rows: Sequence[tuple[str, str]]) -> None:
    """Prints a two-column table."""
    width = max(len(name) for name, _ in rows)
    print(f"\n{title}")
    print("-" * len(title))
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


@contextmanager
def service(module: str, *args: str) -> Iterator[str]:
    """Runs `python -m module --listen 127.0.0.1:0 ...` in a scratch directory and yields its address."""
    with tempfile.TemporaryDirectory() as tmp:
        process = ServiceProcess(module, ["--log-level", "warning", *args], Path(tmp)).start()
        try:
            yield process.address
        finally:
            process.stop()
