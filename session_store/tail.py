"""Live fan-out of committed events to watchers, and the backlog-then-live merge every watch uses.

A backend publishes each committed batch to the `Tail`; `follow` subscribes *before* reading the backlog, so
an event committed during the read reaches the watcher either from the database or from the subscription,
and duplicates are dropped by `seq`. A watcher that falls too far behind is not allowed to grow memory
without bound: its queue is dropped and it re-reads the missed events from the database.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

from managed_agents.mesh.errors import ShuttingDown
from session_store.store import StoredEvent

ReadPage = Callable[[int], Awaitable[list[StoredEvent]]]
"""Reads the next stored events after a sequence number (an empty list at the end of the log)."""


class _Subscription:
    __slots__ = ("closed", "overflowed", "pending", "signal")

    def __init__(self) -> None:
        self.pending: deque[StoredEvent] = deque()
        self.signal = asyncio.Event()
        self.overflowed = False
        self.closed = False


class Tail:
    """In-process registry of watchers per session."""

    def __init__(self, *, max_pending: int = 4096) -> None:
        self._max_pending = max_pending
        self._subscribers: defaultdict[str, set[_Subscription]] = defaultdict(set)
        self._closed = False

    def subscriber_count(self, session_id: str | None = None) -> int:
        """Watchers of one session, or of all sessions."""
        if session_id is not None:
            return len(self._subscribers.get(session_id, ()))
        return sum(len(subs) for subs in self._subscribers.values())

    def publish(self, session_id: str, events: Sequence[StoredEvent]) -> None:
        """Hands committed events (in `seq` order) to the session's watchers."""
        for sub in self._subscribers.get(session_id, ()):
            if sub.overflowed:
                continue
            if len(sub.pending) + len(events) > self._max_pending:
                sub.overflowed = True
                sub.pending.clear()
            else:
                sub.pending.extend(events)
            sub.signal.set()

    def resync(self, session_id: str) -> None:
        """Makes the session's watchers re-read from the database (when live events may have been missed)."""
        for sub in self._subscribers.get(session_id, ()):
            sub.overflowed = True
            sub.pending.clear()
            sub.signal.set()

    def resync_all(self) -> None:
        """Makes every watcher re-read from the database."""
        for session_id in list(self._subscribers):
            self.resync(session_id)

    def close(self) -> None:
        """Ends every watch with `ShuttingDown`."""
        self._closed = True
        for subs in self._subscribers.values():
            for sub in subs:
                sub.closed = True
                sub.signal.set()

    async def follow(self, session_id: str, after_seq: int, read_page: ReadPage) -> AsyncIterator[StoredEvent]:
        """Events after `after_seq`, from the database and then live."""
        if self._closed:
            raise ShuttingDown("the session store is shutting down; watch again elsewhere or later")
        sub = _Subscription()
        self._subscribers[session_id].add(sub)
        cursor = after_seq
        try:
            while True:
                # Catch up from the database: at the start, and after an overflow.
                sub.overflowed = False
                sub.pending.clear()
                while page := await read_page(cursor):
                    for event in page:
                        yield event
                        cursor = event.seq
                # Live: events arrive in order; skip what the backlog already delivered.
                while not sub.overflowed:
                    if sub.closed:
                        raise ShuttingDown(
                            f"the session store is shutting down; resume the watch with after_seq={cursor}"
                        )
                    if not sub.pending:
                        sub.signal.clear()
                        await sub.signal.wait()
                        continue
                    event = sub.pending.popleft()
                    if event.seq <= cursor:
                        continue
                    if event.seq != cursor + 1:
                        # Cannot happen with an ordered publisher; re-read rather than skip events.
                        sub.overflowed = True
                        break
                    yield event
                    cursor = event.seq
        finally:
            subs = self._subscribers.get(session_id)
            if subs is not None:
                subs.discard(sub)
                if not subs:
                    del self._subscribers[session_id]
