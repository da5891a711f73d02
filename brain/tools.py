"""Which tools the model is offered and where each call goes: sandbox tools to hands, `<server>__<tool>`
tools to the MCP proxy, `read_session_events` to the session store (answered by the brain itself)."""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from google.protobuf import json_format

from brain.mcp import split_tool_name
from managed_agents.render import Renderer
from managed_agents.v1 import events_pb2, sandbox_pb2

SESSION_TOOL = "read_session_events"
_MAX_READ_EVENTS = 200
_MAX_READ_CHARS = 40_000

SESSION_TOOL_SPEC: dict[str, Any] = {
    "name": SESSION_TOOL,
    "description": (
        "Read events of this session's own log by sequence number, including ones left out of your context "
        "to save space (cleared tool results name their sequence number). Give start_seq and end_seq "
        f"(inclusive), or last to read the newest events. At most {_MAX_READ_EVENTS} events per call."
    ),
    "input_schema": {
        "type": "object",
        "properties": {
            "start_seq": {"type": "integer", "minimum": 1, "description": "first sequence number to read"},
            "end_seq": {"type": "integer", "minimum": 1, "description": "last sequence number to read"},
            "last": {"type": "integer", "minimum": 1, "description": "read the newest N events instead"},
        },
    },
}


class Route(enum.Enum):
    """Where a tool call is executed."""

    HANDS = "hands"
    MCP = "mcp"
    SESSION = "session"


@dataclass(frozen=True, slots=True)
class Tool:
    """A tool offered to the model."""

    name: str
    route: Route
    param: Mapping[str, Any]
    safe_to_retry: bool
    # For MCP tools: the server (granted credential) and the tool's own name there.
    server: str = ""
    remote_name: str = ""


def _api_param(spec: sandbox_pb2.ToolSpec) -> dict[str, Any]:
    if spec.anthropic_type:
        # Claude knows these tools from training; it gets only their type and name.
        return {"type": spec.anthropic_type, "name": spec.name}
    return {
        "name": spec.name,
        "description": spec.description,
        "input_schema": json_format.MessageToDict(spec.input_schema),
    }


class ToolSet:
    """The tools of one session."""

    def __init__(self, tools: Sequence[Tool]) -> None:
        self._tools = {t.name: t for t in tools}

    @classmethod
    def build(
        cls,
        hands_tools: Sequence[sandbox_pb2.ToolSpec],
        allowed: Sequence[str] = (),
        mcp_tools: Sequence[sandbox_pb2.ToolSpec] = (),
        mcp_servers: Sequence[str] = (),
    ) -> ToolSet:
        """Hands' tools (only `allowed` ones, if the session names any), the granted MCP servers' tools, and
        the session tool. A sandbox tool keeps its name if an MCP tool would take it."""
        tools = [
            Tool(spec.name, Route.HANDS, _api_param(spec), spec.safe_to_retry)
            for spec in hands_tools
            if not allowed or spec.name in allowed
        ]
        taken = {t.name for t in tools} | {SESSION_TOOL}
        for spec in mcp_tools:
            split = split_tool_name(spec.name, mcp_servers)
            if split is None or spec.name in taken:
                continue
            server, remote = split
            tools.append(Tool(spec.name, Route.MCP, _api_param(spec), False, server=server, remote_name=remote))
        if not allowed or SESSION_TOOL in allowed:
            tools.append(Tool(SESSION_TOOL, Route.SESSION, SESSION_TOOL_SPEC, safe_to_retry=True))
        return cls(tools)

    def get(self, name: str) -> Tool | None:
        """The tool called `name`, if offered."""
        return self._tools.get(name)

    def api_params(self) -> list[dict[str, Any]]:
        """The `tools` parameter of a Messages API request."""
        return [dict(t.param) for t in self._tools.values()]

    @property
    def names(self) -> list[str]:
        """Names of the offered tools."""
        return list(self._tools)


def session_read_range(tool_input: Mapping[str, Any]) -> tuple[int, int, int]:
    """(start_seq, end_seq, last) of a `read_session_events` call; raises ValueError with a sentence."""

    def number(key: str) -> int:
        value = tool_input.get(key, 0)
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{key} must be a positive integer")
        return value

    start, end, last = number("start_seq"), number("end_seq"), number("last")
    if last and (start or end):
        raise ValueError("give either last, or start_seq and end_seq, not both")
    if not last and not start:
        raise ValueError("give start_seq (and end_seq), or last")
    if last:
        return 0, 0, min(last, _MAX_READ_EVENTS)
    end = end or start + _MAX_READ_EVENTS - 1
    if end < start:
        raise ValueError("end_seq is before start_seq")
    return start, min(end, start + _MAX_READ_EVENTS - 1), 0


def render_events(events: Sequence[events_pb2.Event]) -> str:
    """Events as text lines for the model, cut at a size limit."""
    renderer = Renderer(color=False, width=4000)
    lines, size = [], 0
    for event in events:
        line = renderer.line(event)
        if size + len(line) > _MAX_READ_CHARS:
            lines.append(f"[output cut here; continue from seq {event.seq}]")
            break
        lines.append(line)
        size += len(line)
    return "\n".join(lines) if lines else "(no events in that range)"
