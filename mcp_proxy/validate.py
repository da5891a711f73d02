"""Checks of what clients send to the vault and the proxy: names, URLs, sizes, enums and durations. Every
failure is an `InvalidArgument` naming the field and saying what is wrong, and never quoting a secret."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

from google.protobuf import duration_pb2, json_format, struct_pb2

from managed_agents.mesh.errors import InvalidArgument
from managed_agents.mesh.ids import is_resource_id
from managed_agents.v1 import mcp_proxy_pb2
from mcp_proxy.proxy import SEPARATOR
from mcp_proxy.vault import CredentialKind, CredentialSpec, Secret

MAX_SECRET_BYTES = 16 * 1024
MAX_URL_CHARS = 2048
MAX_CLIENT_ID_CHARS = 256
MAX_ALLOWED_HOSTS = 32
MAX_GRANTS = 20
MAX_TOOL_CHARS = 128
MAX_ARGUMENT_BYTES = 1024 * 1024
MAX_TOKEN_TTL_US = 10 * 365 * 86_400_000_000
DEFAULT_SESSION_TTL_US, MIN_SESSION_TTL_US, MAX_SESSION_TTL_US = 3_600_000_000, 60_000_000, 7 * 86_400_000_000
DEFAULT_CALL_TIMEOUT, MAX_CALL_TIMEOUT = 60.0, 600.0
DEFAULT_PAGE, MAX_PAGE = 100, 1000

_NAME = re.compile(r"[a-z0-9_-]{1,64}")
_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_KINDS = MappingProxyType(
    {
        mcp_proxy_pb2.CREDENTIAL_KIND_MCP_OAUTH: CredentialKind.MCP_OAUTH,
        mcp_proxy_pb2.CREDENTIAL_KIND_GIT_TOKEN: CredentialKind.GIT_TOKEN,
        mcp_proxy_pb2.CREDENTIAL_KIND_API_KEY: CredentialKind.API_KEY,
    }
)


def credential_name(value: str, field: str = "name") -> str:
    """A credential name as given, or `InvalidArgument`."""
    if not value:
        raise InvalidArgument.field(field, "is required")
    if not _NAME.fullmatch(value):
        raise InvalidArgument.field(field, f"{value[:80]!r} is not 1 to 64 characters of [a-z0-9_-]")
    return value


def _host(value: str) -> bool:
    host, sep, port = value.partition(":")
    if sep and not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
        return False
    return 0 < len(host) <= 253 and all(_LABEL.fullmatch(label) for label in host.split("."))


def _printable(value: str) -> bool:
    return value.isprintable()


def _url(value: str, field: str) -> str:
    if len(value) > MAX_URL_CHARS:
        raise InvalidArgument.field(field, f"is longer than {MAX_URL_CHARS} characters")
    if not value.isascii() or not _printable(value) or " " in value:
        raise InvalidArgument.field(field, "must be an ASCII URL without spaces or control characters")
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018  # raises ValueError on a malformed port
    except ValueError:
        raise InvalidArgument.field(field, "is not a URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidArgument.field(field, "must be an http:// or https:// URL with a host")
    if parts.username is not None or parts.password is not None:
        # Credentials belong in the secret, where they are sealed, not in metadata that is listed.
        raise InvalidArgument.field(field, "must not hold a user name or password; put secrets in the secret")
    if parts.fragment:
        raise InvalidArgument.field(field, "must not have a #fragment")
    return value


def _secret_field(value: str, field: str, *, header: bool) -> str:
    size = len(value.encode())
    if size > MAX_SECRET_BYTES:
        raise InvalidArgument.field(field, f"is {size} bytes; the limit is {MAX_SECRET_BYTES} (16 KiB)")
    if header and value and not all(0x21 <= ord(c) <= 0x7E for c in value):
        # It goes into an HTTP header: a space, newline or non-ASCII byte would break or inject headers.
        raise InvalidArgument.field(field, "must be visible ASCII characters only (no spaces or line breaks)")
    if not header and value and not _printable(value):
        raise InvalidArgument.field(field, "must not contain control characters")
    return value


def duration_us(value: duration_pb2.Duration, field: str) -> int:
    """A well-formed, non-negative duration in microseconds."""
    if value.seconds < 0 or value.nanos < 0 or value.nanos > 999_999_999:
        raise InvalidArgument.field(field, "must be a non-negative duration")
    if value.seconds > 10**12:
        raise InvalidArgument.field(field, "is far too long")
    return value.seconds * 1_000_000 + value.nanos // 1000


def credential(
    value: mcp_proxy_pb2.Credential, secret: mcp_proxy_pb2.CredentialSecret
) -> tuple[CredentialSpec, Secret, int]:
    """The spec, secret and token lifetime (microseconds; 0 = unknown) of a `PutCredential`."""
    name = credential_name(value.name, "credential.name")
    kind = _KINDS.get(value.kind)
    if kind is None:
        raise InvalidArgument.field(
            "credential.kind",
            "must be CREDENTIAL_KIND_MCP_OAUTH, CREDENTIAL_KIND_GIT_TOKEN or CREDENTIAL_KIND_API_KEY"
            f" (got {int(value.kind)})",
        )
    if len(value.client_id) > MAX_CLIENT_ID_CHARS or not _printable(value.client_id):
        raise InvalidArgument.field(
            "credential.client_id", f"must be at most {MAX_CLIENT_ID_CHARS} printable characters"
        )
    if kind is CredentialKind.MCP_OAUTH:
        if SEPARATOR in name:
            raise InvalidArgument.field(
                "credential.name",
                f"an MCP server's name must not contain {SEPARATOR!r}: tools are named "
                f"<server>{SEPARATOR}<tool>, and the first {SEPARATOR!r} must end the server's name",
            )
        if not value.mcp_server_url:
            raise InvalidArgument.field("credential.mcp_server_url", "is required for an MCP credential")
        _url(value.mcp_server_url, "credential.mcp_server_url")
        if value.token_endpoint:
            _url(value.token_endpoint, "credential.token_endpoint")
        if value.allowed_hosts:
            raise InvalidArgument.field(
                "credential.allowed_hosts",
                "is for git tokens and API keys; an MCP credential goes to its server",
            )
    else:
        for field in ("mcp_server_url", "token_endpoint", "client_id"):
            if getattr(value, field):
                raise InvalidArgument.field(f"credential.{field}", "is only for CREDENTIAL_KIND_MCP_OAUTH")
    if len(value.allowed_hosts) > MAX_ALLOWED_HOSTS:
        raise InvalidArgument.field("credential.allowed_hosts", f"has more than {MAX_ALLOWED_HOSTS} hosts")
    for index, host in enumerate(value.allowed_hosts):
        if not _host(host):
            raise InvalidArgument.field(
                f"credential.allowed_hosts[{index}]",
                f"{host[:80]!r} is not a host name (with an optional :port)",
            )
    token = _secret_field(secret.token, "secret.token", header=True)
    refresh = _secret_field(secret.refresh_token, "secret.refresh_token", header=False)
    client_secret = _secret_field(secret.client_secret, "secret.client_secret", header=False)
    if kind is CredentialKind.MCP_OAUTH:
        if not token and not refresh:
            raise InvalidArgument.field("secret", "needs a token, a refresh_token, or both")
        if refresh and not value.token_endpoint:
            raise InvalidArgument.field(
                "credential.token_endpoint", "is required with a refresh_token: it is where the refresh goes"
            )
    else:
        if not token:
            raise InvalidArgument.field("secret.token", "is required")
        if refresh or client_secret:
            raise InvalidArgument.field("secret", "refresh_token and client_secret are only for MCP credentials")
    ttl = duration_us(secret.token_ttl, "secret.token_ttl")
    if ttl > MAX_TOKEN_TTL_US:
        raise InvalidArgument.field("secret.token_ttl", "must be at most 10 years")
    spec = CredentialSpec(
        name=name,
        kind=kind,
        mcp_server_url=value.mcp_server_url,
        token_endpoint=value.token_endpoint,
        client_id=value.client_id,
        allowed_hosts=tuple(h.lower() for h in value.allowed_hosts),
    )
    return spec, Secret(token=token, refresh_token=refresh, client_secret=client_secret), ttl


def page_size(value: int) -> int:
    """`page_size`: 0 means the default; larger than the maximum means the maximum."""
    if value < 0:
        raise InvalidArgument.field("page_size", f"must not be negative (got {value})")
    return min(value or DEFAULT_PAGE, MAX_PAGE)


def session_id(value: str) -> str:
    """A session id as given, or `InvalidArgument`."""
    if not value:
        raise InvalidArgument.field("session_id", "is required")
    if not is_resource_id(value):
        raise InvalidArgument.field("session_id", f"{value[:80]!r} is not 1 to 64 characters of [A-Za-z0-9_-]")
    return value


def grants(values: Sequence[str]) -> list[str]:
    """1 to 20 distinct credential names."""
    if not 1 <= len(values) <= MAX_GRANTS:
        raise InvalidArgument.field("grants", f"must name 1 to {MAX_GRANTS} credentials (got {len(values)})")
    seen: set[str] = set()
    for index, name in enumerate(values):
        credential_name(name, f"grants[{index}]")
        if name in seen:
            raise InvalidArgument.field(f"grants[{index}]", f"{name!r} is listed twice")
        seen.add(name)
    return list(values)


def session_ttl_us(value: duration_pb2.Duration) -> int:
    """A token lifetime: 0 means 1 h; otherwise from 1 min to 7 days."""
    ttl = duration_us(value, "ttl")
    if ttl == 0:
        return DEFAULT_SESSION_TTL_US
    if not MIN_SESSION_TTL_US <= ttl <= MAX_SESSION_TTL_US:
        raise InvalidArgument.field("ttl", "must be between 1 min and 7 days (or 0 for the default 1 h)")
    return ttl


def tool_name(value: str) -> str:
    """An upstream tool name: 1 to 128 printable characters without spaces."""
    if not value:
        raise InvalidArgument.field("tool", "is required")
    if len(value) > MAX_TOOL_CHARS or not _printable(value) or " " in value:
        raise InvalidArgument.field("tool", f"must be 1 to {MAX_TOOL_CHARS} printable characters without spaces")
    return value


def call_timeout(value: duration_pb2.Duration) -> float:
    """A call's time limit in seconds: 0 means 60 s; at most 10 min."""
    micros = duration_us(value, "timeout")
    if micros == 0:
        return DEFAULT_CALL_TIMEOUT
    if micros > MAX_CALL_TIMEOUT * 1e6:
        raise InvalidArgument.field("timeout", "must be at most 10 min (or 0 for the default 60 s)")
    return micros / 1e6


def _integral(value: Any) -> Any:
    # Struct numbers are doubles; MCP tools mostly declare integers, and JSON does not tell 2 from 2.0.
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidArgument.field("arguments", "numbers must be finite (no NaN or infinity)")
        return int(value) if value.is_integer() and abs(value) < 2**53 else value
    if isinstance(value, dict):
        return {key: _integral(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_integral(item) for item in value]
    return value


def arguments(value: struct_pb2.Struct) -> dict[str, Any]:
    """Tool arguments as JSON values, at most 1 MiB serialized."""
    size = value.ByteSize()
    if size > MAX_ARGUMENT_BYTES:
        raise InvalidArgument.field("arguments", f"is {size} bytes serialized; the limit is 1 MiB")
    try:
        result = _integral(json_format.MessageToDict(value))
    except (json_format.Error, ValueError):
        raise InvalidArgument.field("arguments", "is not a JSON object (numbers must be finite)") from None
    assert isinstance(result, dict)
    return result
