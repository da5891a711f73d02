"""Following a session's turn in a terminal: each event as a line, and a live progress line (step, elapsed
time, tokens) while the turn runs."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from dataclasses import dataclass, field
from typing import TextIO

from google.protobuf import json_format

from managed_agents.render import Renderer
from managed_agents.terminal_text import event_line
from managed_agents.v1 import events_pb2
from session_store.client import SessionStoreClient

_SPINNER = "|/-\\"


@dataclass
class TurnOutcome:
    """How a followed turn ended."""

    stop_reason: int = events_pb2.STOP_REASON_UNSPECIFIED
    last_seq: int = 0
    model_calls: int = 0
    tool_calls: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True if the turn ended normally."""
        return self.stop_reason == events_pb2.STOP_REASON_END_TURN


class TurnFollower:
    """Prints a session's events from a cursor until the turn ends (the next `session.status_idle`)."""

    def __init__(
        self,
        store: SessionStoreClient,
        renderer: Renderer,
        *,
        out: TextIO | None = None,
        json_lines: bool = False,
    ) -> None:
        self._store = store
        self._renderer = renderer
        self._out = out or sys.stdout
        self._json = json_lines
        self._progress = self._out.isatty() and not json_lines

    def _clear_progress(self) -> None:
        if self._progress:
            self._out.write("\r\033[2K")

    def _show_progress(self, outcome: TurnOutcome, started: float, tick: int) -> None:
        if not self._progress:
            return
        elapsed = time.monotonic() - started
        line = (
            f"{_SPINNER[tick % 4]} step {outcome.model_calls} | {outcome.tool_calls} tool calls | "
            f"{elapsed:5.1f} s | tokens in {outcome.input_tokens} out {outcome.output_tokens}"
        )
        self._out.write("\r\033[2K" + self._renderer.paint(line, "dim"))
        self._out.flush()

    async def follow(self, session_id: str, *, after_seq: int) -> TurnOutcome:
        """Streams events after `after_seq` until the turn ends; returns its outcome."""
        outcome = TurnOutcome()
        started = time.monotonic()
        ticker = asyncio.create_task(self._tick(outcome, started)) if self._progress else None
        try:
            async for event in self._store.watch(session_id, after_seq=after_seq):
                outcome.last_seq = event.seq
                kind = event.WhichOneof("payload")
                if kind == "span_model_request_end":
                    outcome.model_calls += 1
                    outcome.input_tokens += event.span_model_request_end.model_usage.input_tokens
                    outcome.output_tokens += event.span_model_request_end.model_usage.output_tokens
                elif kind == "agent_tool_use":
                    outcome.tool_calls += 1
                elif kind == "session_error":
                    outcome.errors.append(event.session_error.message)
                self._clear_progress()
                if self._json:
                    # ensure_ascii (the default) escapes every control character: nothing raw reaches the terminal.
                    self._out.write(json_format.MessageToJson(event, indent=None) + "\n")
                else:
                    self._out.write(event_line(self._renderer, event) + "\n")
                self._out.flush()
                if kind == "session_status_idle":
                    outcome.stop_reason = event.session_status_idle.stop_reason
                    return outcome
        finally:
            if ticker is not None:
                ticker.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await ticker
                self._clear_progress()
        return outcome

    async def _tick(self, outcome: TurnOutcome, started: float) -> None:
        tick = 0
        while True:
            self._show_progress(outcome, started, tick)
            tick += 1
            await asyncio.sleep(0.2)
