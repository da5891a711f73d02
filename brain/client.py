"""Typed async client of the brain, for the CLI, other services and tests."""

from __future__ import annotations

import grpc
from opentelemetry.sdk.trace import TracerProvider

from brain.server import SERVICE_NAME
from managed_agents.mesh.calls import translated_errors
from managed_agents.mesh.channel import dial
from managed_agents.mesh.tls import MeshTls
from managed_agents.v1 import brain_pb2, brain_pb2_grpc


class BrainClient:
    """Client of `managed_agents.v1.BrainService`."""

    def __init__(self, channel: grpc.aio.Channel, *, owns_channel: bool = False) -> None:
        self._channel = channel
        self._owns_channel = owns_channel
        self._stub = brain_pb2_grpc.BrainServiceStub(channel)

    @classmethod
    def connect(
        cls,
        target: str,
        *,
        tracer_provider: TracerProvider | None = None,
        mesh_secret: str = "",
        tls: MeshTls | None = None,
    ) -> BrainClient:
        """A client with its own channel; Wake is idempotent, so it is retried while the brain is down."""
        channel = dial(
            target,
            tracer_provider=tracer_provider,
            retry_methods=[(SERVICE_NAME, "Wake")],
            mesh_secret=mesh_secret,
            tls=tls,
        )
        return cls(channel, owns_channel=True)

    async def aclose(self) -> None:
        """Closes the channel if this client opened it."""
        if self._owns_channel:
            await self._channel.close()

    async def __aenter__(self) -> BrainClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

    async def wake(self, session_id: str) -> brain_pb2.WakeResponse:
        """Makes sure a session with work to do is being driven."""
        with translated_errors():
            response: brain_pb2.WakeResponse = await self._stub.Wake(brain_pb2.WakeRequest(session_id=session_id))
        return response

    async def interrupt(self, session_id: str, reason: str = "") -> brain_pb2.InterruptResponse:
        """Stops the running turn at the next safe point."""
        with translated_errors():
            response: brain_pb2.InterruptResponse = await self._stub.Interrupt(
                brain_pb2.InterruptRequest(session_id=session_id, reason=reason)
            )
        return response
