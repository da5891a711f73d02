"""From the session log to the model's context: which events become which Messages API blocks, and how a long
session is kept within the context budget without deleting anything from the log.

The log is the memory; the context window is a view of it. `ContextPolicy` decides the view. The default,
`ClearThenSummarize`, first replaces old tool results by a marker naming their `seq` (Claude can read any of
them back with the `read_session_events` tool), then, if that is not enough, replaces the oldest turns by a
summary. Both steps are recorded as `context.compacted` events, so every later request is built the same way
from the log, and the prompt prefix stays byte-identical (cacheable) until the next compaction.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from google.protobuf import json_format

from managed_agents.v1 import content_pb2, events_pb2

CLEAR = "clear_tool_results"
SUMMARIZE = "summarize"
CHARS_PER_TOKEN = 4
# The newest tool results are never cleared: they are what the model is working on.
KEEP_RECENT_RESULTS = 3


def cleared_marker(seq: int) -> str:
    """What a cleared tool result shows the model."""
    return (
        f"[This tool result was cleared from the context to save space. It is event {seq} of the session "
        "log: "
        f"read it back with read_session_events if you need it.]"
    )


def _content_blocks(blocks: Sequence[content_pb2.ContentBlock]) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = []
    for block in blocks:
        kind = block.WhichOneof("block")
        if kind == "text":
            result.append({"type": "text", "text": block.text.text})
        elif kind == "image":
            image = block.image
            if image.WhichOneof("source") == "url":
                result.append({"type": "image", "source": {"type": "url", "url": image.url}})
            else:
                data = base64.b64encode(image.data).decode()
                result.append(
                    {
                        "type": "image",
                        "source": {"type": "base64", "media_type": image.media_type, "data": data},
                    }
                )
    return result


def tool_input(struct: Any) -> dict[str, Any]:
    """A tool input `Struct` as a plain dict."""
    return json_format.MessageToDict(struct)


@dataclass(slots=True)
class _Unit:
    """A piece of the conversation: one user message, one assistant message, or one tool result."""

    seq: int
    role: str
    blocks: list[dict[str, Any]]
    chars: int
    # True where the conversation may start after a summary (a user message, or an assistant message).
    starts_turn: bool
    tool_result_seq: int = 0


def _chars(blocks: list[dict[str, Any]]) -> int:
    total = 0
    for block in blocks:
        kind = block["type"]
        if kind == "text":
            total += len(block["text"])
        elif kind == "tool_use":
            total += len(block["name"]) + len(json.dumps(block["input"]))
        elif kind == "tool_result":
            total += _chars(block["content"])
        elif kind == "thinking":
            total += len(block["thinking"])
        else:
            total += 1000  # images and redacted thinking: a rough, conservative guess
    return total + 16


def _units(events: Sequence[events_pb2.Event], summarized_through: int) -> list[_Unit]:
    units: list[_Unit] = []
    assistant: _Unit | None = None
    current_message = ""
    for event in events:
        if event.seq <= summarized_through:
            continue
        kind = event.WhichOneof("payload")
        block: dict[str, Any] | None = None
        message_id = ""
        if kind == "agent_message":
            message_id = event.agent_message.message_id
            blocks = _content_blocks(event.agent_message.content)
        elif kind == "agent_thinking":
            message_id = event.agent_thinking.message_id
            thinking = event.agent_thinking
            if thinking.redacted_data:
                block = {"type": "redacted_thinking", "data": thinking.redacted_data}
            else:
                block = {"type": "thinking", "thinking": thinking.thinking, "signature": thinking.signature}
            blocks = [block]
        elif kind == "agent_tool_use":
            use = event.agent_tool_use
            message_id = use.message_id
            blocks = [{"type": "tool_use", "id": use.id, "name": use.name, "input": tool_input(use.input)}]
        elif kind == "agent_mcp_tool_use":
            mcp = event.agent_mcp_tool_use
            message_id = mcp.message_id
            blocks = [
                {
                    "type": "tool_use",
                    "id": mcp.id,
                    "name": f"{mcp.server_name}__{mcp.name}",
                    "input": tool_input(mcp.input),
                }
            ]
        else:
            assistant, current_message = None, ""
            if kind == "user_message":
                blocks = _content_blocks(event.user_message.content)
                units.append(_Unit(event.seq, "user", blocks, _chars(blocks), starts_turn=True))
            elif kind in ("agent_tool_result", "agent_mcp_tool_result"):
                result = getattr(event, kind)
                tool_use_id = result.tool_use_id if kind == "agent_tool_result" else result.mcp_tool_use_id
                block = {
                    "type": "tool_result",
                    "tool_use_id": tool_use_id,
                    "content": _content_blocks(result.content),
                    "is_error": result.is_error,
                }
                units.append(
                    _Unit(
                        event.seq,
                        "user",
                        [block],
                        _chars([block]),
                        starts_turn=False,
                        tool_result_seq=event.seq,
                    )
                )
            continue
        if assistant is None or message_id != current_message:
            assistant = _Unit(event.seq, "assistant", [], 0, starts_turn=True)
            units.append(assistant)
            current_message = message_id
        assistant.blocks.extend(blocks)
        assistant.chars += _chars(blocks)
    return [u for u in units if u.blocks]


def _clear(unit: _Unit) -> None:
    block = unit.blocks[0]
    block["content"] = [{"type": "text", "text": cleared_marker(unit.tool_result_seq)}]
    unit.chars = _chars(unit.blocks)


def _messages(units: Sequence[_Unit], summary: str) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    if summary:
        messages.append({"role": "user", "content": [{"type": "text", "text": summary}]})
    for unit in units:
        if messages and messages[-1]["role"] == unit.role:
            # The API merges consecutive same-role turns anyway; sending them merged keeps requests canonical.
            messages[-1]["content"].extend(unit.blocks)
        else:
            messages.append({"role": unit.role, "content": list(unit.blocks)})
    return messages


@dataclass(frozen=True, slots=True)
class Compaction:
    """A compaction to record as `context.compacted` before the model call it was made for."""

    strategy: str
    through_seq: int
    summary: str
    tokens_before: int
    tokens_after: int


@dataclass(frozen=True, slots=True)
class Context:
    """The messages to send, their estimated size, and compactions decided while building them."""

    messages: list[dict[str, Any]]
    estimated_tokens: int
    compactions: tuple[Compaction, ...] = ()


class ContextPolicy(Protocol):
    """Builds the messages of the next model call from the log, within a token budget."""

    def build(self, events: Sequence[events_pb2.Event], *, budget_tokens: int, overhead_tokens: int) -> Context:
        """`overhead_tokens` is what the system prompt and tools take from the budget."""
        ...


def _summary(events: Sequence[events_pb2.Event], through_seq: int, previous: str) -> str:
    """A deterministic digest of the events up to `through_seq` (no model call is spent on it)."""
    asked: list[str] = []
    said = ""
    tools: dict[str, list[int]] = {}
    for event in events:
        if event.seq > through_seq:
            break
        kind = event.WhichOneof("payload")
        if kind == "user_message":
            text = " ".join(b.text.text for b in event.user_message.content if b.WhichOneof("block") == "text")
            asked.append(text[:300])
        elif kind == "agent_message":
            said = " ".join(b.text.text for b in event.agent_message.content if b.WhichOneof("block") == "text")
        elif kind == "agent_tool_use":
            tools.setdefault(event.agent_tool_use.name, [0, 0])[0] += 1
        elif kind == "agent_tool_result" and event.agent_tool_result.is_error:
            tools.setdefault("(errors)", [0, 0])[1] += 1
    lines = [
        f"[Events 1 to {through_seq} of this session were left out of the context to save space; "
        "read any of them with read_session_events.]"
    ]
    if previous:
        lines.append(previous)
    if asked:
        lines.append("The user asked: " + " | ".join(f'"{a}"' for a in asked[-5:]))
    calls = ", ".join(f"{name} x{n}" for name, (n, _) in tools.items() if name != "(errors)")
    if calls:
        errors = tools.get("(errors)", [0, 0])[1]
        lines.append(f"Tool calls made: {calls} ({errors} failed).")
    if said:
        lines.append(f'Your last message in that part: "{said[:500]}"')
    return "\n".join(lines)


class ClearThenSummarize:
    """Default policy: clear old tool results, then summarize the oldest turns, each down to `low_water`."""

    def __init__(self, *, low_water: float = 0.5) -> None:
        # Compacting well below the budget leaves room to grow, so compactions (and cache misses) are rare.
        self._low_water = low_water

    def build(self, events: Sequence[events_pb2.Event], *, budget_tokens: int, overhead_tokens: int) -> Context:
        summarized_through, cleared_through, summary = 0, 0, ""
        for event in events:
            if event.WhichOneof("payload") == "context_compacted":
                compacted = event.context_compacted
                if compacted.strategy == SUMMARIZE and compacted.through_seq >= summarized_through:
                    summarized_through, summary = compacted.through_seq, compacted.summary
                elif compacted.strategy == CLEAR:
                    cleared_through = max(cleared_through, compacted.through_seq)
        units = _units(events, summarized_through)
        results = [u for u in units if u.tool_result_seq]
        for unit in results:
            if unit.tool_result_seq <= cleared_through:
                _clear(unit)

        def tokens() -> int:
            return overhead_tokens + (len(summary) + sum(u.chars for u in units)) // CHARS_PER_TOKEN

        before = tokens()
        if before <= budget_tokens:
            return Context(_messages(units, summary), before)
        target = int(budget_tokens * self._low_water)
        compactions = []
        clearable = [u for u in results[:-KEEP_RECENT_RESULTS] if u.tool_result_seq > cleared_through]
        for unit in clearable:
            if tokens() <= target:
                break
            _clear(unit)
            cleared_through = unit.tool_result_seq
        after_clear = tokens()
        if clearable and cleared_through:
            compactions.append(Compaction(CLEAR, cleared_through, "", before, after_clear))
        if after_clear <= budget_tokens:
            return Context(_messages(units, summary), after_clear, tuple(compactions))
        # Still too big: summarize from the start to the earliest turn boundary that brings it under target.
        remaining = overhead_tokens + sum(u.chars for u in units) // CHARS_PER_TOKEN
        cut = len(units) - 1
        for index, unit in enumerate(units):
            if index and unit.starts_turn and remaining <= target:
                cut = index
                break
            remaining -= unit.chars // CHARS_PER_TOKEN
        while cut > 0 and not units[cut].starts_turn:
            cut -= 1
        if cut == 0:
            return Context(_messages(units, summary), after_clear, tuple(compactions))
        through = units[cut].seq - 1
        summary = _summary(events, through, summary)
        units = units[cut:]
        after = tokens()
        compactions.append(Compaction(SUMMARIZE, through, summary, before, after))
        return Context(_messages(units, summary), after, tuple(compactions))
