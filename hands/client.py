"""Typed async client of hands, for the brain, the CLI and the tests."""

from __future__ import annotations

from collections.abc import Mapping

import grpc
from google.protobuf import duration_pb2, struct_pb2
from opentelemetry.sdk.trace import TracerProvider

from hands.server import SERVICE_NAME
from managed_agents.mesh.calls import translated_errors
from managed_agents.mesh.channel import dial
from managed_agents.mesh.tls import MeshTls
from managed_agents.v1 import hands_pb2, hands_pb2_grpc, sandbox_pb2

# Execute is idempotent on its execution id, so it is retried with the reads.
_RETRIED = [(SERVICE_NAME, m) for m in ("Execute", "GetSandbox", "ListSandboxes", "ListTools")]


class HandsClient:
    """Client of `managed_agents.v1.HandsService`."""

    def __init__(self, channel: grpc.aio.Channel, *, owns_channel: bool = False) -> None:
        self._channel = channel
        self._owns_channel = owns_channel
        self._stub = hands_pb2_grpc.HandsServiceStub(channel)

    @classmethod
    def connect(
        cls,
        target: str,
        *,
        tracer_provider: TracerProvider | None = None,
        mesh_secret: str = "",
        tls: MeshTls | None = None,
    ) -> HandsClient:
        """A client with its own channel to `target`; close it with `aclose()`."""
        channel = dial(
            target, tracer_provider=tracer_provider, retry_methods=_RETRIED, mesh_secret=mesh_secret, tls=tls
        )
        return cls(channel, owns_channel=True)

    async def aclose(self) -> None:
        """Closes the channel if this client opened it."""
        if self._owns_channel:
            await self._channel.close()

    async def __aenter__(self) -> HandsClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

    async def provision(
        self,
        *,
        resources: sandbox_pb2.Resources | None = None,
        session_id: str = "",
        request_id: str = "",
        credential_token: str = "",
    ) -> sandbox_pb2.Sandbox:
        """A ready sandbox (the same one again for a repeated `request_id`), its repositories cloned."""
        request = hands_pb2.ProvisionRequest(
            session_id=session_id, request_id=request_id, credential_token=credential_token
        )
        if resources is not None:
            request.resources.CopyFrom(resources)
        with translated_errors():
            response: hands_pb2.ProvisionResponse = await self._stub.Provision(request)
        return response.sandbox

    async def execute(
        self,
        sandbox_id: str,
        *,
        execution_id: str,
        name: str,
        input: Mapping[str, object] | struct_pb2.Struct,
        timeout: float | None = None,
        credential_token: str = "",
    ) -> hands_pb2.ExecuteResponse:
        """Runs one tool call (or returns the stored result of this execution id)."""
        if isinstance(input, struct_pb2.Struct):
            arguments = input
        else:
            arguments = struct_pb2.Struct()
            arguments.update(dict(input))  # type: ignore[arg-type]  # JSON-like values
        request = hands_pb2.ExecuteRequest(
            sandbox_id=sandbox_id,
            execution_id=execution_id,
            name=name,
            input=arguments,
            credential_token=credential_token,
        )
        deadline = None
        if timeout is not None:
            request.timeout.CopyFrom(duration_pb2.Duration(seconds=int(timeout), nanos=int(timeout % 1 * 1e9)))
            deadline = timeout + 30  # the server stops the command at `timeout`; this bounds the RPC itself
        with translated_errors():
            response: hands_pb2.ExecuteResponse = await self._stub.Execute(request, timeout=deadline)
        return response

    async def destroy(self, sandbox_id: str) -> sandbox_pb2.Sandbox:
        """Removes a sandbox and all it holds."""
        with translated_errors():
            response: hands_pb2.DestroyResponse = await self._stub.Destroy(
                hands_pb2.DestroyRequest(sandbox_id=sandbox_id)
            )
        return response.sandbox

    async def get_sandbox(self, sandbox_id: str) -> sandbox_pb2.Sandbox:
        """A sandbox's state."""
        with translated_errors():
            response: hands_pb2.GetSandboxResponse = await self._stub.GetSandbox(
                hands_pb2.GetSandboxRequest(sandbox_id=sandbox_id)
            )
        return response.sandbox

    async def list_sandboxes(
        self, *, state: int = 0, page_size: int = 0, page_token: str = ""
    ) -> hands_pb2.ListSandboxesResponse:
        """One page of this server's sandboxes."""
        with translated_errors():
            response: hands_pb2.ListSandboxesResponse = await self._stub.ListSandboxes(
                hands_pb2.ListSandboxesRequest(state=state, page_size=page_size, page_token=page_token)  # type: ignore[arg-type]
            )
        return response

    async def list_tools(self, sandbox_id: str = "") -> list[sandbox_pb2.ToolSpec]:
        """The tools sandboxes offer, with their schemas."""
        with translated_errors():
            response: hands_pb2.ListToolsResponse = await self._stub.ListTools(
                hands_pb2.ListToolsRequest(sandbox_id=sandbox_id)
            )
        return list(response.tools)
