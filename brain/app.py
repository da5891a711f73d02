"""Assembles a running brain: store and hands clients, the model, the harness, the orphan scanner, and the
`BrainService` server. `__main__` and the tests build it the same way."""

from __future__ import annotations

import os

from opentelemetry.sdk.trace import TracerProvider

from brain.config import BrainConfig, default_holder
from brain.context import ClearThenSummarize
from brain.hands_router import HandsRouter
from brain.harness import Harness, HarnessConfig
from brain.model import AnthropicModel, ModelClient
from brain.server import SERVICE_NAME, BrainServicer
from hands.client import HandsClient
from managed_agents.mesh.errors import SandboxUnavailable
from managed_agents.mesh.failpoints import Failpoints
from managed_agents.mesh.metrics import ServiceMetrics
from managed_agents.mesh.server import MeshServer, Service
from managed_agents.v1 import brain_pb2_grpc, hands_pb2, sandbox_pb2
from mcp_proxy.client import McpProxyClient
from session_store.client import SessionStoreClient


class NoHands:
    """Hands for a brain run without a hands server: no sandbox tools are offered, so none are called."""

    async def provision(self, **_: object) -> sandbox_pb2.Sandbox:
        raise SandboxUnavailable("this brain runs without a hands server (--hands is empty)")

    async def execute(self, *_: object, **__: object) -> hands_pb2.ExecuteResponse:
        raise SandboxUnavailable("this brain runs without a hands server (--hands is empty)")

    async def list_tools(self, *_: object) -> list[sandbox_pb2.ToolSpec]:
        return []

    async def aclose(self) -> None:
        return None


class BrainServer:
    """A brain that is serving; `aclose()` stops its runs (releasing their leases) and the server."""

    def __init__(
        self, server: MeshServer, harness: Harness, closers: list[object], metrics: ServiceMetrics | None = None
    ) -> None:
        """`closers` are closed in order on `aclose()`."""
        self.metrics = metrics or ServiceMetrics.disabled()
        self.server = server
        self.harness = harness
        self._closers = closers

    @property
    def address(self) -> str:
        """Bound `host:port`."""
        return self.server.address

    async def aclose(self, grace: float = 5.0) -> None:
        """Stops accepting calls, stops every run, closes clients."""
        await self.server.stop(grace)
        await self.harness.aclose()
        for closer in self._closers:
            await closer.aclose()  # type: ignore[attr-defined]


def harness_config(config: BrainConfig, holder: str) -> HarnessConfig:
    """The loop's knobs from the process configuration."""
    return HarnessConfig(
        holder=holder,
        model=config.model,
        max_tokens=config.max_tokens,
        max_steps=config.max_steps,
        context_budget_tokens=config.context_budget_tokens,
        lease_ttl=config.lease_ttl,
        scan_interval=config.scan_interval,
        model_attempts=config.model_attempts,
        retry_base_delay=config.retry_base_delay,
    )


async def start(
    config: BrainConfig,
    tracer_provider: TracerProvider | None,
    *,
    model: ModelClient | None = None,
    holder: str | None = None,
) -> BrainServer:
    """Connects to the store (and hands), starts the scanner and serves."""
    if model is None:
        if not config.api_key:
            raise RuntimeError(
                "ANTHROPIC_API_KEY is not set: set it for Claude, or point ANTHROPIC_BASE_URL at a stand-in "
                "(python -m managed_agents.standin) and set ANTHROPIC_API_KEY to any value"
            )
        model = AnthropicModel(api_key=config.api_key, base_url=config.base_url or None)
    store = SessionStoreClient.connect(
        config.store, tracer_provider=tracer_provider, mesh_secret=config.mesh_secret, tls=config.mesh_tls
    )
    hands: HandsRouter | HandsClient | NoHands
    addresses = [a.strip() for a in config.hands.split(",") if a.strip()]
    if len(addresses) > 1:
        hands = HandsRouter(
            [
                HandsClient.connect(
                    a, tracer_provider=tracer_provider, mesh_secret=config.mesh_secret, tls=config.mesh_tls
                )
                for a in addresses
            ]
        )
    elif addresses:
        hands = HandsClient.connect(
            addresses[0], tracer_provider=tracer_provider, mesh_secret=config.mesh_secret, tls=config.mesh_tls
        )
    else:
        hands = NoHands()
    proxy = (
        McpProxyClient.connect(
            config.proxy, tracer_provider=tracer_provider, mesh_secret=config.mesh_secret, tls=config.mesh_tls
        )
        if config.proxy
        else None
    )
    tracer = tracer_provider.get_tracer("brain") if tracer_provider else None
    metrics = ServiceMetrics.build("brain", os.environ, listen=config.metrics_listen)
    harness = Harness(
        metrics=metrics,
        proxy=proxy,
        failpoints=Failpoints.parse(config.failpoints),
        store=store,
        hands=hands,
        model=model,
        policy=ClearThenSummarize(),
        config=harness_config(config, holder or default_holder()),
        tracer=tracer,
    )
    server = MeshServer(
        [Service(SERVICE_NAME, BrainServicer(harness), brain_pb2_grpc.add_BrainServiceServicer_to_server)],
        listen=config.listen,
        tracer_provider=tracer_provider,
        mesh_secret=config.mesh_secret,
        tls=config.mesh_tls,
        metrics=metrics,
    )
    await server.start()
    if config.metrics_listen:
        await metrics.serve(config.metrics_listen)
    harness.start_scanner()
    return BrainServer(server, harness, [store, hands, model, *([proxy] if proxy else []), metrics], metrics)
