"""Ids of mesh resources: a prefix and 26 characters of lowercase Crockford base32 (a ULID), time-sortable."""

from __future__ import annotations

import os
import re
import time

_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"

SESSION_PREFIX = "sesn_"
EVENT_PREFIX = "sevt_"
SANDBOX_PREFIX = "sbx_"

# Ids that callers may choose (sessions, executions, idempotency keys) share these shapes.
_RESOURCE_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_KEY = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def new_id(prefix: str) -> str:
    """A new id: `prefix` + 48 bits of milliseconds + 80 random bits, base32-encoded (26 characters)."""
    value = (time.time_ns() // 1_000_000) << 80 | int.from_bytes(os.urandom(10), "big")
    chars = []
    for _ in range(26):
        chars.append(_ALPHABET[value & 31])
        value >>= 5
    return prefix + "".join(reversed(chars))


def is_resource_id(value: str) -> bool:
    """True for 1 to 64 characters of `[A-Za-z0-9_-]` (session and sandbox ids)."""
    return _RESOURCE_ID.fullmatch(value) is not None


def is_key(value: str) -> bool:
    """True for 1 to 128 characters of `[A-Za-z0-9._:-]` (idempotency keys, execution ids)."""
    return _KEY.fullmatch(value) is not None
