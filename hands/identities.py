"""Host identities of sandboxes: each sandbox runs as a uid (and gid of the same number) of its own, taken from a
range no login account uses, so no two sandboxes can touch each other's files or processes even if one got out
of its namespaces, and per-uid kernel limits (the process count of rlimit enforcement) are per sandbox.

An identity is claimed by creating `<claims>/<uid>` with O_EXCL: the claim is atomic across every hands server
on the host, whatever its work root. A claim names the work root and sandbox holding it, so a starting server
can take back the claims its killed predecessor left, and any server can drop claims whose work root is gone.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

# Far above the uids of people (1000+) and of the subordinate ranges user namespaces hand out (100000 + 65536 n),
# below the 32-bit limits the kernel reserves (4294967295 is -1).
DEFAULT_RANGE = (1_000_000_000, 1_000_000)
DEFAULT_CLAIMS = Path("/run/managed-agents/identities")


@dataclass(frozen=True, slots=True)
class Identity:
    """A host uid and gid."""

    uid: int
    gid: int


def parse_range(text: str) -> tuple[int, int]:
    """`FIRST-LAST` (inclusive) as (first, count); raises ValueError with a sentence."""
    first, sep, last = text.partition("-")
    if not sep or not first.strip().isdigit() or not last.strip().isdigit():
        raise ValueError(f"{text!r} is not FIRST-LAST (two uids)")
    low, high = int(first), int(last)
    if not 1000 <= low <= high < 2**32 - 2:
        raise ValueError(f"{text!r} must satisfy 1000 <= FIRST <= LAST < 4294967294")
    return low, high - low + 1


class Identities:
    """Claims and releases the per-sandbox identities of one hands server."""

    def __init__(self, work_root: Path, *, first: int, count: int, claims: Path = DEFAULT_CLAIMS) -> None:
        self._owner = str(work_root.resolve())
        self._first = first
        self._count = count
        self._claims = claims

    def _path(self, uid: int) -> Path:
        return self._claims / str(uid)

    def claim(self, sandbox_id: str) -> Identity:
        """A fresh identity for `sandbox_id`. Raises OSError if the range is exhausted or claims cannot be made."""
        self._claims.mkdir(parents=True, exist_ok=True, mode=0o700)
        # Start where the id hashes to, so concurrent servers rarely race for the same uid.
        start = int.from_bytes(hashlib.sha256(sandbox_id.encode()).digest()[:8], "big") % self._count
        record = json.dumps({"work_root": self._owner, "sandbox": sandbox_id}).encode()
        for step in range(self._count):
            uid = self._first + (start + step) % self._count
            try:
                fd = os.open(self._path(uid), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            except FileExistsError:
                continue
            try:
                os.write(fd, record)
            finally:
                os.close(fd)
            return Identity(uid, uid)
        raise OSError(f"every sandbox identity in {self._first}-{self._first + self._count - 1} is taken")

    def reclaim(self, sandbox_id: str, identity: Identity) -> None:
        """Takes `identity` back for an adopted sandbox (its claim may have survived, or been swept)."""
        self._claims.mkdir(parents=True, exist_ok=True, mode=0o700)
        record = json.dumps({"work_root": self._owner, "sandbox": sandbox_id}).encode()
        path = self._path(identity.uid)
        held = self._holder(path)
        if held is not None and held != (self._owner, sandbox_id):
            raise OSError(f"uid {identity.uid} of sandbox {sandbox_id} is now held by {held[1]} of {held[0]}")
        path.write_bytes(record)

    def release(self, identity: Identity) -> None:
        """Gives the identity back (its sandbox is destroyed and no process of it is left)."""
        with contextlib.suppress(FileNotFoundError):
            self._path(identity.uid).unlink()

    @staticmethod
    def _holder(path: Path) -> tuple[str, str] | None:
        try:
            record = json.loads(path.read_bytes())
            return str(record["work_root"]), str(record["sandbox"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError):
            return ("?", "?")

    def sweep(self, keep: Collection[str]) -> int:
        """Drops this work root's claims of sandboxes not in `keep`, and claims of work roots that are gone."""
        if not self._claims.is_dir():
            return 0
        dropped = 0
        for path in self._claims.iterdir():
            held = self._holder(path)
            if held is None:
                continue
            root, sandbox = held
            ours_and_unused = root == self._owner and sandbox not in keep
            if ours_and_unused or (root != "?" and not os.path.isdir(root)):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                dropped += 1
        if dropped:
            log.info("released %d sandbox identit(ies) left by earlier servers", dropped)
        return dropped
