"""Durable records of a sandbox's tool calls, which make `Execute` idempotent on its execution id.

A call is recorded as started before it runs and as finished, with its result, after. A repeated id gets the
stored result, or waits for the call still running; an id recorded as started by a hands process that died
before finishing it gets an explicit "interrupted, not re-run". Records live in the sandbox's state directory,
outside anything the sandbox can see, for as long as the sandbox does.
"""

from __future__ import annotations

import enum
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


class ExecStatus(enum.IntEnum):
    """How a call ended; numbers match `managed_agents.v1.ExecutionStatus`."""

    COMPLETED = 1
    TIMED_OUT = 2
    INTERRUPTED = 3
    REJECTED = 4


@dataclass(frozen=True, slots=True)
class ExecResult:
    """The outcome of one tool call."""

    output: str
    is_error: bool
    status: ExecStatus
    exit_code: int | None = None
    truncated: bool = False
    duration_s: float = 0.0
    replayed: bool = False
    sandbox_lost: bool = False


def call_fingerprint(name: str, tool_input: Mapping[str, Any]) -> str:
    """What an execution id stands for: the tool and its input. A retry sends the same; anything else reusing
    the id is a different call, refused rather than answered with the first call's result."""
    canonical = json.dumps({"name": name, "input": tool_input}, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Recorded:
    """What the log knows of an execution id: its result (None while started but not finished) and the
    fingerprint of the call it was given to (empty for records of an older hands)."""

    name: str
    fingerprint: str
    result: ExecResult | None


class ExecutionLog:
    """The execution records of one sandbox."""

    def __init__(self, directory: Path) -> None:
        self._directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    def _path(self, execution_id: str) -> Path:
        # Hashed: an id is caller input and must never become a path of its own.
        return self._directory / (hashlib.sha256(execution_id.encode()).hexdigest() + ".json")

    def _write(self, execution_id: str, record: dict[str, object]) -> None:
        path = self._path(execution_id)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record))
        os.replace(tmp, path)

    def lookup(self, execution_id: str) -> Recorded | None:
        """What is recorded of the id (a call started but never finished has no result), or None if never seen."""
        try:
            record = json.loads(self._path(execution_id).read_text())
        except FileNotFoundError:
            return None
        name, fingerprint = str(record.get("name", "")), str(record.get("fingerprint", ""))
        if record.get("state") == "started":
            return Recorded(name, fingerprint, None)
        result = dict(record["result"])
        result["status"] = ExecStatus(result["status"])
        return Recorded(name, fingerprint, ExecResult(**result))

    def started(self, execution_id: str, name: str, fingerprint: str) -> None:
        """Records that the call is about to run."""
        self._write(execution_id, {"state": "started", "id": execution_id, "name": name, "fingerprint": fingerprint})

    def finished(self, execution_id: str, name: str, fingerprint: str, result: ExecResult) -> None:
        """Records the call's result."""
        stored = asdict(result)
        stored["status"] = int(result.status)
        record: dict[str, object] = {
            "state": "finished",
            "id": execution_id,
            "name": name,
            "fingerprint": fingerprint,
            "result": stored,
        }
        self._write(execution_id, record)
