"""`SessionService` servicer: checks requests and translates between protobuf and the store core."""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections.abc import AsyncIterator, Sequence

import grpc
from google.protobuf import duration_pb2

from managed_agents.events import STATUS_BY_TYPE, TYPE_BY_FIELD
from managed_agents.mesh import paging
from managed_agents.mesh.errors import InvalidArgument
from managed_agents.mesh.ids import SESSION_PREFIX, new_id
from managed_agents.mesh.metrics import ServiceMetrics
from managed_agents.mesh.telemetry import current_trace_ids, trace_ids_from_traceparent
from managed_agents.v1 import events_pb2, session_pb2, session_pb2_grpc
from session_store import validate, wire
from session_store.store import (
    AppendRequest,
    AppendResult,
    EventStore,
    NewEvent,
    SessionCursor,
    SessionRecord,
    SessionStatus,
    StoredEvent,
)

log = logging.getLogger(__name__)

SERVICE_NAME = session_pb2.DESCRIPTOR.services_by_name["SessionService"].full_name

DEFAULT_PAGE_EVENTS, MAX_PAGE_EVENTS = 1000, 10_000
DEFAULT_PAGE_SESSIONS, MAX_PAGE_SESSIONS = 100, 1000
# Responses stay within gRPC's default 4 MiB message limit, so that any client can read every page: a page of
# events stops before the response would pass `PAGE_BYTES` (it always holds one event if any remain, and one
# event may be up to 4 MiB itself), a page of sessions before it would pass `LIST_PAGE_BYTES` (a session's spec
# is at most 1 MiB, so any page of sessions fits).
PAGE_BYTES = 4 * 1024 * 1024
LIST_PAGE_BYTES = 2 * 1024 * 1024
_RESPONSE_ROOM = 1024  # next_page_token, last_seq and the field tags around them
DEFAULT_LEASE_US, MIN_LEASE_US, MAX_LEASE_US = 15_000_000, 1_000_000, 600_000_000
_OUTPUT_ONLY = ("id", "session_id", "seq", "type", "create_time", "trace_id", "span_id")
_END_OF_LOG = 2**62
_MAX_TIME_US = 2**63 - 1
_SESSION_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _page_size(value: int, default: int, maximum: int) -> int:
    validate.non_negative(value, "page_size")
    return min(value or default, maximum)


def _ttl_us(value: duration_pb2.Duration, field: str) -> int:
    micros = value.ToMicroseconds()
    if micros == 0:
        return DEFAULT_LEASE_US
    if not MIN_LEASE_US <= micros <= MAX_LEASE_US:
        raise InvalidArgument.field(field, "must be between 1 s and 10 min (or 0 for the default 15 s)")
    return micros


def _holder(value: str) -> str:
    if not value or len(value) > 128 or not value.isprintable():
        raise InvalidArgument.field("holder", "must be 1 to 128 printable characters")
    return value


def _status(value: int) -> SessionStatus | None:
    if value == events_pb2.SESSION_STATUS_UNSPECIFIED:
        return None
    if value not in events_pb2.SessionStatus.values():
        raise InvalidArgument.field("status", f"{value} is not a known SessionStatus")
    return SessionStatus(value)


def _trace_ids(context: grpc.aio.ServicerContext) -> tuple[str, str]:
    """The trace that is writing: this server's span if it traces, else the caller's `traceparent`."""
    ids = current_trace_ids()
    if ids[0]:
        return ids
    for key, value in context.invocation_metadata() or ():
        if key == "traceparent":
            return trace_ids_from_traceparent(value)
    return "", ""


def session_message(record: SessionRecord) -> session_pb2.Session:
    """The `Session` resource of a stored session record."""
    session = session_pb2.Session.FromString(record.spec)
    session.id = record.session_id
    session.status = int(record.status)  # type: ignore[assignment]  # same numbers as the proto enum
    session.last_seq = record.last_seq
    session.create_time.FromMicroseconds(record.create_time_us)
    session.update_time.FromMicroseconds(record.update_time_us)
    if record.lease.epoch:
        session.lease.holder = record.lease.holder
        session.lease.epoch = record.lease.epoch
        if record.lease.expire_time_us:
            session.lease.expire_time.FromMicroseconds(record.lease.expire_time_us)
    return session


def _lease(record: SessionRecord) -> session_pb2.Lease:
    return session_message(record).lease


def _listed(record: SessionRecord) -> session_pb2.Session:
    """A session as listed. A spec beyond today's 1 MiB limit (stored before it was enforced) is listed with its
    title only, so that one such session cannot make every page of the listing too large to send."""
    if len(record.spec) <= validate.MAX_SPEC_BYTES:
        return session_message(record)
    log.warning(
        "session %s has a %d-byte spec; listing it without metadata and agent", record.session_id, len(record.spec)
    )
    title = session_pb2.Session.FromString(record.spec).title[: validate.MAX_TITLE_CHARS]
    trimmed = session_pb2.Session(title=title).SerializeToString()
    return session_message(
        SessionRecord(
            record.session_id,
            record.status,
            record.last_seq,
            record.create_time_us,
            record.update_time_us,
            record.lease,
            trimmed,
        )
    )


def _framed(body: bytes) -> int:
    """Bytes an event takes in a repeated field: tag, length, body."""
    return 1 + (len(body).bit_length() + 6) // 7 + len(body)


def _fitting(events: list[StoredEvent], budget: int) -> list[StoredEvent]:
    """The longest prefix of `events` whose framed size is at most `budget`, and at least the first event."""
    total = 0
    for count, event in enumerate(events):
        total += _framed(event.body)
        if count and total > budget:
            return events[:count]
    return events


class SessionServicer(session_pb2_grpc.SessionServiceServicer):
    """Serves `managed_agents.v1.SessionService` from an `EventStore`."""

    def __init__(self, store: EventStore, metrics: ServiceMetrics | None = None) -> None:
        self._store = store
        metrics = metrics or ServiceMetrics.disabled()
        self._measured = metrics.enabled
        self._appended = metrics.counter("managed_agents.store.events_appended", "events appended, by type")
        self._append_time = metrics.latency(
            "managed_agents.store.append_duration", "time of one EmitEvent or BatchEmitEvents, to its commit"
        )

    async def _append(self, request: AppendRequest, events: Sequence[events_pb2.Event]) -> AppendResult:
        if not self._measured:
            return await self._store.append(request)
        started = time.perf_counter()
        result: AppendResult = await self._store.append(request)
        self._append_time.record(time.perf_counter() - started)
        if not result.replayed:
            for event in events:
                self._appended.add(1, {"type": event.WhichOneof("payload") or "unknown"})
        return result

    # Appends -----------------------------------------------------------------------------------------------

    def _append_request(
        self,
        context: grpc.aio.ServicerContext,
        session_id: str,
        events: Sequence[events_pb2.Event],
        *,
        path: str,
        idempotency_key: str,
        has_expected: bool,
        expected_seq: int,
        lease_epoch: int,
    ) -> AppendRequest:
        validate.session_id(session_id)
        validate.idempotency_key(idempotency_key)
        validate.non_negative(lease_epoch, "lease_epoch")
        if has_expected and expected_seq < 1:
            raise InvalidArgument.field("expected_seq", f"must be at least 1 (got {expected_seq})")
        trace_id, span_id = _trace_ids(context)
        digest = hashlib.sha256()
        prepared = []
        for index, given in enumerate(events):
            field = validate.event(given, path if len(events) == 1 and path == "event" else f"{path}[{index}]")
            event = events_pb2.Event()
            event.CopyFrom(given)
            for name in _OUTPUT_ONLY:
                event.ClearField(name)  # type: ignore[arg-type]  # names are Event's own fields
            # The digest covers what the caller sent, not the trace ids, which differ on every retry.
            body = event.SerializeToString(deterministic=True)
            digest.update(len(body).to_bytes(8, "big") + body)
            if trace_id:
                event.trace_id, event.span_id = trace_id, span_id
                body = event.SerializeToString(deterministic=True)
            type_name = TYPE_BY_FIELD[field]
            status = STATUS_BY_TYPE.get(type_name)
            prepared.append(NewEvent(type_name, body, SessionStatus(status) if status else None))
        return AppendRequest(
            session_id=session_id,
            events=prepared,
            idempotency_key=idempotency_key,
            request_digest=digest.digest(),
            expected_seq=expected_seq if has_expected else None,
            lease_epoch=lease_epoch,
        )

    async def EmitEvent(
        self, request: session_pb2.EmitEventRequest, context: grpc.aio.ServicerContext
    ) -> session_pb2.EmitEventResponse:
        if not request.HasField("event"):
            raise InvalidArgument.field("event", "is required")
        result: AppendResult = await self._append(
            self._append_request(
                context,
                request.session_id,
                [request.event],
                path="event",
                idempotency_key=request.idempotency_key,
                has_expected=request.HasField("expected_seq"),
                expected_seq=request.expected_seq,
                lease_epoch=request.lease_epoch,
            ),
            [request.event],
        )
        response = session_pb2.EmitEventResponse.FromString(
            wire.repeated(wire.FIELD_1, (e.body for e in result.events))
        )
        response.replayed = result.replayed
        return response

    async def BatchEmitEvents(
        self, request: session_pb2.BatchEmitEventsRequest, context: grpc.aio.ServicerContext
    ) -> session_pb2.BatchEmitEventsResponse:
        count = len(request.events)
        if not 1 <= count <= validate.MAX_BATCH_EVENTS:
            raise InvalidArgument.field("events", f"must hold 1 to {validate.MAX_BATCH_EVENTS} events (got {count})")
        size = sum(e.ByteSize() for e in request.events)
        if size > validate.MAX_BATCH_BYTES:
            raise InvalidArgument.field("events", f"total {size} bytes; the batch limit is 16 MiB")
        result = await self._append(
            self._append_request(
                context,
                request.session_id,
                list(request.events),
                path="events",
                idempotency_key=request.idempotency_key,
                has_expected=request.HasField("expected_seq"),
                expected_seq=request.expected_seq,
                lease_epoch=request.lease_epoch,
            ),
            request.events,
        )
        response = session_pb2.BatchEmitEventsResponse.FromString(
            wire.repeated(wire.FIELD_1, (e.body for e in result.events))
        )
        response.replayed = result.replayed
        return response

    # Sessions ----------------------------------------------------------------------------------------------

    async def CreateSession(
        self, request: session_pb2.CreateSessionRequest, context: grpc.aio.ServicerContext
    ) -> session_pb2.CreateSessionResponse:
        session_id = validate.session_id(request.session_id) if request.session_id else new_id(SESSION_PREFIX)
        spec = validate.session_spec(request.session)
        record = await self._store.create_session(session_id, spec=spec.SerializeToString(deterministic=True))
        return session_pb2.CreateSessionResponse(session=session_message(record))

    async def GetSession(
        self, request: session_pb2.GetSessionRequest, context: grpc.aio.ServicerContext
    ) -> session_pb2.GetSessionResponse:
        session_id = validate.session_id(request.session_id)
        after = validate.non_negative(request.after_seq, "after_seq")
        size = _page_size(request.page_size, DEFAULT_PAGE_EVENTS, MAX_PAGE_EVENTS)
        validate.enums_known(request, "request")
        fingerprint = {"s": session_id, "a": request.after_seq}
        if request.page_token:
            after = paging.decode_int(request.page_token, fingerprint, "after", request.after_seq, _END_OF_LOG)
        record = await self._store.get_session(session_id)
        session = session_message(record)
        if request.view == session_pb2.SESSION_VIEW_BASIC:
            return session_pb2.GetSessionResponse(session=session)
        # Bounded by the session row just read, so the page is a consistent snapshot of the log.
        budget = PAGE_BYTES - _RESPONSE_ROOM - session.ByteSize() - 8
        events = await self._store.read_events(
            session_id, after_seq=after, until_seq=record.last_seq, limit=size, max_bytes=max(budget, 0)
        )
        events = _fitting(events, budget)
        response = session_pb2.GetSessionResponse.FromString(wire.repeated(wire.FIELD_2, (e.body for e in events)))
        response.session.CopyFrom(session)
        if events and events[-1].seq < record.last_seq:
            response.next_page_token = paging.encode({"after": events[-1].seq}, fingerprint)
        return response

    async def ListSessions(
        self, request: session_pb2.ListSessionsRequest, context: grpc.aio.ServicerContext
    ) -> session_pb2.ListSessionsResponse:
        size = _page_size(request.page_size, DEFAULT_PAGE_SESSIONS, MAX_PAGE_SESSIONS)
        status = _status(request.status)
        fingerprint = {"status": request.status, "orphaned": request.orphaned_only}
        after = None
        if request.page_token:
            position = paging.decode(
                request.page_token,
                fingerprint,
                {"t": paging.Int(0, _MAX_TIME_US), "id": paging.Str(_SESSION_ID)},
            )
            after = SessionCursor(position["t"], position["id"])
        page = await self._store.list_sessions(
            limit=size,
            max_bytes=LIST_PAGE_BYTES - _RESPONSE_ROOM,
            status=status,
            orphaned_only=request.orphaned_only,
            after=after,
        )
        response = session_pb2.ListSessionsResponse(sessions=[_listed(r) for r in page.records])
        if page.more and page.records:
            last = page.records[-1]
            response.next_page_token = paging.encode({"t": last.create_time_us, "id": last.session_id}, fingerprint)
        return response

    async def GetEvents(
        self, request: session_pb2.GetEventsRequest, context: grpc.aio.ServicerContext
    ) -> session_pb2.GetEventsResponse:
        session_id = validate.session_id(request.session_id)
        for name in ("start_seq", "end_seq", "last"):
            validate.non_negative(getattr(request, name), name)
        if request.last and (request.start_seq or request.end_seq):
            raise InvalidArgument.field("last", "cannot be combined with start_seq or end_seq")
        if request.end_seq and request.start_seq > request.end_seq:
            raise InvalidArgument.field("end_seq", f"is before start_seq ({request.end_seq} < {request.start_seq})")
        size = _page_size(request.page_size, DEFAULT_PAGE_EVENTS, MAX_PAGE_EVENTS)
        record = await self._store.get_session(session_id)
        fingerprint = {
            "s": session_id,
            "a": request.start_seq,
            "b": request.end_seq,
            "l": request.last,
        }
        if request.page_token:
            position = paging.decode(
                request.page_token,
                fingerprint,
                {"after": paging.Int(0, _END_OF_LOG), "until": paging.Int(0, _END_OF_LOG)},
            )
            after, until = position["after"], position["until"]
            if not max(request.start_seq - 1, 0) <= after <= until <= (request.end_seq or _END_OF_LOG):
                raise InvalidArgument.field("page_token", "is not a token this server issued (its range is malformed)")
        elif request.last:
            after, until = max(0, record.last_seq - request.last), record.last_seq
        else:
            after = max(request.start_seq - 1, 0)
            until = min(request.end_seq or _END_OF_LOG, record.last_seq)
        budget = PAGE_BYTES - _RESPONSE_ROOM
        events = await self._store.read_events(
            session_id, after_seq=after, until_seq=until, limit=size, max_bytes=budget
        )
        events = _fitting(events, budget)
        response = session_pb2.GetEventsResponse.FromString(wire.repeated(wire.FIELD_1, (e.body for e in events)))
        response.last_seq = record.last_seq
        if events and events[-1].seq < until:
            response.next_page_token = paging.encode({"after": events[-1].seq, "until": until}, fingerprint)
        return response

    async def WatchSession(
        self, request: session_pb2.WatchSessionRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[session_pb2.WatchSessionResponse]:
        session_id = validate.session_id(request.session_id)
        after = validate.non_negative(request.after_seq, "after_seq")
        await self._store.get_session(session_id)  # NOT_FOUND before the stream starts
        async for event in self._store.watch(session_id, after_seq=after):
            yield session_pb2.WatchSessionResponse.FromString(wire.length_delimited(wire.FIELD_1, event.body))

    # Leases ------------------------------------------------------------------------------------------------

    async def AcquireLease(
        self, request: session_pb2.AcquireLeaseRequest, context: grpc.aio.ServicerContext
    ) -> session_pb2.AcquireLeaseResponse:
        record = await self._store.acquire_lease(
            validate.session_id(request.session_id),
            holder=_holder(request.holder),
            ttl_us=_ttl_us(request.ttl, "ttl"),
        )
        session = session_message(record)
        return session_pb2.AcquireLeaseResponse(lease=session.lease, session=session)

    async def RenewLease(
        self, request: session_pb2.RenewLeaseRequest, context: grpc.aio.ServicerContext
    ) -> session_pb2.RenewLeaseResponse:
        if request.epoch < 1:
            raise InvalidArgument.field("epoch", "must be the epoch AcquireLease returned (at least 1)")
        record = await self._store.renew_lease(
            validate.session_id(request.session_id),
            holder=_holder(request.holder),
            epoch=request.epoch,
            ttl_us=_ttl_us(request.ttl, "ttl"),
        )
        return session_pb2.RenewLeaseResponse(lease=_lease(record))

    async def ReleaseLease(
        self, request: session_pb2.ReleaseLeaseRequest, context: grpc.aio.ServicerContext
    ) -> session_pb2.ReleaseLeaseResponse:
        if request.epoch < 1:
            raise InvalidArgument.field("epoch", "must be the epoch AcquireLease returned (at least 1)")
        record = await self._store.release_lease(
            validate.session_id(request.session_id),
            holder=_holder(request.holder),
            epoch=request.epoch,
        )
        return session_pb2.ReleaseLeaseResponse(lease=_lease(record))
