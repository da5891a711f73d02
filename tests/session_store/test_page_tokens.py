"""Page tokens are caller input: a forged or garbled one is INVALID_ARGUMENT with a sentence, never INTERNAL
(issue 13). Tokens are unsigned, since any store server sharing a PostgreSQL log must accept another's, so
every field of the decoded position is checked for type and range."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from managed_agents import events
from managed_agents.mesh import paging
from managed_agents.mesh.errors import InvalidArgument
from managed_agents.v1 import session_pb2, session_pb2_grpc
from session_store.app import StoreServer
from session_store.client import SessionStoreClient

SID = "tokens"


def _raw(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def _forged(position_json: str, request: dict[str, Any]) -> str:
    """A token with a hand-written position and the right fingerprint (anyone can compute it)."""
    return _raw(f'{{"p":{position_json},"f":"{paging._fingerprint(request)}"}}')


GET_SESSION = {"s": SID, "a": 0}
GET_EVENTS = {"s": SID, "a": 0, "b": 0, "l": 0}
LIST = {"status": 0, "orphaned": False}

Rpc = Callable[[session_pb2_grpc.SessionServiceStub, str], Awaitable[object]]
RPCS: dict[str, tuple[Rpc, dict[str, Any], list[str]]] = {
    "GetSession": (
        lambda stub, t: stub.GetSession(session_pb2.GetSessionRequest(session_id=SID, page_size=1, page_token=t)),
        GET_SESSION,
        ['{"after":"x"}', '{"after":1e400}', '{"after":-1}', f'{{"after":{2**64}}}', '{"after":true}', '{"after":1.5}'],
    ),
    "GetEvents": (
        lambda stub, t: stub.GetEvents(session_pb2.GetEventsRequest(session_id=SID, page_size=1, page_token=t)),
        GET_EVENTS,
        [
            '{"after":"x","until":3}',
            '{"after":1,"until":1e400}',
            f'{{"after":0,"until":{10**30}}}',
            '{"after":3,"until":1}',
            '{"after":null,"until":3}',
            '{"after":1}',
            '{"after":1,"until":3,"extra":1}',
        ],
    ),
    "ListSessions": (
        lambda stub, t: stub.ListSessions(session_pb2.ListSessionsRequest(page_size=1, page_token=t)),
        LIST,
        [
            '{"t":1e400,"id":"x"}',
            '{"t":"now","id":"x"}',
            f'{{"t":{2**63},"id":"x"}}',
            '{"t":-1,"id":"x"}',
            '{"t":1,"id":5}',
            '{"t":1,"id":"not an id"}',
            '{"t":1,"id":["x"]}',
            '{"t":1}',
        ],
    ),
}
# Tokens that are wrong before any position is read, for every RPC.
GARBLED = [
    "!!!not-base64!!!",
    "e30",  # {} without p and f
    _raw("[1, 2]"),
    _raw('"just a string"'),
    _raw('{"p": [1], "f": "x"}'),
    _raw('{"p": {}, "f": 7}'),
    _raw("[" * 500 + "]" * 500),
    base64.urlsafe_b64encode(b"\xff\xfe\x00garbage").decode(),
    "A" * 5000,
    "x",
    _raw('{"p": {"after": 1}, "f": "0000000000000000"}'),
]


async def test_forged_and_garbled_tokens_are_invalid_argument(
    store_server: StoreServer, store: SessionStoreClient
) -> None:
    await store.create_session(session_id=SID)
    await store.emit_batch(SID, [events.user_message(f"m{i}") for i in range(3)])
    async with grpc.aio.insecure_channel(store_server.address) as channel:
        stub = session_pb2_grpc.SessionServiceStub(channel)
        for name, (call, request, positions) in RPCS.items():
            for token in [_forged(p, request) for p in positions] + GARBLED:
                with pytest.raises(grpc.aio.AioRpcError) as raised:
                    await call(stub, token)
                details = raised.value.details() or ""
                assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, f"{name} {token[:60]}: {details}"
                assert details.startswith("page_token: "), details
                assert "Traceback" not in details and "internal" not in details
        # A genuine token still pages.
        first = await stub.GetEvents(session_pb2.GetEventsRequest(session_id=SID, page_size=1))
        second = await stub.GetEvents(
            session_pb2.GetEventsRequest(session_id=SID, page_size=1, page_token=first.next_page_token)
        )
        assert [e.seq for e in second.events] == [2]


def test_decode_int_checks_type_and_range() -> None:
    request = {"s": 1}
    assert paging.decode_int(paging.encode({"o": 7}, request), request, "o", 0, 10) == 7
    for position in ({"o": 11}, {"o": -1}, {"o": "7"}, {"o": True}, {"o": 7.0}, {"x": 7}, {"o": 7, "x": 1}):
        with pytest.raises(InvalidArgument, match="page_token"):
            paging.decode_int(paging.encode(position, request), request, "o", 0, 10)
    # Without a schema, the position comes back as it was encoded (hands' ListSandboxes reads it this way).
    assert paging.decode(paging.encode({"o": 7}, request), request) == {"o": 7}


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
SCHEMA: paging.Schema = {"t": paging.Int(0, 2**63 - 1), "id": paging.Str(re.compile(r"[a-z]{1,8}"))}


def _decodes_or_refuses(token: str, request: dict[str, Any]) -> None:
    schemas: tuple[paging.Schema | None, ...] = (None, SCHEMA)
    for schema in schemas:
        try:
            position = paging.decode(token, request, schema)
        except InvalidArgument as error:
            assert error.violations[0].field == "page_token"
            continue
        assert isinstance(position, dict)
        if schema is not None:
            assert type(position["t"]) is int and type(position["id"]) is str


@settings(max_examples=400, deadline=None)
@given(st.text(max_size=300) | st.binary(max_size=300).map(lambda b: base64.urlsafe_b64encode(b).decode()))
def test_decode_of_any_string_raises_only_invalid_argument(token: str) -> None:
    _decodes_or_refuses(token, {"q": 1})


@settings(max_examples=400, deadline=None)
@given(JSON, JSON, st.booleans())
def test_decode_of_any_json_raises_only_invalid_argument(position: object, fingerprint: object, genuine: bool) -> None:
    request = {"q": 1}
    if genuine:
        fingerprint = paging._fingerprint(request)
    token = _raw(json.dumps({"p": position, "f": fingerprint}))
    _decodes_or_refuses(token, request)
    _decodes_or_refuses(_raw(json.dumps(position)), request)
