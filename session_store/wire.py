"""Protobuf wire encoding of stored events.

The servicer hands the store the serialized `Event` as the client sent it (output-only fields cleared). When
the store assigns `id`, `session_id`, `seq`, `type` and `create_time`, it appends them in wire format, since
protobuf parses concatenated encodings as one merged message, and stores the complete event. A read then only
frames stored bytes into a repeated field and the page is parsed once, in C: building 10,000 `Event` objects
field by field in Python costs an order of magnitude more.
"""

from __future__ import annotations

from collections.abc import Iterable

# Tag bytes: (field number << 3) | wire type, wire type 0 = varint, 2 = length-delimited.
_ID, _SESSION_ID, _SEQ, _TYPE, _CREATE_TIME = 0x0A, 0x12, 0x18, 0x22, 0x2A
_SECONDS, _NANOS = 0x08, 0x10
FIELD_1 = 0x0A
FIELD_2 = 0x12


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def length_delimited(tag: int, data: bytes) -> bytes:
    """One length-delimited field: tag, length, bytes."""
    return bytes((tag,)) + _varint(len(data)) + data


def event_bytes(body: bytes, *, event_id: str, session_id: str, seq: int, type: str, create_time_us: int) -> bytes:
    """`body` (a serialized `Event` without output-only fields) completed with the store-assigned fields."""
    seconds, micros = divmod(create_time_us, 1_000_000)
    timestamp = bytes((_SECONDS,)) + _varint(seconds)
    if micros:
        timestamp += bytes((_NANOS,)) + _varint(micros * 1000)
    return b"".join(
        (
            body,
            length_delimited(_ID, event_id.encode()),
            length_delimited(_SESSION_ID, session_id.encode()),
            bytes((_SEQ,)) + _varint(seq),
            length_delimited(_TYPE, type.encode()),
            length_delimited(_CREATE_TIME, timestamp),
        )
    )


def repeated(tag: int, messages: Iterable[bytes]) -> bytes:
    """A repeated message field (given by its tag byte) holding serialized `messages`."""
    return b"".join(length_delimited(tag, m) for m in messages)
