"""Typed async client of the session store, for the other services, the CLI and the tests.

Methods return the contract's protobuf messages and raise `MeshError` subclasses (e.g. `SessionNotFound`,
`LeaseFenced`, and the store's own `DataLoss` and `WatchTooSlow` from `session_store.errors`) rather than raw
gRPC errors.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

import grpc
from google.protobuf import duration_pb2
from opentelemetry.sdk.trace import TracerProvider

from managed_agents.mesh.calls import translated_errors
from managed_agents.mesh.channel import dial
from managed_agents.mesh.tls import MeshTls
from managed_agents.v1 import events_pb2, session_pb2, session_pb2_grpc
from session_store.errors import WatchTooSlow
from session_store.server import SERVICE_NAME

# Reads are safe to repeat; the channel retries them when the store is briefly unavailable.
_RETRIED = [(SERVICE_NAME, m) for m in ("GetSession", "GetEvents", "ListSessions")]


def _duration(seconds: float) -> duration_pb2.Duration:
    value = duration_pb2.Duration()
    value.FromNanoseconds(int(seconds * 1e9))
    return value


class SessionStoreClient:
    """Client of `managed_agents.v1.SessionService`."""

    def __init__(self, channel: grpc.aio.Channel, *, owns_channel: bool = False) -> None:
        self._channel = channel
        self._owns_channel = owns_channel
        self._stub = session_pb2_grpc.SessionServiceStub(channel)

    @classmethod
    def connect(
        cls,
        target: str,
        *,
        tracer_provider: TracerProvider | None = None,
        mesh_secret: str = "",
        tls: MeshTls | None = None,
    ) -> SessionStoreClient:
        """A client with its own channel to `target`; close it with `aclose()`."""
        channel = dial(
            target, tracer_provider=tracer_provider, retry_methods=_RETRIED, mesh_secret=mesh_secret, tls=tls
        )
        return cls(channel, owns_channel=True)

    async def aclose(self) -> None:
        """Closes the channel if this client opened it."""
        if self._owns_channel:
            await self._channel.close()

    async def __aenter__(self) -> SessionStoreClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

    async def create_session(
        self,
        *,
        session_id: str = "",
        title: str = "",
        agent: session_pb2.AgentConfig | None = None,
        metadata: dict[str, str] | None = None,
    ) -> session_pb2.Session:
        """Creates a session (with the given id, or a generated one)."""
        session = session_pb2.Session(title=title, metadata=metadata or {})
        if agent is not None:
            session.agent.CopyFrom(agent)
        with translated_errors():
            response: session_pb2.CreateSessionResponse = await self._stub.CreateSession(
                session_pb2.CreateSessionRequest(session=session, session_id=session_id)
            )
        return response.session

    async def get_session(
        self,
        session_id: str,
        *,
        after_seq: int = 0,
        page_size: int = 0,
        page_token: str = "",
        view: session_pb2.SessionView.ValueType = session_pb2.SESSION_VIEW_FULL,
    ) -> session_pb2.GetSessionResponse:
        """One page of `GetSession`."""
        with translated_errors():
            response: session_pb2.GetSessionResponse = await self._stub.GetSession(
                session_pb2.GetSessionRequest(
                    session_id=session_id,
                    after_seq=after_seq,
                    page_size=page_size,
                    page_token=page_token,
                    view=view,
                )
            )
        return response

    async def read_session(
        self, session_id: str, *, after_seq: int = 0
    ) -> tuple[session_pb2.Session, list[events_pb2.Event]]:
        """The session and all its events after `after_seq`, following every page."""
        page = await self.get_session(session_id, after_seq=after_seq, page_size=10_000)
        events = list(page.events)
        while page.next_page_token:
            page = await self.get_session(
                session_id, after_seq=after_seq, page_size=10_000, page_token=page.next_page_token
            )
            events.extend(page.events)
        return page.session, events

    async def list_sessions(
        self,
        *,
        status: events_pb2.SessionStatus.ValueType = events_pb2.SESSION_STATUS_UNSPECIFIED,
        orphaned_only: bool = False,
        page_size: int = 0,
        page_token: str = "",
    ) -> session_pb2.ListSessionsResponse:
        """One page of sessions, newest first."""
        with translated_errors():
            response: session_pb2.ListSessionsResponse = await self._stub.ListSessions(
                session_pb2.ListSessionsRequest(
                    status=status,
                    orphaned_only=orphaned_only,
                    page_size=page_size,
                    page_token=page_token,
                )
            )
        return response

    async def emit(
        self,
        session_id: str,
        event: events_pb2.Event,
        *,
        idempotency_key: str = "",
        expected_seq: int | None = None,
        lease_epoch: int = 0,
    ) -> session_pb2.EmitEventResponse:
        """Appends one event; returns the stored event (or, on a retried key, the first one)."""
        request = session_pb2.EmitEventRequest(
            session_id=session_id,
            event=event,
            idempotency_key=idempotency_key,
            lease_epoch=lease_epoch,
        )
        if expected_seq is not None:
            request.expected_seq = expected_seq
        with translated_errors():
            response: session_pb2.EmitEventResponse = await self._stub.EmitEvent(request)
        return response

    async def emit_batch(
        self,
        session_id: str,
        events: Sequence[events_pb2.Event],
        *,
        idempotency_key: str = "",
        expected_seq: int | None = None,
        lease_epoch: int = 0,
    ) -> session_pb2.BatchEmitEventsResponse:
        """Appends events atomically and in order."""
        request = session_pb2.BatchEmitEventsRequest(
            session_id=session_id,
            events=events,
            idempotency_key=idempotency_key,
            lease_epoch=lease_epoch,
        )
        if expected_seq is not None:
            request.expected_seq = expected_seq
        with translated_errors():
            response: session_pb2.BatchEmitEventsResponse = await self._stub.BatchEmitEvents(request)
        return response

    async def get_events(
        self,
        session_id: str,
        *,
        start_seq: int = 0,
        end_seq: int = 0,
        last: int = 0,
        page_size: int = 0,
        page_token: str = "",
    ) -> session_pb2.GetEventsResponse:
        """One page of a positional slice of the log."""
        with translated_errors():
            response: session_pb2.GetEventsResponse = await self._stub.GetEvents(
                session_pb2.GetEventsRequest(
                    session_id=session_id,
                    start_seq=start_seq,
                    end_seq=end_seq,
                    last=last,
                    page_size=page_size,
                    page_token=page_token,
                )
            )
        return response

    async def watch(
        self, session_id: str, *, after_seq: int = 0, resume_when_behind: bool = True
    ) -> AsyncIterator[events_pb2.Event]:
        """Events after `after_seq`, then live ones, until the caller stops iterating. If the store ends the
        stream because the caller read too slowly (`WatchTooSlow`), the watch resumes after the last event
        yielded, so the caller misses nothing; with `resume_when_behind=False` the error is raised instead."""
        cursor = after_seq
        while True:
            call = self._stub.WatchSession(session_pb2.WatchSessionRequest(session_id=session_id, after_seq=cursor))
            try:
                with translated_errors():
                    async for response in call:
                        cursor = response.event.seq
                        yield response.event
                return
            except WatchTooSlow:
                if not resume_when_behind:
                    raise
            finally:
                call.cancel()

    async def acquire_lease(self, session_id: str, *, holder: str, ttl: float = 0) -> session_pb2.AcquireLeaseResponse:
        """Takes the session's lease (or extends it for the same holder)."""
        with translated_errors():
            response: session_pb2.AcquireLeaseResponse = await self._stub.AcquireLease(
                session_pb2.AcquireLeaseRequest(session_id=session_id, holder=holder, ttl=_duration(ttl))
            )
        return response

    async def renew_lease(self, session_id: str, *, holder: str, epoch: int, ttl: float = 0) -> session_pb2.Lease:
        """Extends a held lease; raises `LeaseFenced` if it moved on."""
        with translated_errors():
            response: session_pb2.RenewLeaseResponse = await self._stub.RenewLease(
                session_pb2.RenewLeaseRequest(session_id=session_id, holder=holder, epoch=epoch, ttl=_duration(ttl))
            )
        return response.lease

    async def release_lease(self, session_id: str, *, holder: str, epoch: int) -> session_pb2.Lease:
        """Gives a held lease up."""
        with translated_errors():
            response: session_pb2.ReleaseLeaseResponse = await self._stub.ReleaseLease(
                session_pb2.ReleaseLeaseRequest(session_id=session_id, holder=holder, epoch=epoch)
            )
        return response.lease
