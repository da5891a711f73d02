"""Checks of what clients send to the session store: ids, sizes, enum values and each event type's required
fields. Every failure is an `InvalidArgument` naming the field and saying what is wrong."""

from __future__ import annotations

from collections.abc import Iterator

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from managed_agents.events import payload_field
from managed_agents.mesh.errors import InvalidArgument
from managed_agents.mesh.ids import is_key, is_resource_id
from managed_agents.v1 import content_pb2, events_pb2, session_pb2

MAX_EVENT_BYTES = 4 * 1024 * 1024
MAX_BATCH_EVENTS = 1000
MAX_BATCH_BYTES = 16 * 1024 * 1024
MAX_PRODUCER_CHARS = 128
IMAGE_TYPES = frozenset({"image/png", "image/jpeg", "image/gif", "image/webp"})

# Fields each payload must set (beyond the payload itself), per the contract's `Required.` comments.
_REQUIRED: dict[str, tuple[str, ...]] = {
    "user_tool_confirmation": ("tool_use_id", "result"),
    "user_custom_tool_result": ("custom_tool_use_id",),
    "agent_message": ("message_id",),
    "agent_thinking": ("message_id",),
    "agent_tool_use": ("message_id", "id", "name"),
    "agent_tool_result": ("tool_use_id",),
    "agent_mcp_tool_use": ("message_id", "id", "server_name", "name"),
    "agent_mcp_tool_result": ("mcp_tool_use_id",),
    "session_status_idle": ("stop_reason",),
    "session_error": ("message",),
    "span_model_request_start": ("model",),
    "sandbox_provisioned": ("sandbox_id",),
    "sandbox_lost": ("sandbox_id",),
    "context_compacted": ("through_seq",),
}
# Payloads whose `content` must hold at least one block.
_NEEDS_CONTENT = frozenset({"user_message", "agent_message"})


def session_id(value: str, field: str = "session_id") -> str:
    """A session id as given, or `InvalidArgument`."""
    if not value:
        raise InvalidArgument.field(field, "is required")
    if not is_resource_id(value):
        raise InvalidArgument.field(field, f"{value[:80]!r} is not 1 to 64 characters of [A-Za-z0-9_-]")
    return value


def idempotency_key(value: str) -> str:
    """An idempotency key (empty allowed), or `InvalidArgument`."""
    if value and not is_key(value):
        raise InvalidArgument.field("idempotency_key", "must be 1 to 128 characters of [A-Za-z0-9._:-]")
    return value


def non_negative(value: int, field: str) -> int:
    """`value` if it is at least 0."""
    if value < 0:
        raise InvalidArgument.field(field, f"must not be negative (got {value})")
    return value


def _unknown_enums(message: Message, path: str) -> Iterator[str]:
    for field, value in message.ListFields():
        here = f"{path}.{field.name}"
        if field.type == FieldDescriptor.TYPE_ENUM:
            numbers = value if field.is_repeated else [value]
            for number in numbers:
                if field.enum_type is not None and field.enum_type.values_by_number.get(number) is None:
                    yield f"{here}={number}"
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            if field.message_type is None or field.message_type.GetOptions().map_entry:
                continue
            children = value if field.is_repeated else [value]
            for child in children:
                yield from _unknown_enums(child, here)


def enums_known(message: Message, path: str) -> None:
    """Refuses enum values this server does not know (proto3 keeps unknown numbers as plain ints)."""
    for bad in _unknown_enums(message, path):
        field, _, number = bad.rpartition("=")
        raise InvalidArgument.field(field, f"{number} is not a known value of this enum")


def _content(blocks: list[content_pb2.ContentBlock], path: str) -> None:
    for index, block in enumerate(blocks):
        here = f"{path}[{index}]"
        kind = block.WhichOneof("block")
        if kind is None:
            raise InvalidArgument.field(here, "content block has neither text nor image set")
        if kind == "text" and not block.text.text:
            raise InvalidArgument.field(f"{here}.text.text", "text blocks must not be empty")
        if kind == "image":
            if block.image.media_type not in IMAGE_TYPES:
                raise InvalidArgument.field(
                    f"{here}.image.media_type", f"must be one of {', '.join(sorted(IMAGE_TYPES))}"
                )
            if block.image.WhichOneof("source") is None:
                raise InvalidArgument.field(f"{here}.image", "needs data or url")


def event(value: events_pb2.Event, path: str = "event") -> str:
    """Checks one event; returns the name of its payload field."""
    field = payload_field(value)
    if field is None:
        raise InvalidArgument.field(
            f"{path}.payload",
            "is not set, or is a type this server does not know; set one of user_message, agent_message, ...",
        )
    size = value.ByteSize()
    if size > MAX_EVENT_BYTES:
        raise InvalidArgument.field(path, f"is {size} bytes serialized; the limit is {MAX_EVENT_BYTES} (4 MiB)")
    if len(value.producer) > MAX_PRODUCER_CHARS:
        raise InvalidArgument.field(f"{path}.producer", f"is longer than {MAX_PRODUCER_CHARS} characters")
    payload = getattr(value, field)
    for required in _REQUIRED.get(field, ()):
        if not getattr(payload, required):
            raise InvalidArgument.field(f"{path}.{field}.{required}", "is required")
    if field in _NEEDS_CONTENT and not payload.content:
        raise InvalidArgument.field(f"{path}.{field}.content", "needs at least one content block")
    if hasattr(payload, "content"):
        _content(list(payload.content), f"{path}.{field}.content")
    enums_known(value, path)
    return field


def session_spec(value: session_pb2.Session) -> session_pb2.Session:
    """The writable part of a session (title, metadata, agent), checked against the documented limits."""
    if len(value.title) > 256:
        raise InvalidArgument.field("session.title", "is longer than 256 characters")
    if len(value.metadata) > 16:
        raise InvalidArgument.field("session.metadata", "has more than 16 entries")
    for key, item in value.metadata.items():
        if not key or len(key) > 64 or len(item) > 512:
            raise InvalidArgument.field(
                f"session.metadata[{key[:64]!r}]",
                "keys need 1 to 64 characters and values at most 512",
            )
    agent = value.agent
    limits = (
        ("model", len(agent.model), 128),
        ("system", len(agent.system), 100_000),
        ("max_tokens", agent.max_tokens, 128_000),
        ("tools", len(agent.tools), 128),
        ("mcp_servers", len(agent.mcp_servers), 20),
        ("max_steps", agent.max_steps, 1000),
        ("resources.repositories", len(agent.resources.repositories), 16),
        ("resources.secrets", len(agent.resources.secrets), 16),
    )
    for name, size, limit in limits:
        if size < 0 or size > limit:
            raise InvalidArgument.field(f"session.agent.{name}", f"must be between 0 and {limit} (got {size})")
    # The brain asks the proxy for one session token granting all of these, and a token grants at most 20.
    grants = set(agent.mcp_servers) | {r.credential for r in agent.resources.repositories if r.credential}
    grants |= {s.credential for s in agent.resources.secrets}
    if len(grants) > 20:
        raise InvalidArgument.field(
            "session.agent", f"grants {len(grants)} credentials (MCP servers, repositories, secrets); at most 20"
        )
    enums_known(value, "session")
    spec = session_pb2.Session(title=value.title, metadata=value.metadata)
    if value.HasField("agent"):
        spec.agent.CopyFrom(value.agent)
    return spec
