"""Several hands servers behind the brain's one `Hands` interface.

Placement: a new sandbox goes to the reachable hands server with the fewest live sandboxes (ties broken at
random), so load spreads and a server that is down is skipped. A sandbox that asks for placement labels
(`resources.labels`, e.g. `gpu=a100`) goes to the least loaded server carrying all of them: servers that do
not refuse it, and the next is asked. Routing: a sandbox stays with the server that
made it; the brain remembers the owner, and a brain that never saw the sandbox (it woke the session after
another brain died) asks the servers which one has it. No mapping is stored anywhere but in the servers
themselves, so any brain can reach any sandbox.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Mapping, Sequence

from google.protobuf import struct_pb2

from hands.client import HandsClient
from managed_agents.mesh.errors import LabelsNotCarried, MeshError, SandboxNotFound, Unavailable
from managed_agents.v1 import hands_pb2, sandbox_pb2


class HandsRouter:
    """Places sandboxes on, and routes calls to, several hands servers."""

    def __init__(self, servers: Sequence[HandsClient]) -> None:
        self._servers = list(servers)
        self._owners: dict[str, HandsClient] = {}

    async def _load(self, server: HandsClient) -> int | None:
        try:
            page = await server.list_sandboxes(state=sandbox_pb2.SANDBOX_STATE_READY, page_size=1000)
        except MeshError:
            return None
        return len(page.sandboxes)

    async def provision(
        self,
        *,
        resources: sandbox_pb2.Resources | None = None,
        session_id: str = "",
        request_id: str = "",
        credential_token: str = "",
    ) -> sandbox_pb2.Sandbox:
        """A sandbox on the least loaded reachable server."""
        loads = await asyncio.gather(*(self._load(s) for s in self._servers))
        candidates = [
            (load, random.random(), s) for load, s in zip(loads, self._servers, strict=True) if load is not None
        ]
        if not candidates:
            raise Unavailable("no hands server is reachable to provision a sandbox")
        refusals: list[str] = []
        for _, _, server in sorted(candidates, key=lambda c: (c[0], c[1])):
            try:
                sandbox = await server.provision(
                    resources=resources, session_id=session_id, request_id=request_id, credential_token=credential_token
                )
            except Unavailable:
                continue
            except LabelsNotCarried as refused:
                refusals.append(refused.message)
                continue
            self._owners[sandbox.id] = server
            return sandbox
        if refusals and len(refusals) == len(candidates):
            asked = ", ".join(f"{k}={v}" for k, v in sorted(resources.labels.items())) if resources else ""
            raise LabelsNotCarried(f"no reachable hands server carries the labels {asked}")
        raise Unavailable("every hands server failed to provision a sandbox")

    async def _owner(self, sandbox_id: str) -> HandsClient:
        owner = self._owners.get(sandbox_id)
        if owner is not None:
            return owner
        unreachable = 0

        async def probe(server: HandsClient) -> HandsClient | None:
            nonlocal unreachable
            try:
                await server.get_sandbox(sandbox_id)
            except SandboxNotFound:
                return None
            except MeshError:
                unreachable += 1
                return None
            return server

        for found in await asyncio.gather(*(probe(s) for s in self._servers)):
            if found is not None:
                self._owners[sandbox_id] = found
                return found
        if unreachable:
            raise Unavailable(f"cannot tell which hands server has sandbox {sandbox_id}: {unreachable} unreachable")
        raise SandboxNotFound(f"no hands server has sandbox {sandbox_id}")

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
        """Runs a call on the sandbox's own server."""
        owner = await self._owner(sandbox_id)
        return await owner.execute(
            sandbox_id,
            execution_id=execution_id,
            name=name,
            input=input,
            timeout=timeout,
            credential_token=credential_token,
        )

    async def list_tools(self, sandbox_id: str = "") -> list[sandbox_pb2.ToolSpec]:
        """The tools, from the first server that answers (every server offers the same ones)."""
        error: MeshError = Unavailable("no hands server is configured")
        for server in random.sample(self._servers, len(self._servers)):
            try:
                return await server.list_tools(sandbox_id)
            except MeshError as failure:
                error = failure
        raise error

    async def aclose(self) -> None:
        """Closes every client."""
        for server in self._servers:
            await server.aclose()
