"""The brain's instruments: sessions driven, model calls and tokens, tool calls by route."""

from __future__ import annotations

from collections.abc import Callable

from brain.model import ModelResponse
from managed_agents.mesh.metrics import ServiceMetrics


class BrainMetrics:
    """What a brain process counts (no-op instruments unless metrics are on)."""

    def __init__(self, metrics: ServiceMetrics, running: Callable[[], int]) -> None:
        metrics.gauge("managed_agents.brain.sessions_running", "sessions this brain drives now", running)
        self._tokens = metrics.counter("managed_agents.brain.model_tokens", "model tokens, by kind", unit="{token}")
        self._model_calls = metrics.counter("managed_agents.brain.model_calls", "model calls, by outcome")
        self._tool_calls = metrics.counter("managed_agents.brain.tool_calls", "tool calls, by tool, route and error")
        self._tool_time = metrics.latency("managed_agents.brain.tool_call_duration", "time of one tool call, by route")

    def model_answered(self, response: ModelResponse) -> None:
        """A model call succeeded."""
        usage = response.usage
        self._model_calls.add(1, {"outcome": "ok"})
        for kind, count in (
            ("input", usage.input_tokens),
            ("output", usage.output_tokens),
            ("cache_read", usage.cache_read_input_tokens),
            ("cache_write", usage.cache_creation_input_tokens),
        ):
            if count:
                self._tokens.add(count, {"kind": kind})

    def model_failed(self, kind: str) -> None:
        """A model call attempt failed (`kind` as in `session.error`)."""
        self._model_calls.add(1, {"outcome": kind})

    def tool_called(self, tool: str, route: str, *, is_error: bool, seconds: float) -> None:
        """A tool call got its result."""
        self._tool_calls.add(1, {"tool": tool, "route": route, "error": is_error})
        self._tool_time.record(seconds, {"route": route})
