"""The harness loop: drives sessions from their log, holding nothing that the log does not also hold.

A brain process runs one `SessionRun` per session it drives, under that session's lease. A run reads the
log, repairs what a dead predecessor left half done, then loops: build the context, call the model, append
its answer, run its tool calls, append their results, until the turn ends. Every append carries the lease
epoch (a brain that lost the session cannot write) and an idempotency key (a retried append cannot fork the
log). Nothing else is kept: kill the process at any point and another brain's `wake` continues from the log.

Exactly one result per tool call, and no call run twice: the `agent.tool_use` event is written before the
call runs; hands executes idempotently on the tool_use id; so on wake, every tool_use without a result is
simply executed again, and hands returns the stored outcome, waits for the call still running, runs it if it
never started, or reports that it was cut off (never re-running it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from google.protobuf import duration_pb2, struct_pb2
from google.protobuf.message import DecodeError
from opentelemetry import trace

from brain.context import ContextPolicy, tool_input
from brain.mcp import McpProxy, McpUnavailable, SessionMcp
from brain.metrics import BrainMetrics
from brain.model import ModelClient, ModelError, ModelRequest, ModelResponse
from brain.tools import SESSION_TOOL, Route, ToolSet, render_events, session_read_range
from managed_agents import events as vocab
from managed_agents.mesh.errors import (
    DeadlineExceeded,
    InvalidArgument,
    LeaseFenced,
    LeaseHeld,
    MeshError,
    NotFound,
    SequenceMismatch,
    Unavailable,
)
from managed_agents.mesh.failpoints import Failpoints
from managed_agents.mesh.metrics import ServiceMetrics
from managed_agents.v1 import events_pb2, hands_pb2, sandbox_pb2, session_pb2
from session_store.client import SessionStoreClient

log = logging.getLogger(__name__)

DEFAULT_SYSTEM = (
    "You are an autonomous agent working on the user's task in a Linux sandbox. Your workspace is "
    "/workspace; files you create there persist between tool calls. The sandbox has no network access. "
    "Work step by step, check your results, and finish with a short report of what you did."
)


class Hands(Protocol):
    """What the brain needs from the hands service (`hands.client.HandsClient` provides it)."""

    async def provision(
        self,
        *,
        resources: sandbox_pb2.Resources | None = None,
        session_id: str = "",
        request_id: str = "",
        credential_token: str = "",
    ) -> sandbox_pb2.Sandbox: ...

    async def execute(
        self,
        sandbox_id: str,
        *,
        execution_id: str,
        name: str,
        input: Mapping[str, object] | struct_pb2.Struct,
        timeout: float | None = None,
        credential_token: str = "",
    ) -> hands_pb2.ExecuteResponse: ...

    async def list_tools(self, sandbox_id: str = "") -> list[sandbox_pb2.ToolSpec]: ...


@dataclass(frozen=True, slots=True)
class HarnessConfig:
    """Knobs of the loop; `brain.config` fills them from flags and environment."""

    holder: str
    model: str = "claude-sonnet-5-5"
    max_tokens: int = 8192
    max_steps: int = 50
    context_budget_tokens: int = 150_000
    lease_ttl: float = 10.0
    model_attempts: int = 6
    retry_base_delay: float = 0.5
    retry_max_delay: float = 20.0
    tool_timeout: float = 600.0
    crash_limit: int = 3
    scan_interval: float = 2.0
    scan_concurrency: int = 16


@dataclass(frozen=True, slots=True)
class WakeResult:
    """What `wake` did: one of the `WakeOutcome` values, and who drives the session."""

    outcome: int
    holder: str = ""
    epoch: int = 0


class LeaseLost(Exception):
    """This brain no longer holds the session's lease; it must stop writing at once."""


class _Interrupted(Exception):
    pass


def _duration(seconds: float) -> duration_pb2.Duration:
    value = duration_pb2.Duration()
    value.FromNanoseconds(int(seconds * 1e9))
    return value


def _struct(value: Mapping[str, Any]) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(value)
    return struct


# The store decodes each event inside its request, and protobuf decodes at most 100 nested messages, three of
# them per level of a JSON object: a tool input nested deeper than this cannot be logged (nor, a little deeper,
# even built here).
_DEEPEST_INPUT = "about 30 levels of JSON objects"


def _loggable_input(value: Mapping[str, Any]) -> tuple[struct_pb2.Struct, str]:
    """A tool call's input as the log can hold it; or, if it cannot, an empty input and why."""
    try:
        struct = _struct(value)
        probe = events_pb2.Event(agent_tool_use=events_pb2.AgentToolUse(input=struct))
        session_pb2.BatchEmitEventsRequest.FromString(
            session_pb2.BatchEmitEventsRequest(events=[probe]).SerializeToString()
        )
    except (DecodeError, RecursionError):
        return struct_pb2.Struct(), f"it is nested deeper than the session log can hold ({_DEEPEST_INPUT} at most)"
    except (TypeError, ValueError) as error:  # e.g. a string that is not valid Unicode
        return struct_pb2.Struct(), f"it is not JSON the session log can hold ({type(error).__name__}: {error})"
    return struct, ""


def _tool_result(
    tool_use_id: str, text: str, *, is_error: bool, execution: events_pb2.ToolExecution | None = None
) -> events_pb2.Event:
    result = events_pb2.AgentToolResult(
        tool_use_id=tool_use_id, content=[vocab.text(text or "(no output)")], is_error=is_error
    )
    if execution is not None:
        result.execution.CopyFrom(execution)
    return events_pb2.Event(agent_tool_result=result)


def _mcp_result(use_id: str, text: str) -> events_pb2.Event:
    """A failed `agent.mcp_tool_result`, saying why in a sentence the model reads."""
    return events_pb2.Event(
        agent_mcp_tool_result=events_pb2.AgentMcpToolResult(
            mcp_tool_use_id=use_id, content=[vocab.text(text)], is_error=True
        )
    )


def unanswered_tool_uses(events: Sequence[events_pb2.Event]) -> list[events_pb2.Event]:
    """Tool calls (`agent.tool_use` and `agent.mcp_tool_use` events) without their result, oldest first."""
    answered = {e.agent_tool_result.tool_use_id for e in events if e.HasField("agent_tool_result")}
    answered |= {e.agent_mcp_tool_result.mcp_tool_use_id for e in events if e.HasField("agent_mcp_tool_result")}
    return [
        e
        for e in events
        if (e.HasField("agent_tool_use") and e.agent_tool_use.id not in answered)
        or (e.HasField("agent_mcp_tool_use") and e.agent_mcp_tool_use.id not in answered)
    ]


def needs_model(events: Sequence[events_pb2.Event]) -> bool:
    """True if the conversation's newest entry waits for the model: a user message or a tool result."""
    for event in reversed(events):
        kind = event.WhichOneof("payload")
        if kind in ("user_message", "agent_tool_result", "agent_mcp_tool_result"):
            return True
        if kind in ("agent_message", "agent_thinking", "agent_tool_use", "agent_mcp_tool_use"):
            return False
    return False


def has_new_input(events: Sequence[events_pb2.Event]) -> bool:
    """True if a user message arrived after the last turn ended (the first turn included)."""
    for event in reversed(events):
        if event.HasField("session_status_idle"):
            return False
        if event.HasField("user_message"):
            return True
    return False


def current_sandbox(events: Sequence[events_pb2.Event]) -> str:
    """The sandbox the session's next tool call runs in: the newest provisioned one that is not lost."""
    sandbox = ""
    for event in events:
        if event.HasField("sandbox_provisioned"):
            sandbox = event.sandbox_provisioned.sandbox_id
        elif event.HasField("sandbox_lost") and event.sandbox_lost.sandbox_id == sandbox:
            sandbox = ""
    return sandbox


class SessionRun:
    """Drives one session for as long as this brain holds its lease."""

    def __init__(
        self,
        harness: Harness,
        session: session_pb2.Session,
        lease: session_pb2.Lease,
        *,
        previous_holder: str = "",
        log_events: Sequence[events_pb2.Event] = (),
    ) -> None:
        self._harness = harness
        self._config = harness.config
        self._store = harness.store
        self.session = session
        self.session_id = session.id
        self.epoch = lease.epoch
        self._previous_holder = previous_holder
        self._events: list[events_pb2.Event] = []
        self._appends = 0
        self._interrupted = asyncio.Event()
        # The log as `wake` read it; the first refresh reads only what was appended since.
        self._absorb(log_events)
        # Tool calls logged at or before this point were left by an earlier run (see `_run_mcp_tool`).
        self._resumed_at = self.last_seq
        self._tools: ToolSet | None = None
        resources = session.agent.resources
        self._mcp = SessionMcp(
            harness.proxy,
            session.id,
            list(session.agent.mcp_servers),
            [r.credential for r in resources.repositories if r.credential] + [s.credential for s in resources.secrets],
        )
        # Hands relays the sandbox's repositories and secrets through the proxy with the session's token.
        self._sandbox_needs_token = bool(resources.repositories or resources.secrets)
        self._lease_lost: str | None = None
        self._done = False
        self.task: asyncio.Task[None] | None = None

    # The log ---------------------------------------------------------------------------------------------

    @property
    def last_seq(self) -> int:
        return self._events[-1].seq if self._events else 0

    async def _refresh(self) -> list[events_pb2.Event]:
        """Brings the local copy of the log up to date (other writers append user messages)."""
        _, new = await self._retrying(lambda: self._store.read_session(self.session_id, after_seq=self.last_seq))
        self._absorb(new)
        return self._events

    def _absorb(self, new: Sequence[events_pb2.Event]) -> None:
        self._events.extend(new)
        for event in new:
            # An interrupt counts for the turn it was sent in; a turn that ended (idle) has consumed it.
            if event.HasField("user_interrupt"):
                self._interrupted.set()
            elif event.HasField("session_status_idle"):
                self._interrupted.clear()

    async def _retrying(self, call: Callable[[], Awaitable[Any]]) -> Any:
        """Runs a mesh call, retrying while its server is briefly unreachable; fencing ends the run."""
        delay = 0.05
        deadline = time.monotonic() + 60
        while True:
            try:
                return await call()
            except LeaseFenced as error:
                raise LeaseLost(str(error)) from error
            except (Unavailable, DeadlineExceeded):
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def _emit(self, *batch: events_pb2.Event, key: str = "", expected_seq: int | None = None) -> None:
        """Appends events atomically under the lease, with an idempotency key stable across retries."""
        self._appends += 1
        key = key or f"{self.epoch}.{self._appends}"
        producer = self._config.holder
        for event in batch:
            event.producer = producer
        response = await self._retrying(
            lambda: self._store.emit_batch(
                self.session_id,
                list(batch),
                idempotency_key=key,
                lease_epoch=self.epoch,
                expected_seq=expected_seq,
            )
        )
        stored = list(response.events)
        if stored and stored[0].seq != self.last_seq + 1:
            await self._refresh()  # someone else appended in between: read it all in order
        else:
            self._events.extend(stored)

    # The run ---------------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Drives the session until its turn ends, the lease is lost, or the brain stops."""
        driver = asyncio.current_task()
        assert driver is not None
        renewer = asyncio.create_task(self._renew_lease(driver))
        watcher = asyncio.create_task(self._watch_interrupts())
        span = self._harness.tracer.start_span(
            "brain.turn",
            attributes={"session.id": self.session_id, "brain.holder": self._config.holder, "lease.epoch": self.epoch},
            links=self._previous_trace(),
        )
        try:
            with trace.use_span(span, end_on_exit=True):
                await self._drive()
        except LeaseLost as lost:
            log.warning("session %s: lease lost, stopping at once: %s", self.session_id, lost)
        except asyncio.CancelledError:
            if self._lease_lost is None:
                raise
            driver.uncancel()  # our own renewer stopped us; the brain itself is not stopping
            log.warning("session %s: lease lost, stopped at once: %s", self.session_id, self._lease_lost)
        except Exception as error:
            log.error("session %s: the run failed: %r", self.session_id, error, exc_info=error)
            await self._record_crash(error)
        finally:
            renewer.cancel()
            watcher.cancel()
            await asyncio.gather(renewer, watcher, return_exceptions=True)

    def _previous_trace(self) -> list[trace.Link]:
        """A link to the trace that last wrote to the session (the turn this one resumes), if it was traced."""
        for event in reversed(self._events):
            if event.trace_id and event.span_id:
                context = trace.SpanContext(
                    trace_id=int(event.trace_id, 16),
                    span_id=int(event.span_id, 16),
                    is_remote=True,
                    trace_flags=trace.TraceFlags(trace.TraceFlags.SAMPLED),
                )
                return [trace.Link(context, {"session.resumed_from_seq": event.seq})]
        return []

    async def _renew_lease(self, driver: asyncio.Task[Any]) -> None:
        """Keeps the lease alive; if it has moved to another brain, cancels the driver mid-step."""
        interval = self._config.lease_ttl / 3
        while True:
            await asyncio.sleep(interval)
            try:
                await self._store.renew_lease(
                    self.session_id, holder=self._config.holder, epoch=self.epoch, ttl=self._config.lease_ttl
                )
            except LeaseFenced as error:
                self._lease_lost = str(error)
                driver.cancel()
                return
            except MeshError as error:
                log.warning("session %s: lease renewal failed, will retry: %s", self.session_id, error)

    async def _watch_interrupts(self) -> None:
        """Notices `user.interrupt` appended by anyone, so an in-flight model call is cut short."""
        while True:
            try:
                async for event in self._store.watch(self.session_id, after_seq=self.last_seq):
                    # The stream may lag: an interrupt from before the last idle belongs to an ended turn.
                    if event.HasField("user_interrupt") and event.seq > self._turn_start():
                        self._interrupted.set()
            except MeshError:
                await asyncio.sleep(0.5)

    def interrupt(self) -> None:
        """Asks the run to stop at the next safe point."""
        self._interrupted.set()

    async def _record_crash(self, error: BaseException) -> None:
        """Logs an unexpected failure; after `crash_limit` in one turn the turn ends (no crash loop)."""
        with contextlib.suppress(MeshError, LeaseLost):
            crashes = sum(
                1
                for e in self._events
                if e.HasField("session_error")
                and e.session_error.kind == "brain_failure"
                and e.seq > self._turn_start()
            )
            give_up = crashes + 1 >= self._config.crash_limit
            await self._emit(
                events_pb2.Event(
                    session_error=events_pb2.SessionError(
                        message=f"the brain failed driving the session ({type(error).__name__}: {error})",
                        kind="brain_failure",
                        retrying=not give_up,
                    )
                )
            )
            if give_up:
                await self._emit(self._idle(events_pb2.STOP_REASON_ERROR))
            await self._store.release_lease(self.session_id, holder=self._config.holder, epoch=self.epoch)

    def _turn_start(self) -> int:
        for event in reversed(self._events):
            if event.HasField("session_status_idle"):
                return event.seq
        return 0

    @staticmethod
    def _idle(reason: int, event_ids: Sequence[str] = ()) -> events_pb2.Event:
        return events_pb2.Event(
            session_status_idle=events_pb2.SessionStatusIdle(stop_reason=reason, event_ids=event_ids)  # type: ignore[arg-type]
        )

    async def _drive(self) -> None:
        events = await self._refresh()
        if self.session.status in (events_pb2.SESSION_STATUS_RUNNING, events_pb2.SESSION_STATUS_RESCHEDULING):
            previous = self._previous_holder or "a brain"
            await self._emit(
                events_pb2.Event(
                    session_status_rescheduling=events_pb2.SessionStatusRescheduling(
                        reason=f"{previous} stopped mid-turn; {self._config.holder} takes over"
                    )
                )
            )
        await self._emit(
            events_pb2.Event(session_status_running=events_pb2.SessionStatusRunning(brain=self._config.holder))
        )
        steps = 0
        while True:
            events = await self._refresh()
            pending = unanswered_tool_uses(events)
            if pending:
                await self._run_tools(pending)
                continue
            if self._interrupted.is_set():
                await self._finish(events_pb2.STOP_REASON_INTERRUPTED)
                return
            if not needs_model(events):
                if await self._finish(events_pb2.STOP_REASON_END_TURN):
                    return
                continue
            if steps >= (self.session.agent.max_steps or self._config.max_steps):
                if await self._finish(events_pb2.STOP_REASON_MAX_STEPS):
                    return
                continue
            steps += 1
            await self._call_model()
            if self._done:
                return

    async def _finish(self, reason: int) -> bool:
        """Ends the turn; returns False if a user message arrived meanwhile and the turn goes on."""
        try:
            # Only if nothing was appended since we last looked: otherwise that new message needs an answer.
            await self._emit(self._idle(reason), expected_seq=self.last_seq + 1)
        except SequenceMismatch:
            return False  # the loop reads what arrived and decides again
        self._done = True
        self._harness.failpoints.hit("brain.after_idle_logged")
        # Release, then look once more: a message appended before the release whose Wake saw our lease
        # would otherwise wait for good; one appended after it can be woken by anyone.
        with contextlib.suppress(MeshError):
            await self._store.release_lease(self.session_id, holder=self._config.holder, epoch=self.epoch)
        _, newer = await self._store.read_session(self.session_id, after_seq=self.last_seq)
        if any(e.HasField("user_message") for e in newer):
            try:
                acquired = await self._store.acquire_lease(
                    self.session_id, holder=self._config.holder, ttl=self._config.lease_ttl
                )
            except LeaseHeld:
                return True  # another brain took it and answers the message
            self.epoch = acquired.lease.epoch
            await self._emit(
                events_pb2.Event(session_status_running=events_pb2.SessionStatusRunning(brain=self._config.holder))
            )
            self._done = False
            self._interrupted.clear()
            return False
        return True

    # The model -------------------------------------------------------------------------------------------

    async def _tool_set(self) -> ToolSet:
        if self._tools is None:
            # Every hands server may be restarting at once; that is an outage to wait out, not a crashed run.
            specs = await self._retrying(self._harness.hands_tools)
            try:
                mcp_tools = await self._mcp.tools()
            except McpUnavailable as error:
                # The turn goes on with the other tools; the log and the model's tool list show what is missing.
                mcp_tools = []
                await self._emit(
                    events_pb2.Event(
                        session_error=events_pb2.SessionError(
                            message=f"MCP tools are not offered this turn: {error}", kind="mcp_unavailable"
                        )
                    )
                )
            self._tools = ToolSet.build(specs, list(self.session.agent.tools), mcp_tools, self._mcp.servers)
        return self._tools

    async def _call_model(self) -> None:
        """One model call with retries; appends its answer, or ends the turn if the call cannot succeed."""
        config = self._config
        agent = self.session.agent
        tools = await self._tool_set()
        system = [{"type": "text", "text": agent.system or DEFAULT_SYSTEM, "cache_control": {"type": "ephemeral"}}]
        tool_params = tools.api_params()
        if tool_params:
            tool_params[-1]["cache_control"] = {"type": "ephemeral"}
        overhead = (len(str(system)) + len(str(tool_params))) // 4
        with self._harness.tracer.start_as_current_span("brain.context", attributes={"events": len(self._events)}):
            context = self._harness.policy.build(
                self._events, budget_tokens=config.context_budget_tokens, overhead_tokens=overhead
            )
        for compaction in context.compactions:
            await self._emit(
                events_pb2.Event(
                    context_compacted=events_pb2.ContextCompacted(
                        through_seq=compaction.through_seq,
                        summary=compaction.summary,
                        strategy=compaction.strategy,
                        tokens_before=compaction.tokens_before,
                        tokens_after=compaction.tokens_after,
                    )
                )
            )
        messages = context.messages
        if messages and messages[-1]["content"]:
            # Cache everything up to the newest block: the next request extends this prefix.
            last = messages[-1]
            last["content"] = [
                *last["content"][:-1],
                {**last["content"][-1], "cache_control": {"type": "ephemeral"}},
            ]
        model = agent.model or config.model
        request = ModelRequest(
            model=model,
            max_tokens=agent.max_tokens or config.max_tokens,
            messages=messages,
            system=system,
            tools=tool_params,
            user_id=self.session_id,
        )
        await self._emit(
            events_pb2.Event(
                span_model_request_start=events_pb2.SpanModelRequestStart(model=model, message_count=len(messages))
            )
        )
        started = time.monotonic()
        tracer = self._harness.tracer
        for attempt in range(1, config.model_attempts + 1):
            with tracer.start_as_current_span(
                "brain.model_call",
                attributes={"gen_ai.system": "anthropic", "gen_ai.request.model": model, "attempt": attempt},
            ) as span:
                try:
                    response = await self._interruptible(self._harness.model.complete(request))
                except _Interrupted:
                    await self._emit(self._span_end(started, error=True))
                    await self._finish(events_pb2.STOP_REASON_INTERRUPTED)
                    return
                except ModelError as error:
                    span.set_attribute("error.type", error.kind)
                    self._harness.metrics.model_failed(error.kind)
                    retrying = error.retryable and attempt < config.model_attempts
                    await self._emit(
                        events_pb2.Event(
                            session_error=events_pb2.SessionError(
                                message=f"{error} (attempt {attempt} of {config.model_attempts})",
                                kind=error.kind,
                                retrying=retrying,
                            )
                        )
                    )
                    if not retrying:
                        await self._emit(self._span_end(started, error=True))
                        reason = (
                            events_pb2.STOP_REASON_RETRIES_EXHAUSTED
                            if error.retryable
                            else events_pb2.STOP_REASON_ERROR
                        )
                        await self._finish(reason)
                        return
                    delay = min(config.retry_max_delay, config.retry_base_delay * 2 ** (attempt - 1))
                    delay = max(delay * random.uniform(0.5, 1.0), error.retry_after or 0)
                    try:
                        await self._interruptible(asyncio.sleep(delay))
                    except _Interrupted:
                        await self._emit(self._span_end(started, error=True))
                        await self._finish(events_pb2.STOP_REASON_INTERRUPTED)
                        return
                    continue
                self._harness.metrics.model_answered(response)
                span.set_attribute("gen_ai.usage.input_tokens", response.usage.input_tokens)
                span.set_attribute("gen_ai.usage.output_tokens", response.usage.output_tokens)
                span.set_attribute("gen_ai.response.finish_reasons", [response.stop_reason])
            try:
                answer, unrecorded = self._answer_events(response, tools)
            except ValueError as error:  # e.g. text that is not valid Unicode
                await self._answer_not_logged(started, f"{type(error).__name__}: {error}")
                return
            try:
                # An input the log cannot hold is left out, and its call answered with the error, in the same
                # append: the model hears why and the turn goes on; asking again would get the same answer.
                await self._emit(*answer, self._span_end(started, response=response), *unrecorded)
            except InvalidArgument as refused:  # a limit of the store that the checks here do not know
                await self._answer_not_logged(started, f"the session store refused it: {refused}")
                return
            if any(block["type"] == "tool_use" for block in response.content):
                self._harness.failpoints.hit("brain.after_tool_use_logged")
            return

    async def _answer_not_logged(self, started: float, why: str) -> None:
        """Ends the turn with why, when the model's answer cannot be logged at all (as a garbled answer does)."""
        await self._emit(
            events_pb2.Event(
                session_error=events_pb2.SessionError(
                    message=f"the model's answer could not be recorded, so the turn ends: {why}",
                    kind="model_answer_unrecorded",
                )
            ),
            self._span_end(started, error=True),
        )
        await self._finish(events_pb2.STOP_REASON_ERROR)

    async def _interruptible(self, work: Awaitable[Any]) -> Any:
        """Awaits `work` unless an interrupt comes first (then `work` is cancelled)."""
        task = asyncio.ensure_future(work)
        waiter = asyncio.ensure_future(self._interrupted.wait())
        try:
            done, _ = await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            task.cancel()  # the run itself is being stopped
            raise
        finally:
            waiter.cancel()
        if task in done:
            return task.result()
        task.cancel()
        # Do not wait long for the cancelled call to wind down: the turn must stop now.
        finished, _ = await asyncio.wait({task}, timeout=2)
        if not finished:
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
        raise _Interrupted

    @staticmethod
    def _span_end(started: float, *, response: ModelResponse | None = None, error: bool = False) -> events_pb2.Event:
        end = events_pb2.SpanModelRequestEnd(duration=_duration(time.monotonic() - started), is_error=error)
        if response is not None:
            end.message_id = response.id
            end.stop_reason = response.stop_reason
            usage = response.usage
            end.model_usage.CopyFrom(
                events_pb2.ModelUsage(
                    input_tokens=usage.input_tokens,
                    output_tokens=usage.output_tokens,
                    cache_creation_input_tokens=usage.cache_creation_input_tokens,
                    cache_read_input_tokens=usage.cache_read_input_tokens,
                )
            )
        return events_pb2.Event(span_model_request_end=end)

    @staticmethod
    def _answer_events(
        response: ModelResponse, tools: ToolSet
    ) -> tuple[list[events_pb2.Event], list[events_pb2.Event]]:
        """The events of an answer, and those that answer its tool calls whose input the log cannot hold."""
        produced: list[events_pb2.Event] = []
        unrecorded: list[events_pb2.Event] = []

        def loggable(block: Mapping[str, Any], mcp: bool) -> struct_pb2.Struct:
            struct, why = _loggable_input(block["input"])
            if why:
                unrecorded.append(
                    events_pb2.Event(
                        session_error=events_pb2.SessionError(
                            message=f"the input of tool call {block['id']} ({block['name']}) was not recorded and "
                            f"the call not run: {why}",
                            kind="model_answer_unrecorded",
                        )
                    )
                )
                text = f"This tool call was not run: its input could not be recorded in the session log: {why}."
                unrecorded.append(
                    _mcp_result(block["id"], text) if mcp else _tool_result(block["id"], text, is_error=True)
                )
            return struct

        for block in response.content:
            kind = block["type"]
            if kind == "text":
                if block["text"]:
                    produced.append(
                        events_pb2.Event(
                            agent_message=events_pb2.AgentMessage(
                                message_id=response.id, content=[vocab.text(block["text"])]
                            )
                        )
                    )
            elif kind == "thinking":
                produced.append(
                    events_pb2.Event(
                        agent_thinking=events_pb2.AgentThinking(
                            message_id=response.id,
                            thinking=block.get("thinking", ""),
                            signature=block.get("signature", ""),
                        )
                    )
                )
            elif kind == "redacted_thinking":
                produced.append(
                    events_pb2.Event(
                        agent_thinking=events_pb2.AgentThinking(
                            message_id=response.id, redacted_data=block.get("data", "")
                        )
                    )
                )
            elif kind == "tool_use" and (mcp_tool := tools.get(block["name"])) and mcp_tool.route is Route.MCP:
                produced.append(
                    events_pb2.Event(
                        agent_mcp_tool_use=events_pb2.AgentMcpToolUse(
                            message_id=response.id,
                            id=block["id"],
                            server_name=mcp_tool.server,
                            name=mcp_tool.remote_name,
                            input=loggable(block, mcp=True),
                        )
                    )
                )
            elif kind == "tool_use":
                produced.append(
                    events_pb2.Event(
                        agent_tool_use=events_pb2.AgentToolUse(
                            message_id=response.id,
                            id=block["id"],
                            name=block["name"],
                            input=loggable(block, mcp=False),
                        )
                    )
                )
        if not produced:
            # An empty answer still ends the model's turn; record it so the log shows what happened.
            produced.append(
                events_pb2.Event(
                    agent_message=events_pb2.AgentMessage(
                        message_id=response.id, content=[vocab.text("(empty response)")]
                    )
                )
            )
        return produced, unrecorded

    # Tools -----------------------------------------------------------------------------------------------

    async def _run_tools(self, pending: Sequence[events_pb2.Event]) -> None:
        for event in pending:
            if event.HasField("agent_mcp_tool_use"):
                await self._run_mcp_tool(event)
                continue
            use = event.agent_tool_use
            if self._interrupted.is_set():
                ran = (
                    "may have run before the interruption; its outcome is unknown"
                    if current_sandbox(self._events)
                    else "was not run"
                )
                await self._emit(
                    _tool_result(use.id, f"The user interrupted the turn: this tool call {ran}.", is_error=True),
                    key=f"result.{use.id}",
                )
                continue
            with self._harness.tracer.start_as_current_span(
                "brain.tool_call", attributes={"tool.name": use.name, "tool.use_id": use.id, "tool.route": "hands"}
            ) as span:
                started = time.monotonic()
                result = await self._run_tool(use)
                outcome = result.agent_tool_result
                span.set_attribute("tool.is_error", outcome.is_error)
                self._harness.metrics.tool_called(
                    use.name, "hands", is_error=outcome.is_error, seconds=time.monotonic() - started
                )
                if outcome.execution.sandbox_id:
                    span.set_attribute("sandbox.id", outcome.execution.sandbox_id)
            self._harness.failpoints.hit("brain.after_execute")
            await self._emit(result, key=f"result.{use.id}")

    async def _run_mcp_tool(self, event: events_pb2.Event) -> None:
        """Runs one MCP tool call through the proxy, at most once.

        MCP tools have no idempotency key, so a call that a dead brain left without a result (its `seq` is
        older than this run) is not sent again: it may have run upstream. The model hears exactly that.
        """
        use = event.agent_mcp_tool_use
        qualified = f"{use.server_name}.{use.name}"
        if self._interrupted.is_set():
            result = _mcp_result(use.id, f"The user interrupted the turn: {qualified} was not called.")
        elif event.seq <= self._resumed_at:
            result = _mcp_result(
                use.id,
                f"The brain driving this session stopped while {qualified} was being called; whether the call "
                "reached the MCP server is unknown, so it was not sent again. Check its effect before retrying.",
            )
        else:
            with self._harness.tracer.start_as_current_span(
                "brain.tool_call",
                attributes={"tool.name": qualified, "tool.use_id": use.id, "tool.route": "mcp"},
            ) as span:
                started = time.monotonic()
                try:
                    response = await self._mcp.call(
                        use.server_name, use.name, use.input, timeout=min(self._config.tool_timeout, 600.0)
                    )
                    result = events_pb2.Event(
                        agent_mcp_tool_result=events_pb2.AgentMcpToolResult(
                            mcp_tool_use_id=use.id, content=response.content, is_error=response.is_error
                        )
                    )
                except (MeshError, McpUnavailable) as error:
                    result = _mcp_result(use.id, f"{qualified} could not be called: {error}")
                span.set_attribute("tool.is_error", result.agent_mcp_tool_result.is_error)
                self._harness.metrics.tool_called(
                    qualified,
                    "mcp",
                    is_error=result.agent_mcp_tool_result.is_error,
                    seconds=time.monotonic() - started,
                )
        self._harness.failpoints.hit("brain.after_execute")
        await self._emit(result, key=f"result.{use.id}")

    async def _run_tool(self, use: events_pb2.AgentToolUse) -> events_pb2.Event:
        tools = await self._tool_set()
        tool = tools.get(use.name)
        if tool is None:
            return _tool_result(
                use.id,
                f"There is no tool named {use.name!r}; the tools are: {', '.join(tools.names)}.",
                is_error=True,
            )
        arguments = tool_input(use.input)
        if tool.route is Route.SESSION:
            return await self._read_session_tool(use.id, arguments)
        return await self._hands_tool(use)

    async def _read_session_tool(self, use_id: str, arguments: Mapping[str, Any]) -> events_pb2.Event:
        try:
            start, end, last = session_read_range(arguments)
        except ValueError as error:
            return _tool_result(use_id, f"{SESSION_TOOL}: {error}.", is_error=True)
        page = await self._retrying(
            lambda: self._store.get_events(self.session_id, start_seq=start, end_seq=end, last=last)
        )
        return _tool_result(use_id, render_events(list(page.events)), is_error=False)

    async def _credential_token(self) -> str:
        """The session token for the sandbox's relays; '' when the session has no repositories or secrets."""
        if not self._sandbox_needs_token:
            return ""
        try:
            return await self._mcp.token()
        except McpUnavailable as error:
            # Hands then refuses the sandbox with its own sentence; the model hears it as the tool's error.
            log.warning("session %s: no session token for its sandbox's relays: %s", self.session_id, error)
            return ""

    async def _sandbox_for(self, use_id: str) -> str:
        sandbox = current_sandbox(self._events)
        if sandbox:
            return sandbox
        # Lazy hands: the first call that needs a sandbox provisions it. The request id ties the sandbox to
        # this call, so a brain that dies before logging it gets the same sandbox back on retry.
        with self._harness.tracer.start_as_current_span("brain.provision"):
            created = await self._harness.hands.provision(
                resources=self.session.agent.resources if self.session.agent.HasField("resources") else None,
                session_id=self.session_id,
                request_id=f"{self.session_id}.{use_id}",
                credential_token=await self._credential_token(),
            )
        await self._emit(
            events_pb2.Event(
                sandbox_provisioned=events_pb2.SandboxProvisioned(
                    sandbox_id=created.id, backend=created.backend, hands_instance=created.hands_instance
                )
            ),
            key=f"provisioned.{created.id}",
        )
        return str(created.id)

    async def _hands_tool(self, use: events_pb2.AgentToolUse) -> events_pb2.Event:
        delay = 0.2
        deadline = time.monotonic() + 60
        while True:
            try:
                try:
                    sandbox = await self._sandbox_for(use.id)
                except (Unavailable, DeadlineExceeded):
                    raise
                except MeshError as error:
                    # The session asks for a sandbox hands cannot make (labels no server carries, bad limits):
                    # the model hears why; nothing ran.
                    return _tool_result(
                        use.id, f"No sandbox could be provisioned, so this call did not run: {error}", is_error=True
                    )
                response = await self._harness.hands.execute(
                    sandbox,
                    execution_id=use.id,
                    name=use.name,
                    input=use.input,
                    # The model's bash and editor calls name no time limit, so the sandbox's command_timeout
                    # (a ceiling hands enforces) applies; the brain asks for no more than the model did.
                    timeout=None,
                    credential_token=await self._credential_token(),
                )
                break
            except NotFound:
                # Hands no longer knows the sandbox (e.g. it was reaped): it is as good as lost.
                response = hands_pb2.ExecuteResponse(
                    output=f"Sandbox {current_sandbox(self._events)} no longer exists; this call did not run "
                    "there. The next tool call gets a new sandbox.",
                    is_error=True,
                    sandbox_lost=True,
                    status=hands_pb2.EXECUTION_STATUS_REJECTED,
                )
                sandbox = current_sandbox(self._events)
                break
            except (Unavailable, DeadlineExceeded) as error:
                # Execute is idempotent on the tool_use id, so asking again cannot run the call twice.
                if time.monotonic() > deadline:
                    return _tool_result(
                        use.id,
                        f"The sandbox service could not be reached ({error}); whether this call ran is "
                        "unknown, and it was not retried further.",
                        is_error=True,
                    )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        if response.sandbox_lost and sandbox:
            await self._emit(
                events_pb2.Event(
                    sandbox_lost=events_pb2.SandboxLost(sandbox_id=sandbox, reason=response.output[:1000])
                ),
                key=f"lost.{sandbox}",
            )
        execution = events_pb2.ToolExecution(
            sandbox_id=sandbox,
            exit_code=response.exit_code if response.HasField("exit_code") else 0,
            truncated=response.truncated,
            duration=response.duration,
            replayed=response.replayed,
            interrupted=response.status == hands_pb2.EXECUTION_STATUS_INTERRUPTED,
        )
        return _tool_result(use.id, response.output, is_error=response.is_error, execution=execution)


class Harness:
    """All sessions one brain process drives, and the scanner that adopts sessions other brains lost."""

    def __init__(
        self,
        *,
        store: SessionStoreClient,
        hands: Hands,
        model: ModelClient,
        proxy: McpProxy | None = None,
        policy: ContextPolicy,
        config: HarnessConfig,
        tracer: trace.Tracer | None = None,
        failpoints: Failpoints | None = None,
        metrics: ServiceMetrics | None = None,
    ) -> None:
        self.store = store
        self.failpoints = failpoints or Failpoints()
        self.hands = hands
        self.proxy = proxy
        self.model = model
        self.policy = policy
        self.config = config
        self.tracer = tracer or trace.NoOpTracer()
        self._runs: dict[str, SessionRun] = {}
        self.metrics = BrainMetrics(metrics or ServiceMetrics.disabled(), lambda: len(self._runs))
        self._hands_tools: list[sandbox_pb2.ToolSpec] | None = None
        self._scanner: asyncio.Task[None] | None = None
        self._waiting: dict[str, asyncio.Task[None]] = {}
        self._closing = False

    async def hands_tools(self) -> list[sandbox_pb2.ToolSpec]:
        """Hands' tool list, fetched once."""
        if self._hands_tools is None:
            self._hands_tools = await self.hands.list_tools()
        return self._hands_tools

    @property
    def running(self) -> list[str]:
        """Sessions this brain drives now."""
        return list(self._runs)

    async def wake(self, session_id: str) -> WakeResult:
        """Starts driving a session that has work to do; idempotent."""
        run = self._runs.get(session_id)
        if run is not None:
            return WakeResult(WAKE_ALREADY_RUNNING, self.config.holder, run.epoch)
        session, log_events = await self.store.read_session(session_id)
        if session.status == events_pb2.SESSION_STATUS_TERMINATED:
            return WakeResult(WAKE_TERMINATED)
        cut_off = session.status in (
            events_pb2.SESSION_STATUS_RUNNING,
            events_pb2.SESSION_STATUS_RESCHEDULING,
        )
        # A turn that ended (even in an error) is not retried by a wake; a new message starts the next one.
        if not (cut_off or has_new_input(log_events)):
            return WakeResult(WAKE_IDLE)
        try:
            acquired = await self.store.acquire_lease(session_id, holder=self.config.holder, ttl=self.config.lease_ttl)
        except LeaseHeld as held:
            expire_us = int(held.metadata.get("expire_time_us", "0"))
            if session_id not in self._waiting and not self._closing:
                # The holder answers new input in its final check if it lives; if it died after ending its
                # turn, nobody would. Look again when its lease lapses.
                self._waiting[session_id] = asyncio.create_task(self._wake_when_lapsed(session_id, expire_us))
            return WakeResult(
                WAKE_RUNNING_ELSEWHERE, held.metadata.get("holder", ""), int(held.metadata.get("epoch", "0"))
            )
        if session_id in self._runs:  # a concurrent wake won the race while we waited
            return WakeResult(WAKE_ALREADY_RUNNING, self.config.holder, self._runs[session_id].epoch)
        run = SessionRun(
            self,
            acquired.session,
            acquired.lease,
            previous_holder=session.lease.holder,
            log_events=log_events,
        )
        self._runs[session_id] = run
        run.task = asyncio.create_task(self._supervise(run), name=f"session-{session_id}")
        return WakeResult(WAKE_STARTED, self.config.holder, acquired.lease.epoch)

    async def _wake_when_lapsed(self, session_id: str, expire_us: int) -> None:
        """Wakes the session again once another holder's lease lapses. If it is still held then, `wake`
        schedules the next look; once the session has nothing to do, the chain ends."""
        try:
            await asyncio.sleep(max(0.0, expire_us / 1e6 - time.time()) + random.uniform(0.1, 0.5))
        finally:
            self._waiting.pop(session_id, None)
        try:
            await self.wake(session_id)
        except MeshError as error:
            log.warning("session %s: waking it after the other holder's lease lapsed failed: %s", session_id, error)

    async def _supervise(self, run: SessionRun) -> None:
        try:
            await run.run()
        finally:
            if self._runs.get(run.session_id) is run:
                del self._runs[run.session_id]

    async def interrupt(self, session_id: str, reason: str) -> tuple[int, bool]:
        """Records a `user.interrupt` and tells the run, if this brain drives the session."""
        response = await self.store.emit(
            session_id,
            events_pb2.Event(user_interrupt=events_pb2.UserInterrupt(reason=reason), producer=self.config.holder),
        )
        run = self._runs.get(session_id)
        if run is not None:
            run.interrupt()
        session = (await self.store.get_session(session_id, view=session_pb2.SESSION_VIEW_BASIC)).session
        was_running = session.status in (
            events_pb2.SESSION_STATUS_RUNNING,
            events_pb2.SESSION_STATUS_RESCHEDULING,
        )
        return response.event.seq, was_running

    async def scan_orphans_once(self) -> int:
        """Wakes sessions that are running without a live lease; returns how many this brain took."""
        page = await self.store.list_sessions(orphaned_only=True, page_size=100)
        limit = asyncio.Semaphore(self.config.scan_concurrency)
        taken = 0

        async def adopt(session_id: str) -> None:
            nonlocal taken
            async with limit:
                with contextlib.suppress(MeshError):
                    if (await self.wake(session_id)).outcome == WAKE_STARTED:
                        taken += 1

        candidates = [s.id for s in page.sessions if s.id not in self._runs]
        random.shuffle(candidates)  # brains scanning together should not all start at the same session
        await asyncio.gather(*(adopt(s) for s in candidates))
        return taken

    async def scan_orphans(self) -> None:
        """Runs `scan_orphans_once` every `scan_interval` (jittered) until cancelled."""
        while True:
            await asyncio.sleep(self.config.scan_interval * random.uniform(0.5, 1.5))
            try:
                taken = await self.scan_orphans_once()
                if taken:
                    log.info("adopted %d orphaned session(s)", taken)
            except MeshError as error:
                log.warning("orphan scan failed: %s", error)

    def start_scanner(self) -> None:
        """Starts the background orphan scanner."""
        self._scanner = asyncio.create_task(self.scan_orphans(), name="orphan-scanner")

    async def aclose(self) -> None:
        """Stops every run; their leases are released so other brains adopt the sessions at once."""
        self._closing = True
        for task in [*self._waiting.values(), *([self._scanner] if self._scanner else [])]:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        runs = list(self._runs.values())
        for run in runs:
            if run.task is not None:
                run.task.cancel()
        for run in runs:
            if run.task is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await run.task
            with contextlib.suppress(MeshError):
                await self.store.release_lease(run.session_id, holder=self.config.holder, epoch=run.epoch)


# `WakeOutcome` values (brain.proto); kept here as ints so the core needs no generated code for them.
WAKE_STARTED, WAKE_ALREADY_RUNNING, WAKE_RUNNING_ELSEWHERE, WAKE_IDLE, WAKE_TERMINATED = 1, 2, 3, 4, 5
