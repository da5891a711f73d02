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
from dataclasses import asdict, dataclass
from pathlib import Path


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

    def lookup(self, execution_id: str) -> ExecResult | str | None:
        """The stored result, the tool name of a call started but never finished, or None if never seen."""
        try:
            record = json.loads(self._path(execution_id).read_text())
        except FileNotFoundError:
            return None
        if record.get("state") == "started":
            return str(record.get("name", ""))
        result = dict(record["result"])
        result["status"] = ExecStatus(result["status"])
        return ExecResult(**result)

    def started(self, execution_id: str, name: str) -> None:
        """Records that the call is about to run."""
        self._write(execution_id, {"state": "started", "id": execution_id, "name": name})

    def finished(self, execution_id: str, name: str, result: ExecResult) -> None:
        """Records the call's result."""
        stored = asdict(result)
        stored["status"] = int(result.status)
        self._write(execution_id, {"state": "finished", "id": execution_id, "name": name, "result": stored})
