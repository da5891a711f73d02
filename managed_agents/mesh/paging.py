"""Opaque page tokens (AIP-158): the position to resume from plus a fingerprint of the request's other fields,
so a token replayed with a changed request is refused instead of silently paging something else."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping
from typing import Any

from managed_agents.mesh.errors import InvalidArgument


def _fingerprint(request: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()[:16]


def encode(position: Mapping[str, Any], request: Mapping[str, Any]) -> str:
    """A token for `position` that is only valid with the same `request` fields."""
    raw = json.dumps({"p": dict(position), "f": _fingerprint(request)}, separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode(token: str, request: Mapping[str, Any]) -> dict[str, Any]:
    """The position in `token`; raises `InvalidArgument` for a malformed or mismatched token."""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        data = json.loads(raw)
        position, fingerprint = data["p"], data["f"]
        if not isinstance(position, dict):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        raise InvalidArgument.field("page_token", "is not a token this server issued") from None
    if fingerprint != _fingerprint(request):
        raise InvalidArgument.field(
            "page_token",
            "belongs to a request with different parameters; keep them unchanged while paging",
        )
    return position
