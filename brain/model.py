"""The model boundary: the `ModelClient` interface the harness calls, and `AnthropicModel`, which calls Claude
(or anything that speaks the Messages API at `ANTHROPIC_BASE_URL`) through the official `anthropic` SDK.

Requests and responses are Messages API shapes as plain dicts, so nothing here hides what is sent. Failures
are `ModelError`s that say whether retrying can help; the harness owns the retry loop, so that every failed
attempt is written to the session log where an operator can see it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import anthropic


@dataclass(frozen=True, slots=True)
class ModelRequest:
    """One Messages API call."""

    model: str
    max_tokens: int
    messages: Sequence[Mapping[str, Any]]
    system: Sequence[Mapping[str, Any]] = ()
    tools: Sequence[Mapping[str, Any]] = ()
    # Messages API `metadata.user_id`, an opaque id for abuse detection: the brain sends the session id.
    user_id: str = ""


@dataclass(frozen=True, slots=True)
class Usage:
    """Token usage of one call."""

    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0


@dataclass(frozen=True, slots=True)
class ModelResponse:
    """A complete assistant message: `content` holds Messages API blocks (text, thinking, tool_use)."""

    id: str
    content: tuple[Mapping[str, Any], ...]
    stop_reason: str
    usage: Usage = field(default_factory=Usage)


class ModelError(Exception):
    """A failed model call: `kind` names it for the log, `retryable` says whether trying again can help."""

    def __init__(self, message: str, *, kind: str, retryable: bool, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.retryable = retryable
        self.retry_after = retry_after


class ModelClient(Protocol):
    """Something that answers Messages API requests."""

    async def complete(self, request: ModelRequest) -> ModelResponse:
        """Calls the model once (no retries). Raises `ModelError`."""
        ...

    async def aclose(self) -> None:
        """Releases connections."""
        ...


_KNOWN_BLOCKS = frozenset({"text", "thinking", "redacted_thinking", "tool_use"})


def _retry_after(error: anthropic.APIStatusError) -> float | None:
    value = error.response.headers.get("retry-after")
    with contextlib.suppress(TypeError, ValueError):
        return max(0.0, float(value)) if value is not None else None
    return None


def _classify(error: Exception) -> ModelError:
    if isinstance(error, anthropic.RateLimitError):
        return ModelError(
            f"rate limited by the model endpoint: {error.message}",
            kind="model_rate_limited",
            retryable=True,
            retry_after=_retry_after(error),
        )
    if isinstance(error, anthropic.APIStatusError) and error.status_code == 529:
        return ModelError(
            f"the model is overloaded: {error.message}",
            kind="model_overloaded",
            retryable=True,
            retry_after=_retry_after(error),
        )
    if isinstance(error, anthropic.APIStatusError) and error.status_code >= 500:
        return ModelError(
            f"the model endpoint failed ({error.status_code}): {error.message}",
            kind="model_unavailable",
            retryable=True,
            retry_after=_retry_after(error),
        )
    if isinstance(error, anthropic.APIConnectionError):
        return ModelError(f"cannot reach the model endpoint: {error}", kind="model_unreachable", retryable=True)
    if isinstance(error, anthropic.AuthenticationError | anthropic.PermissionDeniedError):
        return ModelError(
            f"the model endpoint refused our credentials ({error.status_code}): {error.message}",
            kind="model_auth",
            retryable=False,
        )
    if isinstance(error, anthropic.APIStatusError):
        return ModelError(
            f"the model endpoint rejected the request ({error.status_code}): {error.message}",
            kind="model_request_rejected",
            retryable=False,
        )
    return ModelError(
        f"the model endpoint sent a response that cannot be read ({type(error).__name__}: {error})",
        kind="model_bad_response",
        retryable=False,
    )


def _block(block: Any) -> dict[str, Any]:
    data: dict[str, Any] = block.model_dump(mode="json", exclude_none=True)
    if data.get("type") not in _KNOWN_BLOCKS:
        raise ValueError(f"unexpected content block type {data.get('type')!r}")
    if data["type"] == "tool_use" and not (
        isinstance(data.get("id"), str) and isinstance(data.get("name"), str) and isinstance(data.get("input"), dict)
    ):
        raise ValueError("a tool_use block lacks its id, name or input object")
    # Drop SDK-side extras (e.g. `citations: None` or caller fields) the API does not accept back.
    keep = {
        "text": ("type", "text"),
        "thinking": ("type", "thinking", "signature"),
        "redacted_thinking": ("type", "data"),
        "tool_use": ("type", "id", "name", "input"),
    }[data["type"]]
    return {k: data[k] for k in keep if k in data}


class AnthropicModel:
    """`ModelClient` on the `anthropic` SDK, streaming each call (long answers would hit HTTP timeouts)."""

    def __init__(self, *, api_key: str, base_url: str | None = None, timeout: float = 600.0) -> None:
        # Retries are the harness's, so that each attempt is logged; the SDK must not retry on its own.
        self._client = anthropic.AsyncAnthropic(api_key=api_key, base_url=base_url, max_retries=0, timeout=timeout)

    async def complete(self, request: ModelRequest) -> ModelResponse:
        params: dict[str, Any] = {
            "model": request.model,
            "max_tokens": request.max_tokens,
            "messages": list(request.messages),
        }
        if request.system:
            params["system"] = list(request.system)
        if request.tools:
            params["tools"] = list(request.tools)
        if request.user_id:
            params["metadata"] = {"user_id": request.user_id}
        try:
            async with self._client.messages.stream(**params) as stream:
                message = await stream.get_final_message()
            content = tuple(_block(b) for b in message.content)
            if not message.id or message.stop_reason is None:
                raise ValueError("the message has no id or no stop_reason")
        except Exception as error:
            # Besides API errors, the SDK fails in many ways on a garbled answer (it asserts on an empty
            # stream, for one); all of them mean the same thing: there is no usable message.
            raise _classify(error) from error
        usage = message.usage
        return ModelResponse(
            id=message.id,
            content=content,
            stop_reason=str(message.stop_reason),
            usage=Usage(
                input_tokens=usage.input_tokens or 0,
                output_tokens=usage.output_tokens or 0,
                cache_creation_input_tokens=usage.cache_creation_input_tokens or 0,
                cache_read_input_tokens=usage.cache_read_input_tokens or 0,
            ),
        )

    async def aclose(self) -> None:
        await self._client.close()
