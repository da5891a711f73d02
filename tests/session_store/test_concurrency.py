"""Many concurrent writers: one total order per session, dense seqs, nothing lost or duplicated."""

from __future__ import annotations

import asyncio

from managed_agents import events
from session_store.client import SessionStoreClient

WRITERS = 50
PER_WRITER = 20


async def _write(store: SessionStoreClient, session_id: str, writer: int) -> list[int]:
    seqs = []
    for i in range(PER_WRITER):
        response = await store.emit(session_id, events.user_message(f"w{writer}-{i}"))
        seqs.append(response.event.seq)
    return seqs


def _assert_linear(log: list[tuple[int, str]], expected_texts: set[str]) -> None:
    assert [seq for seq, _ in log] == list(range(1, len(log) + 1)), "seqs must be dense from 1"
    texts = [text for _, text in log]
    assert len(texts) == len(set(texts)), "no event may be stored twice"
    assert set(texts) == expected_texts, "no acknowledged event may be lost"


async def test_fifty_writers_on_one_session(store: SessionStoreClient) -> None:
    session = await store.create_session()
    acked = await asyncio.gather(*(_write(store, session.id, w) for w in range(WRITERS)))
    for seqs in acked:
        assert seqs == sorted(seqs), "one writer's appends keep their order"
    _, log = await store.read_session(session.id)
    _assert_linear(
        [(e.seq, events.plain_text(e.user_message.content)) for e in log],
        {f"w{w}-{i}" for w in range(WRITERS) for i in range(PER_WRITER)},
    )
    all_acked = sorted(seq for seqs in acked for seq in seqs)
    assert all_acked == list(range(1, WRITERS * PER_WRITER + 1))


async def test_fifty_writers_on_many_sessions(store: SessionStoreClient) -> None:
    sessions = [(await store.create_session()).id for _ in range(10)]
    await asyncio.gather(*(_write(store, sessions[w % 10], w) for w in range(WRITERS)))
    for index, session_id in enumerate(sessions):
        _, log = await store.read_session(session_id)
        _assert_linear(
            [(e.seq, events.plain_text(e.user_message.content)) for e in log],
            {f"w{w}-{i}" for w in range(index, WRITERS, 10) for i in range(PER_WRITER)},
        )


async def test_racing_expected_seq_writers_let_exactly_one_win_each_slot(store: SessionStoreClient) -> None:
    session = await store.create_session()

    async def try_append(writer: int) -> bool:
        try:
            await store.emit(session.id, events.user_message(f"w{writer}"), expected_seq=1)
        except Exception:
            return False
        return True

    outcomes = await asyncio.gather(*(try_append(w) for w in range(20)))
    assert sum(outcomes) == 1
    assert (await store.get_session(session.id)).session.last_seq == 1
