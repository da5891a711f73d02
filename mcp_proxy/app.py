"""Assembles a running mcp_proxy: vault, token authority, upstream pool and both servicers behind one
`MeshServer`. `__main__` and the tests build it the same way."""

from __future__ import annotations

import contextlib
import os

import httpx2
from opentelemetry.sdk.trace import TracerProvider

from managed_agents.mesh.metrics import ServiceMetrics
from managed_agents.mesh.server import MeshServer, Service
from managed_agents.v1 import mcp_proxy_pb2_grpc
from mcp_proxy import validate
from mcp_proxy.config import ProxyConfig
from mcp_proxy.egress import EgressRelay
from mcp_proxy.git_relay import GitRelay
from mcp_proxy.http_upstream import UpstreamHttp
from mcp_proxy.oauth import AccessTokens
from mcp_proxy.proxy import McpProxy
from mcp_proxy.server import PROXY_SERVICE_NAME, VAULT_SERVICE_NAME, McpProxyServicer, VaultServicer
from mcp_proxy.tokens import SIGNING_PURPOSE, SqliteTokenLedger, TokenAuthority
from mcp_proxy.upstream import UpstreamPool
from mcp_proxy.vault import SqliteVault, VaultKey


class ProxyServer:
    """An mcp_proxy that is serving; `aclose()` stops it gracefully and closes what it opened."""

    def __init__(self, server: MeshServer, proxy: McpProxy, stack: contextlib.AsyncExitStack) -> None:
        self.server = server
        self.proxy = proxy
        self._stack = stack

    @property
    def address(self) -> str:
        """Bound `host:port`."""
        return self.server.address

    async def aclose(self, grace: float = 5.0) -> None:
        """Lets in-flight calls finish, then closes upstream connections and the databases."""
        await self.server.stop(grace)
        await self._stack.aclose()


async def start(config: ProxyConfig, key: VaultKey, tracer_provider: TracerProvider | None) -> ProxyServer:
    """Opens the vault (refusing a key that does not open it) and starts serving.

    Raises:
        VaultKeyError: the key does not open the vault in `config.data_dir`.
        VaultLocked: another process serves that vault.
        OSError: the listen address cannot be bound.
    """
    async with contextlib.AsyncExitStack() as stack:
        vault = await SqliteVault.open(config.data_dir, key)
        stack.push_async_callback(vault.aclose)
        ledger = await SqliteTokenLedger.open(config.data_dir, max_ttl_us=validate.MAX_SESSION_TTL_US)
        stack.push_async_callback(ledger.aclose)
        tokens = TokenAuthority(key.derive(SIGNING_PURPOSE), ledger)
        await tokens.load()
        # Token endpoints get their own client: no redirects (a redirect could carry the refresh token away).
        http = await stack.enter_async_context(httpx2.AsyncClient(follow_redirects=False))
        access = AccessTokens(vault, http, refresh_timeout=config.refresh_timeout)
        upstream = UpstreamPool(
            access, handshake_timeout=config.connect_timeout, max_call_seconds=validate.MAX_CALL_TIMEOUT
        )
        proxy = McpProxy(vault, tokens, upstream, list_timeout=config.list_timeout)
        stack.push_async_callback(proxy.aclose)
        upstream_http = UpstreamHttp(ca_file=config.upstream_ca_file)
        stack.push_async_callback(upstream_http.aclose)
        git = GitRelay(vault, tokens, upstream_http, allow_http=config.git_allow_http)
        egress = EgressRelay(vault, tokens, upstream_http, allow_http=config.egress_allow_http)
        metrics = ServiceMetrics.build("mcp-proxy", os.environ, listen=config.metrics_listen)
        stack.push_async_callback(metrics.aclose)
        server = MeshServer(
            [
                Service(
                    VAULT_SERVICE_NAME,
                    VaultServicer(proxy),
                    mcp_proxy_pb2_grpc.add_VaultServiceServicer_to_server,
                ),
                Service(
                    PROXY_SERVICE_NAME,
                    McpProxyServicer(proxy, git, metrics, egress),
                    mcp_proxy_pb2_grpc.add_McpProxyServiceServicer_to_server,
                ),
            ],
            listen=config.listen,
            tracer_provider=tracer_provider,
            mesh_secret=config.mesh_secret,
            tls=config.mesh_tls,
            metrics=metrics,
        )
        await server.start()
        if config.metrics_listen:
            await metrics.serve(config.metrics_listen)
        return ProxyServer(server, proxy, stack.pop_all())
    raise AssertionError("unreachable")
