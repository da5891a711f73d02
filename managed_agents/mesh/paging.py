"""Opaque page tokens (AIP-158): the position to resume from plus a fingerprint of the request's other fields,
so a token replayed with a changed request is refused instead of silently paging something else.

Tokens are not signed: several servers may serve one log (PostgreSQL), and a client may page across them, so
a token must work on any of them. Instead a token is distrusted: `decode` refuses anything that is not a token
of the expected shape with `InvalidArgument`, never another error, and a caller passes a `schema` (or uses
`decode_int`) so that every field of the position has the expected type and range before it reaches a query.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from managed_agents.mesh.errors import InvalidArgument

MAX_TOKEN_CHARS = 1024
"""Longest token `decode` looks at; this mesh's tokens are about a tenth of it."""

_TOKEN = re.compile(r"[A-Za-z0-9_-]*={0,2}")
_NOT_OURS = "is not a token this server issued; pass next_page_token exactly as it was returned"


@dataclass(frozen=True, slots=True)
class Int:
    """A position field that must be an integer from `low` to `high` (booleans and floats are refused)."""

    low: int
    high: int


@dataclass(frozen=True, slots=True)
class Str:
    """A position field that must be a string matching `pattern` in full."""

    pattern: re.Pattern[str]


Schema = Mapping[str, Int | Str]
"""The fields a position must have, exactly these and no others."""


def _fingerprint(request: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()[:16]


def encode(position: Mapping[str, Any], request: Mapping[str, Any]) -> str:
    """A token for `position` that is only valid with the same `request` fields."""
    raw = json.dumps({"p": dict(position), "f": _fingerprint(request)}, separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def _valid(value: object, rule: Int | Str) -> bool:
    if isinstance(rule, Int):
        return type(value) is int and rule.low <= value <= rule.high
    return type(value) is str and rule.pattern.fullmatch(value) is not None


def decode(token: str, request: Mapping[str, Any], schema: Schema | None = None) -> dict[str, Any]:
    """The position in `token`; raises `InvalidArgument` (and nothing else) for a malformed or mismatched token,
    or, given a `schema`, for a position whose fields are not exactly the schema's, of its types and ranges."""
    if len(token) > MAX_TOKEN_CHARS or not _TOKEN.fullmatch(token):
        raise InvalidArgument.field("page_token", _NOT_OURS)
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        data = json.loads(raw)
        position, fingerprint = data["p"], data["f"]
    except (ValueError, KeyError, TypeError, IndexError, RecursionError, binascii.Error):
        # ValueError covers bad base64 padding, bytes that are not UTF-8, JSON syntax and over-long integers.
        raise InvalidArgument.field("page_token", _NOT_OURS) from None
    if not isinstance(position, dict) or not isinstance(fingerprint, str):
        raise InvalidArgument.field("page_token", _NOT_OURS)
    if fingerprint != _fingerprint(request):
        raise InvalidArgument.field(
            "page_token",
            "belongs to a request with different parameters; keep them unchanged while paging",
        )
    if schema is not None and (
        position.keys() != schema.keys() or not all(_valid(position[k], rule) for k, rule in schema.items())
    ):
        raise InvalidArgument.field("page_token", f"{_NOT_OURS} (its position is malformed)")
    return position


def decode_int(token: str, request: Mapping[str, Any], key: str, low: int, high: int) -> int:
    """The one integer field `key` of a token's position, checked to lie from `low` to `high`; raises
    `InvalidArgument` otherwise (e.g. hands' `ListSandboxes`: `decode_int(token, request, "o", 0, 2**31)`)."""
    value = decode(token, request, {key: Int(low, high)})[key]
    assert type(value) is int
    return value
