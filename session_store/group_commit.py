"""Group commit, shared by the store backends: writer commands are queued, and whatever arrived while the
previous transaction was committing goes into the next one, so throughput grows with concurrency instead of
collapsing. A caller is answered only once its group's transaction has committed."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from managed_agents.mesh.errors import MeshError, ShuttingDown, Unavailable
from session_store.rules import Command

log = logging.getLogger(__name__)

RunGroup = Callable[[list[Command]], Awaitable[list[object]]]
"""Applies commands in one transaction; returns each one's result or `MeshError`."""

# Bounds on one group: enough to amortize a commit, small enough to keep latency flat.
MAX_GROUP_COMMANDS = 512
MAX_GROUP_BYTES = 32 * 1024 * 1024


@dataclass(slots=True)
class _Queued:
    command: Command
    future: asyncio.Future[object]
    size: int


class GroupCommitter:
    """The queue and the loop that commits it in groups."""

    def __init__(self, run_group: RunGroup, *, on_committed: Callable[[object], None]) -> None:
        """`on_committed` sees each result once its transaction has committed (to publish new events)."""
        self._run_group = run_group
        self._on_committed = on_committed
        self._queue: asyncio.Queue[_Queued | None] = asyncio.Queue()
        self._closing = False
        self._task = asyncio.create_task(self._loop(), name="group-commit")

    async def submit(self, command: Command, size: int = 0) -> object:
        """Queues `command` and returns its result once committed (raising it if it is a `MeshError`)."""
        if self._closing:
            raise ShuttingDown("the session store is shutting down; retry against another replica or later")
        future: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Queued(command, future, size))
        # Shielded: a caller that gives up (deadline, disconnect) must not cancel a commit others share.
        result = await asyncio.shield(future)
        if isinstance(result, MeshError):
            raise result
        return result

    async def _loop(self) -> None:
        while True:
            first = await self._queue.get()
            if first is None:
                return
            group, size, stop = [first], first.size, False
            while len(group) < MAX_GROUP_COMMANDS and size < MAX_GROUP_BYTES and not self._queue.empty():
                item = self._queue.get_nowait()
                if item is None:
                    stop = True
                    break
                group.append(item)
                size += item.size
            try:
                results = await self._run_group([q.command for q in group])
            except Exception as exc:
                if isinstance(exc, MeshError):
                    # The backend's own verdict on the whole group (e.g. `DataLoss`: the database is corrupt).
                    error: MeshError = exc
                else:
                    log.exception("commit of %d commands failed", len(group))
                    error = Unavailable(f"the session store could not commit ({exc}); nothing was written, retry")
                for queued in group:
                    if not queued.future.done():
                        queued.future.set_result(error)
            else:
                for queued, result in zip(group, results, strict=True):
                    self._on_committed(result)
                    if not queued.future.done():
                        queued.future.set_result(result)
            if stop:
                return

    async def aclose(self) -> None:
        """Refuses new commands and commits every queued one."""
        if self._closing:
            return
        self._closing = True
        self._queue.put_nowait(None)
        await self._task
