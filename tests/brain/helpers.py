"""Helpers for brain tests: start a session, wait for its turn to end, read its log as types."""

from __future__ import annotations

import asyncio

from managed_agents import events
from managed_agents.v1 import events_pb2
from session_store.client import SessionStoreClient


async def wait_idle(
    store: SessionStoreClient, session_id: str, *, count: int = 1, timeout: float = 30
) -> list[events_pb2.Event]:
    """The log once it holds `count` `session.status_idle` events."""

    async def watch() -> None:
        seen = 0
        async for event in store.watch(session_id):
            if event.HasField("session_status_idle"):
                seen += 1
                if seen >= count:
                    return

    await asyncio.wait_for(watch(), timeout)
    _, log = await store.read_session(session_id)
    return log


def types(log: list[events_pb2.Event]) -> list[str]:
    """The event types of a log, in order."""
    return [e.type for e in log]


def stop_reasons(log: list[events_pb2.Event]) -> list[str]:
    """The stop reasons of the idle events of a log."""
    return [
        events_pb2.StopReason.Name(e.session_status_idle.stop_reason).removeprefix("STOP_REASON_").lower()
        for e in log
        if e.HasField("session_status_idle")
    ]


async def start_session(store: SessionStoreClient, text: str, **kwargs: object) -> str:
    """Creates a session holding one user message; returns its id."""
    session = await store.create_session(**kwargs)  # type: ignore[arg-type]
    await store.emit(session.id, events.user_message(text, producer="test"))
    return session.id
