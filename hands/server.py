"""`HandsService` servicer: checks requests and translates between protobuf and the sandbox manager."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import grpc
from google.protobuf import json_format, struct_pb2

from hands import disk
from hands.backend import Limits
from hands.config import label_problem
from hands.egress_relay import secrets_from
from hands.git_relay import check_token, repositories_from
from hands.sandboxes import DESTROYED, LOST, Sandbox, SandboxManager
from hands.tools import bash, text_editor
from managed_agents.mesh import paging
from managed_agents.mesh.errors import InvalidArgument, LabelsNotCarried
from managed_agents.mesh.ids import is_key, is_resource_id
from managed_agents.mesh.metrics import ServiceMetrics
from managed_agents.v1 import hands_pb2, hands_pb2_grpc, sandbox_pb2

SERVICE_NAME = hands_pb2.DESCRIPTOR.services_by_name["HandsService"].full_name
MAX_INPUT_BYTES = 1 << 20
MAX_LABELS = 16
_STATES = {
    "ready": sandbox_pb2.SANDBOX_STATE_READY,
    LOST: sandbox_pb2.SANDBOX_STATE_LOST,
    DESTROYED: sandbox_pb2.SANDBOX_STATE_DESTROYED,
}


def tool_specs() -> list[sandbox_pb2.ToolSpec]:
    """The tools every sandbox offers."""
    specs = []
    for module in (bash, text_editor):
        schema = struct_pb2.Struct()
        schema.update(module.SCHEMA)
        specs.append(
            sandbox_pb2.ToolSpec(
                name=module.NAME,
                description=module.DESCRIPTION,
                input_schema=schema,
                anthropic_type=module.ANTHROPIC_TYPE,
                safe_to_retry=False,
            )
        )
    return specs


def check_labels(asked: Mapping[str, str], carried: Mapping[str, str]) -> None:
    """Refuses a sandbox whose placement labels this server does not carry (the router then tries another)."""
    if len(asked) > MAX_LABELS:
        raise InvalidArgument.field("resources.labels", f"at most {MAX_LABELS} labels (got {len(asked)})")
    for key, value in asked.items():
        if problem := label_problem(key, value):
            raise InvalidArgument.field("resources.labels", problem)
    missing = sorted(f"{k}={v}" for k, v in asked.items() if carried.get(k) != v)
    if missing:
        has = ", ".join(f"{k}={v}" for k, v in sorted(carried.items())) or "none"
        raise LabelsNotCarried(
            f"this hands server does not carry the labels {', '.join(missing)} (its labels: {has})",
            metadata={"missing": ",".join(missing)},
        )


def limits_from(resources: sandbox_pb2.Resources, defaults: Limits, *, docker: bool) -> Limits:
    """The limits a `Provision` asks for, checked against the documented bounds, defaults filled in."""

    def check(field: str, value: float, low: float, high: float) -> None:
        if not low <= value <= high:
            raise InvalidArgument.field(f"resources.{field}", f"must be between {low:g} and {high:g} (got {value:g})")

    limits = defaults
    if resources.memory_bytes:
        check("memory_bytes", resources.memory_bytes, 16 << 20, 1 << 40)
        limits = replace(limits, memory_bytes=resources.memory_bytes)
    if resources.max_processes:
        check("max_processes", resources.max_processes, 1, 65536)
        limits = replace(limits, max_processes=resources.max_processes)
    if resources.cpu_millis:
        check("cpu_millis", resources.cpu_millis, 10, 64000)
        limits = replace(limits, cpu_millis=resources.cpu_millis)
    if resources.disk_bytes:
        check("disk_bytes", resources.disk_bytes, disk.MIN_BYTES, disk.MAX_BYTES)
        limits = replace(limits, disk_bytes=resources.disk_bytes)
    if resources.HasField("command_timeout"):
        seconds = resources.command_timeout.ToNanoseconds() / 1e9
        check("command_timeout", seconds, 0.1, 3600)
        limits = replace(limits, command_timeout_s=seconds)
    if resources.HasField("idle_ttl"):
        seconds = resources.idle_ttl.ToNanoseconds() / 1e9
        check("idle_ttl", seconds, 1, 7 * 86400)
        limits = replace(limits, idle_ttl_s=seconds)
    if resources.network not in (
        sandbox_pb2.NETWORK_POLICY_UNSPECIFIED,
        sandbox_pb2.NETWORK_POLICY_NONE,
        sandbox_pb2.NETWORK_POLICY_EGRESS_RELAY,
    ):
        raise InvalidArgument.field("resources.network", f"{int(resources.network)} is not a NetworkPolicy")
    if resources.image:
        if not docker:
            raise InvalidArgument.field("resources.image", "images need --backend docker; this server runs bwrap")
        limits = replace(limits, image=resources.image)
    return limits


def sandbox_message(sandbox: Sandbox, manager: SandboxManager) -> sandbox_pb2.Sandbox:
    """The `Sandbox` resource."""
    limits = sandbox.limits
    message = sandbox_pb2.Sandbox(
        id=sandbox.id,
        state=_STATES[sandbox.state],
        backend=manager.backend.name,
        lost_reason=sandbox.lost_reason,
        session_id=sandbox.session_id,
        hands_instance=manager.instance,
        resources=sandbox_pb2.Resources(
            memory_bytes=limits.memory_bytes,
            max_processes=limits.max_processes,
            cpu_millis=limits.cpu_millis,
            network=sandbox_pb2.NETWORK_POLICY_EGRESS_RELAY if sandbox.secrets else sandbox_pb2.NETWORK_POLICY_NONE,
            image=limits.image,
            disk_bytes=limits.disk_bytes,
            secrets=[sandbox_pb2.SandboxSecret(env=s.env, credential=s.credential) for s in sandbox.secrets],
        ),
    )
    posture = manager.backend.posture
    identity = sandbox.identity
    message.isolation.CopyFrom(
        sandbox_pb2.SandboxIsolation(
            user_namespace=posture.user_namespace,
            host_uid=identity.uid if identity else 0,
            host_gid=identity.gid if identity else 0,
            syscall_filter=posture.seccomp,
            read_only_system=posture.read_only_system,
        )
    )
    message.enforcement = int(manager.backend.enforcement)  # type: ignore[assignment]  # same numbers as the enum
    message.resources.command_timeout.FromNanoseconds(int(limits.command_timeout_s * 1e9))
    message.resources.idle_ttl.FromNanoseconds(int(limits.idle_ttl_s * 1e9))
    message.create_time.FromNanoseconds(int(sandbox.create_time * 1e9))
    message.last_used_time.FromNanoseconds(int(max(sandbox.last_used, sandbox.create_time) * 1e9))
    return message


def tool_arguments(struct: struct_pb2.Struct) -> dict[str, Any]:
    """A tool input as plain JSON values. `Struct` stores every number as a double, so whole numbers become
    ints again: tools expect `view_range: [2, 3]`, not `[2.0, 3.0]`."""

    def clean(value: Any) -> Any:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, list):
            return [clean(v) for v in value]
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        return value

    cleaned: dict[str, Any] = clean(json_format.MessageToDict(struct))
    return cleaned


def _sandbox_id(value: str) -> str:
    if not value:
        raise InvalidArgument.field("sandbox_id", "is required")
    if not is_resource_id(value):
        raise InvalidArgument.field("sandbox_id", f"{value[:80]!r} is not a sandbox id")
    return value


class HandsServicer(hands_pb2_grpc.HandsServiceServicer):
    """Serves `managed_agents.v1.HandsService` from a `SandboxManager`."""

    def __init__(
        self,
        manager: SandboxManager,
        defaults: Limits,
        labels: Mapping[str, str] | None = None,
        metrics: ServiceMetrics | None = None,
    ) -> None:
        self._manager = manager
        self._defaults = defaults
        self._labels = dict(labels or {})
        metrics = metrics or ServiceMetrics.disabled()
        self._executions = metrics.counter("managed_agents.hands.executions", "tool calls run, by tool and outcome")
        self._execute_time = metrics.latency("managed_agents.hands.execute_duration", "time of one tool call")
        metrics.gauge(
            "managed_agents.hands.sandboxes_live",
            "sandboxes ready for calls",
            lambda: sum(1 for s in manager.list() if s.state == "ready"),
        )

    async def Provision(
        self, request: hands_pb2.ProvisionRequest, context: grpc.aio.ServicerContext
    ) -> hands_pb2.ProvisionResponse:
        if request.request_id and not is_key(request.request_id):
            raise InvalidArgument.field("request_id", "must be 1 to 128 characters of [A-Za-z0-9._:-]")
        if request.session_id and not is_resource_id(request.session_id):
            raise InvalidArgument.field("session_id", "is not a session id")
        check_labels(request.resources.labels, self._labels)
        limits = limits_from(request.resources, self._defaults, docker=self._manager.backend.name == "docker")
        repositories = repositories_from(request.resources)
        secrets = secrets_from(request.resources)
        token = check_token(request.credential_token)
        if (repositories or secrets) and not token:
            raise InvalidArgument.field(
                "credential_token",
                "is required when resources.repositories or resources.secrets names any (mint one with "
                "MintSessionToken)",
            )
        sandbox = await self._manager.provision(
            limits,
            session_id=request.session_id,
            request_id=request.request_id,
            repositories=repositories,
            secrets=secrets,
            credential_token=token,
        )
        return hands_pb2.ProvisionResponse(sandbox=sandbox_message(sandbox, self._manager))

    async def Execute(
        self, request: hands_pb2.ExecuteRequest, context: grpc.aio.ServicerContext
    ) -> hands_pb2.ExecuteResponse:
        sandbox_id = _sandbox_id(request.sandbox_id)
        if not is_key(request.execution_id):
            raise InvalidArgument.field("execution_id", "must be 1 to 128 characters of [A-Za-z0-9._:-]")
        if not request.name or len(request.name) > 64:
            raise InvalidArgument.field("name", "must be a tool name of 1 to 64 characters")
        if request.input.ByteSize() > MAX_INPUT_BYTES:
            raise InvalidArgument.field("input", "is larger than 1 MiB")
        timeout = request.timeout.ToNanoseconds() / 1e9 if request.HasField("timeout") else None
        if timeout is not None and not 0 < timeout <= 3600:
            raise InvalidArgument.field("timeout", "must be more than 0 and at most 1 h")
        if request.credential_token:
            self._manager.update_credential_token(self._manager.get(sandbox_id), check_token(request.credential_token))
        result = await self._manager.execute(
            sandbox_id, request.execution_id, request.name, tool_arguments(request.input), timeout
        )
        if not result.replayed:
            outcome = hands_pb2.ExecutionStatus.Name(int(result.status)).removeprefix("EXECUTION_STATUS_").lower()  # type: ignore[arg-type]
            self._executions.add(1, {"tool": request.name, "status": outcome, "error": result.is_error})
            self._execute_time.record(result.duration_s, {"tool": request.name})
        response = hands_pb2.ExecuteResponse(
            output=result.output,
            is_error=result.is_error,
            status=int(result.status),  # type: ignore[arg-type]
            truncated=result.truncated,
            replayed=result.replayed,
            sandbox_lost=result.sandbox_lost,
        )
        if result.exit_code is not None:
            response.exit_code = result.exit_code
        response.duration.FromNanoseconds(int(result.duration_s * 1e9))
        return response

    async def Destroy(
        self, request: hands_pb2.DestroyRequest, context: grpc.aio.ServicerContext
    ) -> hands_pb2.DestroyResponse:
        sandbox = await self._manager.destroy(_sandbox_id(request.sandbox_id))
        return hands_pb2.DestroyResponse(sandbox=sandbox_message(sandbox, self._manager))

    async def GetSandbox(
        self, request: hands_pb2.GetSandboxRequest, context: grpc.aio.ServicerContext
    ) -> hands_pb2.GetSandboxResponse:
        sandbox = await self._manager.refresh(self._manager.get(_sandbox_id(request.sandbox_id)))
        return hands_pb2.GetSandboxResponse(sandbox=sandbox_message(sandbox, self._manager))

    async def ListSandboxes(
        self, request: hands_pb2.ListSandboxesRequest, context: grpc.aio.ServicerContext
    ) -> hands_pb2.ListSandboxesResponse:
        if request.page_size < 0:
            raise InvalidArgument.field("page_size", "must not be negative")
        if request.state not in sandbox_pb2.SandboxState.values():
            raise InvalidArgument.field("state", f"{request.state} is not a known SandboxState")
        size = min(request.page_size or 100, 1000)
        start = 0
        if request.page_token:
            offset = paging.decode(request.page_token, {"s": request.state}).get("o")
            # A token is caller input: a forged one must be refused, not crash the listing.
            if type(offset) is not int or not 0 <= offset <= 1 << 31:
                raise InvalidArgument.field("page_token", "is not a token this server issued")
            start = offset
        chosen = []
        for sandbox in self._manager.list():
            await self._manager.refresh(sandbox)
            state = _STATES[sandbox.state]
            if (request.state and state == request.state) or (not request.state and sandbox.state != DESTROYED):
                chosen.append(sandbox)
        page = chosen[start : start + size]
        response = hands_pb2.ListSandboxesResponse(sandboxes=[sandbox_message(s, self._manager) for s in page])
        if start + size < len(chosen):
            response.next_page_token = paging.encode({"o": start + size}, {"s": request.state})
        return response

    async def ListTools(
        self, request: hands_pb2.ListToolsRequest, context: grpc.aio.ServicerContext
    ) -> hands_pb2.ListToolsResponse:
        if request.sandbox_id:
            self._manager.get(_sandbox_id(request.sandbox_id))
        return hands_pb2.ListToolsResponse(tools=tool_specs())
