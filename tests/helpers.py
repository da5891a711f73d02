"""Test helpers: service processes (the product's own launcher) and polling without bare sleeps."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from managed_agents.procs import ROOT, ServiceProcess

__all__ = ["ROOT", "ServiceProcess", "assert_eventually"]


async def assert_eventually(
    check: Callable[[], Awaitable[bool]] | Callable[[], bool],
    *,
    timeout: float = 10.0,
    interval: float = 0.02,
) -> None:
    """Polls `check` until it returns True, failing the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(interval)
