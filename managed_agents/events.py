"""The event vocabulary: dotted type names (`user.message`, ...) of the `Event.payload` oneof, and small
builders for the events people and programs write most."""

from __future__ import annotations

from collections.abc import Iterable

from managed_agents.v1 import content_pb2, events_pb2

_PAYLOAD = events_pb2.Event.DESCRIPTOR.oneofs_by_name["payload"]

# Field `user_message` is type `user.message`: the first underscore separates the namespace.
TYPE_BY_FIELD: dict[str, str] = {f.name: f.name.replace("_", ".", 1) for f in _PAYLOAD.fields}
FIELD_BY_TYPE: dict[str, str] = {t: f for f, t in TYPE_BY_FIELD.items()}
EVENT_TYPES: tuple[str, ...] = tuple(TYPE_BY_FIELD.values())

STATUS_BY_TYPE: dict[str, events_pb2.SessionStatus.ValueType] = {
    "session.status_idle": events_pb2.SESSION_STATUS_IDLE,
    "session.status_running": events_pb2.SESSION_STATUS_RUNNING,
    "session.status_rescheduling": events_pb2.SESSION_STATUS_RESCHEDULING,
    "session.status_terminated": events_pb2.SESSION_STATUS_TERMINATED,
}


def payload_field(event: events_pb2.Event) -> str | None:
    """Name of the payload field that is set (`user_message`), or None."""
    return event.WhichOneof("payload")


def event_type(event: events_pb2.Event) -> str:
    """Dotted type of an event (`user.message`), or an empty string if it has no payload."""
    field = event.WhichOneof("payload")
    return TYPE_BY_FIELD[field] if field else ""


def text(value: str) -> content_pb2.ContentBlock:
    """A text content block."""
    return content_pb2.ContentBlock(text=content_pb2.TextBlock(text=value))


def user_message(message: str, *, producer: str = "") -> events_pb2.Event:
    """A `user.message` event holding one text block."""
    return events_pb2.Event(producer=producer, user_message=events_pb2.UserMessage(content=[text(message)]))


def plain_text(blocks: Iterable[content_pb2.ContentBlock]) -> str:
    """The text of content blocks joined by newlines (images shown as a placeholder)."""
    parts = []
    for block in blocks:
        kind = block.WhichOneof("block")
        if kind == "text":
            parts.append(block.text.text)
        elif kind == "image":
            parts.append(f"[image {block.image.media_type}]")
    return "\n".join(parts)
