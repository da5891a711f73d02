"""`BrainService` servicer: checks requests and hands them to the harness."""

from __future__ import annotations

import grpc

from brain.harness import Harness
from managed_agents.mesh.errors import InvalidArgument
from managed_agents.mesh.ids import is_resource_id
from managed_agents.v1 import brain_pb2, brain_pb2_grpc

SERVICE_NAME = brain_pb2.DESCRIPTOR.services_by_name["BrainService"].full_name


def _session_id(value: str) -> str:
    if not value:
        raise InvalidArgument.field("session_id", "is required")
    if not is_resource_id(value):
        raise InvalidArgument.field("session_id", f"{value[:80]!r} is not 1 to 64 characters of [A-Za-z0-9_-]")
    return value


class BrainServicer(brain_pb2_grpc.BrainServiceServicer):
    """Serves `managed_agents.v1.BrainService` from a `Harness`."""

    def __init__(self, harness: Harness) -> None:
        self._harness = harness

    async def Wake(self, request: brain_pb2.WakeRequest, context: grpc.aio.ServicerContext) -> brain_pb2.WakeResponse:
        result = await self._harness.wake(_session_id(request.session_id))
        return brain_pb2.WakeResponse(
            outcome=result.outcome,  # type: ignore[arg-type]  # the harness uses the WakeOutcome numbers
            holder=result.holder,
            lease_epoch=result.epoch,
        )

    async def Interrupt(
        self, request: brain_pb2.InterruptRequest, context: grpc.aio.ServicerContext
    ) -> brain_pb2.InterruptResponse:
        if len(request.reason) > 1024:
            raise InvalidArgument.field("reason", "is longer than 1024 characters")
        seq, was_running = await self._harness.interrupt(_session_id(request.session_id), request.reason)
        return brain_pb2.InterruptResponse(seq=seq, was_running=was_running)
