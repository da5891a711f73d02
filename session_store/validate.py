"""Checks of what clients send to the session store: ids, sizes, enum values and each event type's required
fields, and a bound on every field of a session's spec (count, characters, bytes, shape), including the
sandbox resources hands would refuse later. Every failure is an `InvalidArgument` naming the field and saying
what the bound is, raised before anything is written.

The bounds follow hosted Managed Agents where it has them (system prompt 100,000 characters, 128 tools,
20 MCP servers, 16 metadata pairs of 64 and 512 characters) and hands' `Provision` checks for resources. Other
requests' fields are bounded where they are read: ids and keys by their patterns, holders at 128 characters,
page tokens at 1024 characters (`managed_agents.mesh.paging`), events at 4 MiB and batches at 16 MiB."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from pathlib import PurePosixPath
from urllib.parse import urlsplit

from google.protobuf import duration_pb2
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from managed_agents.events import payload_field
from managed_agents.mesh.errors import InvalidArgument
from managed_agents.mesh.ids import is_key, is_resource_id
from managed_agents.v1 import content_pb2, events_pb2, sandbox_pb2, session_pb2

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


# Limits of a session's spec (`CreateSession`), as documented in session.proto. Characters are Unicode code
# points; the byte figure is the most they can take in UTF-8. The whole spec is bounded too, so that a page of
# sessions always fits in a response.
MAX_SPEC_BYTES = 1024 * 1024
MAX_TITLE_CHARS = 256
MAX_METADATA_ENTRIES, MAX_METADATA_KEY_CHARS, MAX_METADATA_VALUE_CHARS = 16, 64, 512
MAX_MODEL_CHARS = 128
MAX_SYSTEM_CHARS = 100_000
MAX_TOKENS = 128_000
MAX_TOOLS = 128
MAX_MCP_SERVERS = 20
MAX_STEPS = 1000
MAX_GRANTS = 20
# Resources, as hands checks them at `Provision` (hands/server.py `limits_from`, hands/git_relay.py,
# hands/egress_relay.py, hands/config.py), so that a session hands would refuse is refused when created.
MEMORY_BYTES = (16 << 20, 1 << 40)
MAX_PROCESSES = (1, 65536)
CPU_MILLIS = (10, 64000)
DISK_BYTES = (64 << 20, 1 << 40)
COMMAND_TIMEOUT_S = (0.1, 3600.0)
IDLE_TTL_S = (1.0, 7 * 86400.0)
MAX_IMAGE_CHARS = 512
MAX_LABELS = 16
MAX_REPOSITORIES, MAX_URL_CHARS, MAX_REPOSITORY_PATH_CHARS = 16, 2048, 255
MAX_SECRETS = 16

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_CONTROL_BUT_SPACING = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_CREDENTIAL = re.compile(r"[a-z0-9_-]{1,64}")
_MODEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@/+-]{0,127}")
_IMAGE = re.compile(r"[\x21-\x7e]{1,512}")
_LABEL = re.compile(r"[A-Za-z0-9._-]{1,63}")
_BRANCH = re.compile(r"[A-Za-z0-9._/-]{1,200}")
_ENV = re.compile(r"[A-Z_][A-Z0-9_]{0,63}")
_RESERVED_ENV = frozenset(
    {"PATH", "HOME", "PWD", "SHELL", "USER", "LANG", "TERM", "HOSTNAME", "NO_PROXY", "HTTP_PROXY", "HTTPS_PROXY"}
    | {"SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "NODE_EXTRA_CA_CERTS", "GIT_SSL_CAINFO", "PIP_CERT"}
)


def _shown(value: str) -> str:
    """A caller's string for a message: quoted, escaped, at most 40 characters, with its length if longer."""
    return repr(value[:40]) + (f" ({len(value)} characters)" if len(value) > 40 else "")


def no_controls(value: str, field: str, *, allow_spacing: bool = False) -> str:
    """`value` if it has no C0 or C1 control character (with `allow_spacing`, tab and line breaks pass)."""
    found = (_CONTROL_BUT_SPACING if allow_spacing else _CONTROL).search(value)
    if found:
        raise InvalidArgument.field(
            field, f"must not contain control characters (found U+{ord(found.group()):04X} at {found.start()})"
        )
    return value


def _at_most(value: int, limit: int, field: str, what: str) -> None:
    if value > limit:
        raise InvalidArgument.field(field, f"has {value} {what}; the limit is {limit}")


def _name(value: str, pattern: re.Pattern[str], field: str, rule: str) -> None:
    if not pattern.fullmatch(value):
        raise InvalidArgument.field(field, f"{_shown(value)} is not {rule}")


def _in_range(value: float, bounds: tuple[float, float], field: str, unit: str = "") -> None:
    low, high = bounds
    if not low <= value <= high:
        raise InvalidArgument.field(field, f"must be between {low:g}{unit} and {high:g}{unit} (got {value:g}{unit})")


def _bytes_in_range(value: int, bounds: tuple[int, int], field: str) -> None:
    low, high = bounds

    def shown(size: int) -> str:
        return f"{size >> 40} TiB" if size >= 1 << 40 else f"{size >> 20} MiB"

    if not low <= value <= high:
        raise InvalidArgument.field(
            field, f"must be between {shown(low)} and {shown(high)}, or 0 for the default (got {value} bytes)"
        )


def _seconds(value: duration_pb2.Duration, field: str) -> float:
    if not -999_999_999 <= value.nanos <= 999_999_999 or (value.seconds and value.nanos * value.seconds < 0):
        raise InvalidArgument.field(field, "is not a valid duration (nanos out of range or of the other sign)")
    return value.seconds + value.nanos / 1e9


def _unique(values: Iterable[str], field: str) -> None:
    seen: set[str] = set()
    for index, value in enumerate(values):
        if value in seen:
            raise InvalidArgument.field(f"{field}[{index}]", f"{_shown(value)} is named twice")
        seen.add(value)


def resources(value: sandbox_pb2.Resources, path: str) -> None:
    """The sandbox resources of a session, checked as hands would check them at `Provision`: limits in their
    ranges (zero means hands' default), names of the right shape. What depends on the hands server (its backend,
    its labels) is left to it."""
    if value.memory_bytes:
        _bytes_in_range(value.memory_bytes, MEMORY_BYTES, f"{path}.memory_bytes")
    if value.max_processes:
        _in_range(value.max_processes, MAX_PROCESSES, f"{path}.max_processes")
    if value.cpu_millis:
        _in_range(value.cpu_millis, CPU_MILLIS, f"{path}.cpu_millis")
    if value.disk_bytes:
        _bytes_in_range(value.disk_bytes, DISK_BYTES, f"{path}.disk_bytes")
    if value.HasField("command_timeout"):
        field = f"{path}.command_timeout"
        _in_range(_seconds(value.command_timeout, field), COMMAND_TIMEOUT_S, field, " s")
    if value.HasField("idle_ttl"):
        field = f"{path}.idle_ttl"
        _in_range(_seconds(value.idle_ttl, field), IDLE_TTL_S, field, " s")
    if value.image:
        _name(
            value.image,
            _IMAGE,
            f"{path}.image",
            f"an image reference of 1 to {MAX_IMAGE_CHARS} visible ASCII characters",
        )
    _at_most(len(value.labels), MAX_LABELS, f"{path}.labels", "labels")
    for key, label in sorted(value.labels.items()):
        _name(key, _LABEL, f"{path}.labels", "a label key of 1 to 63 characters of [A-Za-z0-9._-]")
        _name(label, _LABEL, f"{path}.labels[{key!r}]", "a label value of 1 to 63 characters of [A-Za-z0-9._-]")
    _at_most(len(value.repositories), MAX_REPOSITORIES, f"{path}.repositories", "repositories")
    paths: set[str] = set()
    for index, repository in enumerate(value.repositories):
        here = f"{path}.repositories[{index}]"
        try:
            parts = urlsplit(repository.url)
            host = parts.hostname
        except ValueError:
            parts, host = None, None
        if (
            parts is None
            or parts.scheme not in ("https", "http")
            or not host
            or parts.username is not None
            or parts.password is not None
            or len(repository.url) > MAX_URL_CHARS
            or _CONTROL.search(repository.url)
        ):
            raise InvalidArgument.field(
                f"{here}.url", f"must be an https:// URL of at most {MAX_URL_CHARS} characters, without a user"
            )
        _name(
            repository.credential,
            _CREDENTIAL,
            f"{here}.credential",
            "a vault credential name, 1 to 64 characters of [a-z0-9_-]",
        )
        if repository.branch and (not _BRANCH.fullmatch(repository.branch) or ".." in repository.branch):
            raise InvalidArgument.field(
                f"{here}.branch", "must be a branch or tag name: 1 to 200 characters of [A-Za-z0-9._/-], without '..'"
            )
        name = PurePosixPath(parts.path).name.removesuffix(".git")
        where = PurePosixPath(repository.path or name)
        text = str(where)
        if (
            not name
            or where.is_absolute()
            or ".." in where.parts
            or text in ("", ".")
            or len(text) > MAX_REPOSITORY_PATH_CHARS
            or _CONTROL.search(text)
        ):
            raise InvalidArgument.field(
                f"{here}.path",
                f"must be a relative directory inside the workspace, at most {MAX_REPOSITORY_PATH_CHARS} characters, "
                "without '..' (and the URL must end in a repository name)",
            )
        if text in paths:
            raise InvalidArgument.field(f"{here}.path", f"{text!r} is used by two repositories")
        paths.add(text)
    _at_most(len(value.secrets), MAX_SECRETS, f"{path}.secrets", "secrets")
    for index, secret in enumerate(value.secrets):
        here = f"{path}.secrets[{index}]"
        _name(secret.env, _ENV, f"{here}.env", "1 to 64 characters of [A-Z0-9_], not starting with a digit")
        if secret.env in _RESERVED_ENV:
            raise InvalidArgument.field(f"{here}.env", f"{secret.env} is set by the sandbox itself")
        _name(
            secret.credential,
            _CREDENTIAL,
            f"{here}.credential",
            "a vault credential name, 1 to 64 characters of [a-z0-9_-]",
        )
    _unique((s.env for s in value.secrets), f"{path}.secrets.env")


def session_spec(value: session_pb2.Session) -> session_pb2.Session:
    """The writable part of a session (title, metadata, agent), checked against the documented limits; output-only
    fields and fields this server does not know are dropped, so that everything stored has been checked."""
    size = value.ByteSize()
    if size > MAX_SPEC_BYTES:
        raise InvalidArgument.field("session", f"is {size} bytes serialized; the limit is {MAX_SPEC_BYTES} (1 MiB)")
    _at_most(len(value.title), MAX_TITLE_CHARS, "session.title", "characters")
    no_controls(value.title, "session.title")
    _at_most(len(value.metadata), MAX_METADATA_ENTRIES, "session.metadata", "entries")
    for key, item in sorted(value.metadata.items()):
        if not key or len(key) > MAX_METADATA_KEY_CHARS:
            raise InvalidArgument.field(
                "session.metadata", f"key {_shown(key)} must have 1 to {MAX_METADATA_KEY_CHARS} characters"
            )
        no_controls(key, "session.metadata")
        here = f"session.metadata[{key!r}]"
        _at_most(len(item), MAX_METADATA_VALUE_CHARS, here, "characters")
        no_controls(item, here, allow_spacing=True)
    agent = value.agent
    if agent.model:
        _name(
            agent.model,
            _MODEL,
            "session.agent.model",
            f"a model name of 1 to {MAX_MODEL_CHARS} characters of [A-Za-z0-9._:@/+-]",
        )
    _at_most(len(agent.system), MAX_SYSTEM_CHARS, "session.agent.system", "characters")
    for name, number, limit in (
        ("max_tokens", agent.max_tokens, MAX_TOKENS),
        ("max_steps", agent.max_steps, MAX_STEPS),
    ):
        if not 0 <= number <= limit:
            raise InvalidArgument.field(f"session.agent.{name}", f"must be between 0 and {limit} (got {number})")
    _at_most(len(agent.tools), MAX_TOOLS, "session.agent.tools", "tools")
    for index, tool in enumerate(agent.tools):
        _name(tool, _TOOL_NAME, f"session.agent.tools[{index}]", "a tool name of 1 to 64 characters of [A-Za-z0-9_-]")
    _unique(agent.tools, "session.agent.tools")
    _at_most(len(agent.mcp_servers), MAX_MCP_SERVERS, "session.agent.mcp_servers", "MCP servers")
    for index, server in enumerate(agent.mcp_servers):
        _name(
            server,
            _CREDENTIAL,
            f"session.agent.mcp_servers[{index}]",
            "a vault credential name, 1 to 64 characters of [a-z0-9_-]",
        )
    _unique(agent.mcp_servers, "session.agent.mcp_servers")
    resources(agent.resources, "session.agent.resources")
    # The brain asks the proxy for one session token granting all of these, and a token grants at most 20.
    grants = set(agent.mcp_servers) | {r.credential for r in agent.resources.repositories}
    grants |= {s.credential for s in agent.resources.secrets}
    if len(grants) > MAX_GRANTS:
        raise InvalidArgument.field(
            "session.agent",
            f"grants {len(grants)} credentials (MCP servers, repositories, secrets); at most {MAX_GRANTS}",
        )
    enums_known(value, "session")
    spec = session_pb2.Session(title=value.title, metadata=value.metadata)
    if value.HasField("agent"):
        spec.agent.CopyFrom(value.agent)
    spec.DiscardUnknownFields()
    return spec
