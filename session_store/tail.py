"""Live fan-out of committed events to watchers, and the backlog-then-live merge every watch uses.

A backend publishes each committed batch to the `Tail`; `follow` subscribes *before* reading the backlog, so
an event committed during the read reaches the watcher either from the database or from the subscription,
and duplicates are dropped by `seq`.

Memory is bounded by bytes, not by event count: each watcher's queue of undelivered live events holds at most
`max_pending_bytes` (16 MiB), and all queues together at most `max_total_bytes` (256 MiB). When a batch does
not fit:

- a watcher that is live and still has events waiting is behind its session: its queue is dropped at once and
  its stream ends with `WatchTooSlow` (RESOURCE_EXHAUSTED) carrying the resume cursor, the last `seq` it
  delivered, once it takes its next event; watching again from there loses nothing;
- a watcher that is still reading its backlog, or that has nothing waiting (the batch alone is larger than
  the budget), is not behind: its queue is dropped and it re-reads the missed events from the database, one
  bounded page at a time.

A watcher that stops reading therefore pins at most its queue (then nothing, once dropped) plus the events
already handed to gRPC, whatever is appended meanwhile.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

from managed_agents.mesh.errors import ShuttingDown
from session_store.errors import RESUME_KEY, WatchTooSlow
from session_store.store import StoredEvent

ReadPage = Callable[[int], Awaitable[list[StoredEvent]]]
"""Reads the next stored events after a sequence number (an empty list at the end of the log)."""

MAX_PENDING_BYTES = 16 * 1024 * 1024
MAX_TOTAL_BYTES = 256 * 1024 * 1024
EVENT_OVERHEAD = 200
"""Bytes a queued event costs beyond its body (the `StoredEvent` and its strings), so that floods of tiny
events are bounded too."""


def _cost(event: StoredEvent) -> int:
    return len(event.body) + EVENT_OVERHEAD


class _Subscription:
    __slots__ = ("closed", "lagging", "live", "overflowed", "pending", "pending_bytes", "signal")

    def __init__(self) -> None:
        self.pending: deque[StoredEvent] = deque()
        self.pending_bytes = 0
        self.signal = asyncio.Event()
        self.overflowed = False  # re-read from the database
        self.lagging = False  # end the watch: the reader is too slow
        self.live = False  # past the backlog
        self.closed = False


class Tail:
    """In-process registry of watchers per session."""

    def __init__(self, *, max_pending_bytes: int = MAX_PENDING_BYTES, max_total_bytes: int = MAX_TOTAL_BYTES) -> None:
        self._max_pending = max_pending_bytes
        self._max_total = max_total_bytes
        self._total = 0
        self._subscribers: defaultdict[str, set[_Subscription]] = defaultdict(set)
        self._closed = False

    @property
    def pending_bytes(self) -> int:
        """Bytes of live events queued for all watchers."""
        return self._total

    def subscriber_count(self, session_id: str | None = None) -> int:
        """Watchers of one session, or of all sessions."""
        if session_id is not None:
            return len(self._subscribers.get(session_id, ()))
        return sum(len(subs) for subs in self._subscribers.values())

    def _drop(self, sub: _Subscription) -> None:
        self._total -= sub.pending_bytes
        sub.pending.clear()
        sub.pending_bytes = 0

    def publish(self, session_id: str, events: Sequence[StoredEvent]) -> None:
        """Hands committed events (in `seq` order) to the session's watchers."""
        subs = self._subscribers.get(session_id)
        if not subs:
            return
        size = sum(_cost(e) for e in events)
        for sub in subs:
            if sub.overflowed or sub.lagging:
                continue
            if sub.pending_bytes + size <= self._max_pending and self._total + size <= self._max_total:
                sub.pending.extend(events)
                sub.pending_bytes += size
                self._total += size
            else:
                if sub.live and sub.pending:
                    sub.lagging = True
                else:
                    sub.overflowed = True
                self._drop(sub)
            sub.signal.set()

    def resync(self, session_id: str) -> None:
        """Makes the session's watchers re-read from the database (when live events may have been missed);
        those already too far behind end as they were going to."""
        for sub in self._subscribers.get(session_id, ()):
            if sub.lagging:
                continue
            sub.overflowed = True
            self._drop(sub)
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
        """Events after `after_seq`, from the database and then live. Raises `ShuttingDown` when the tail
        closes and `WatchTooSlow` when the reader falls behind, both with the resume cursor in their metadata."""
        if self._closed:
            raise ShuttingDown("the session store is shutting down; watch again elsewhere or later")
        sub = _Subscription()
        self._subscribers[session_id].add(sub)
        cursor = after_seq
        try:
            while True:
                # Catch up from the database: at the start, and after an overflow.
                sub.overflowed = sub.live = False
                self._drop(sub)
                while page := await read_page(cursor):
                    for event in page:
                        yield event
                        cursor = event.seq
                # Live: events arrive in order; skip what the backlog already delivered.
                sub.live = True
                while not sub.overflowed:
                    if sub.closed:
                        raise ShuttingDown(
                            f"the session store is shutting down; resume the watch with after_seq={cursor}",
                            metadata={RESUME_KEY: str(cursor)},
                        )
                    if sub.lagging:
                        raise WatchTooSlow(
                            f"this watch fell more than {self._max_pending // (1024 * 1024)} MiB behind the live "
                            f"events of session {session_id} and was ended; nothing is lost: resume the watch with "
                            f"after_seq={cursor}",
                            metadata={RESUME_KEY: str(cursor)},
                        )
                    if not sub.pending:
                        sub.signal.clear()
                        await sub.signal.wait()
                        continue
                    event = sub.pending.popleft()
                    cost = _cost(event)
                    sub.pending_bytes -= cost
                    self._total -= cost
                    if event.seq <= cursor:
                        continue
                    if event.seq != cursor + 1:
                        # Cannot happen with an ordered publisher; re-read rather than skip events.
                        sub.overflowed = True
                        break
                    yield event
                    cursor = event.seq
        finally:
            self._drop(sub)
            subs = self._subscribers.get(session_id)
            if subs is not None:
                subs.discard(sub)
                if not subs:
                    del self._subscribers[session_id]
