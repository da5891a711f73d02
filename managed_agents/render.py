"""Human-readable, optionally coloured, one-line renderings of session events for terminals."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

from google.protobuf import json_format

from managed_agents.events import plain_text
from managed_agents.v1 import events_pb2

_COLORS = {
    "dim": "2",
    "bold": "1",
    "red": "31",
    "green": "32",
    "yellow": "33",
    "blue": "34",
    "magenta": "35",
    "cyan": "36",
}


def use_color(stream_is_tty: bool, environ: Mapping[str, str]) -> bool:
    """Colour when writing to a terminal, unless NO_COLOR is set; FORCE_COLOR forces it."""
    if environ.get("NO_COLOR"):
        return False
    return bool(environ.get("FORCE_COLOR")) or stream_is_tty


class Renderer:
    """Formats events as `seq  type  summary` lines."""

    def __init__(self, *, color: bool, width: int = 160) -> None:
        self._color = color
        self._width = width

    @classmethod
    def for_terminal(cls, is_tty: bool) -> Renderer:
        """A renderer that colours only real terminals."""
        return cls(color=use_color(is_tty, os.environ))

    def paint(self, text: str, *styles: str) -> str:
        """`text` in the given styles, if colour is on."""
        if not self._color or not styles:
            return text
        codes = ";".join(_COLORS[s] for s in styles)
        return f"\033[{codes}m{text}\033[0m"

    def _clip(self, text: str) -> str:
        flat = " ".join(text.split())
        return flat if len(flat) <= self._width else flat[: self._width - 1] + "…"

    def summary(self, event: events_pb2.Event) -> tuple[str, tuple[str, ...]]:
        """A one-line description of an event and the styles to show it in."""
        kind = event.WhichOneof("payload")
        if kind == "user_message":
            return self._clip(plain_text(event.user_message.content)), ("bold",)
        if kind == "agent_message":
            # The agent's words are the point of a session: shown whole, continuation lines indented.
            text = plain_text(event.agent_message.content).strip()
            return text.replace("\n", "\n" + " " * 34), ("green",)
        if kind == "agent_thinking":
            return self._clip(event.agent_thinking.thinking or "(redacted)"), ("dim",)
        if kind == "agent_tool_use":
            use = event.agent_tool_use
            arguments = json.dumps(json_format.MessageToDict(use.input), ensure_ascii=False)
            return self._clip(f"{use.name} {arguments}  [{use.id}]"), ("cyan",)
        if kind == "agent_tool_result":
            result = event.agent_tool_result
            status = "error" if result.is_error else "ok"
            extra = f" exit={result.execution.exit_code}" if result.execution.exit_code else ""
            text = plain_text(result.content)
            return self._clip(f"{status}{extra}: {text}"), ("red",) if result.is_error else ("dim",)
        if kind == "agent_mcp_tool_use":
            mcp_use = event.agent_mcp_tool_use
            arguments = json.dumps(json_format.MessageToDict(mcp_use.input), ensure_ascii=False)
            return self._clip(f"{mcp_use.server_name}.{mcp_use.name} {arguments}"), ("cyan",)
        if kind == "agent_mcp_tool_result":
            mcp_result = event.agent_mcp_tool_result
            status = "error" if mcp_result.is_error else "ok"
            text = plain_text(mcp_result.content)
            return self._clip(f"{status}: {text}"), ("red",) if mcp_result.is_error else ("dim",)
        if kind == "session_status_idle":
            reason = events_pb2.StopReason.Name(event.session_status_idle.stop_reason)
            return reason.removeprefix("STOP_REASON_").lower(), ("yellow",)
        if kind == "session_error":
            error = event.session_error
            retry = " (retrying)" if error.retrying else ""
            return self._clip(f"{error.kind or 'error'}: {error.message}{retry}"), ("red",)
        if kind == "span_model_request_end":
            end = event.span_model_request_end
            usage = end.model_usage
            return (
                f"{end.stop_reason or 'failed'}  in={usage.input_tokens} out={usage.output_tokens} "
                f"cache_read={usage.cache_read_input_tokens}  {end.duration.ToMilliseconds()} ms",
                ("dim",),
            )
        if kind == "sandbox_provisioned":
            sandbox = event.sandbox_provisioned
            return f"{sandbox.sandbox_id} ({sandbox.backend})", ("magenta",)
        if kind == "sandbox_lost":
            return self._clip(f"{event.sandbox_lost.sandbox_id}: {event.sandbox_lost.reason}"), ("red",)
        if kind == "context_compacted":
            compacted = event.context_compacted
            return f"through seq {compacted.through_seq} ({compacted.strategy})", ("dim",)
        if kind is None:
            return "(unknown event type)", ("dim",)
        payload = json_format.MessageToDict(getattr(event, kind))
        return self._clip(json.dumps(payload, ensure_ascii=False) if payload else ""), ("dim",)

    def line(self, event: events_pb2.Event) -> str:
        """`seq  type  summary`."""
        text, styles = self.summary(event)
        return f"{self.paint(f'{event.seq:>5}', 'dim')}  {self.paint(f'{event.type:<26}', *styles)} {text}"
