"""The hand-written wire encoding of stored events decodes to exactly the event built field by field."""

from __future__ import annotations

import pytest

from managed_agents import events
from managed_agents.v1 import events_pb2, session_pb2
from session_store import wire


@pytest.mark.parametrize("create_time_us", [0, 1_700_000_000_000_000, 1_700_000_000_123_456])
@pytest.mark.parametrize("seq", [1, 127, 128, 300, 2**40])
def test_event_bytes_match_the_protobuf_encoding(seq: int, create_time_us: int) -> None:
    body = events.user_message("héllo", producer="cli").SerializeToString()
    encoded = wire.event_bytes(
        body,
        event_id="sevt_y",
        session_id="sesn_x",
        seq=seq,
        type="user.message",
        create_time_us=create_time_us,
    )
    expected = events.user_message("héllo", producer="cli")
    expected.id, expected.session_id, expected.seq, expected.type = "sevt_y", "sesn_x", seq, "user.message"
    expected.create_time.FromMicroseconds(create_time_us)
    assert events_pb2.Event.FromString(encoded) == expected


def test_repeated_events_build_a_response() -> None:
    bodies = [events.user_message(str(n)).SerializeToString() for n in (1, 2, 3)]
    encoded = [
        wire.event_bytes(b, event_id=f"e{n}", session_id="s", seq=n, type="user.message", create_time_us=n)
        for n, b in enumerate(bodies, start=1)
    ]
    response = session_pb2.GetSessionResponse.FromString(wire.repeated(wire.FIELD_2, encoded))
    assert [e.seq for e in response.events] == [1, 2, 3]
    assert [events.plain_text(e.user_message.content) for e in response.events] == ["1", "2", "3"]
