"""MCP proxy benchmark: what `CallTool` through the proxy costs over calling the same MCP server directly, and
what verifying a session token costs.

Three processes share the machine, as they would in a deployment on one host: an upstream MCP server (the
`mcp` SDK's `MCPServer` under uvicorn, demanding a bearer token), the proxy (`python -m mcp_proxy`), and
this process, which calls the upstream both directly (an open `mcp` client session with the token) and
through the proxy (`McpProxyClient.call_tool` with a session token).

    python bench/proxy_bench.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from bench.common import service, summary_ms, table
from managed_agents.mesh.channel import dial
from managed_agents.v1 import mcp_proxy_pb2
from mcp_proxy.client import McpProxyClient
from mcp_proxy.tokens import SIGNING_PURPOSE, SqliteTokenLedger, TokenAuthority
from mcp_proxy.vault import VaultKey, write_key_file

BEARER = "bench-access-token"

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


def serve_upstream(port_file: Path) -> None:
    """Runs the upstream MCP server (this script re-run with --serve-upstream) until killed."""
    import logging

    import uvicorn
    from mcp.server.mcpserver import MCPServer

    logging.getLogger("mcp").setLevel(logging.WARNING)

    mcp = MCPServer("bench")

    @mcp.tool()
    def add(a: int, b: int) -> int:
        """Adds two integers."""
        return a + b

    inner = mcp.streamable_http_app(host="127.0.0.1")

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and dict(scope["headers"]).get(b"authorization") != f"Bearer {BEARER}".encode():
            await send({"type": "http.response.start", "status": 401, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        await inner(scope, receive, send)

    # IPPROTO_TCP spelled out: asyncio turns Nagle's algorithm off only for sockets that say so, and with it
    # on every response waits ~40 ms for a delayed ACK.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    tmp = port_file.with_suffix(".tmp")
    tmp.write_text(f"{sock.getsockname()[1]}\n")
    tmp.replace(port_file)
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])


async def direct_calls(url: str, count: int) -> list[float]:
    http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {BEARER}"})
    samples = []
    async with http, Client(streamable_http_client(url, http_client=http)) as client:
        for i in range(count + 50):
            started = time.perf_counter()
            result = await client.call_tool("add", {"a": i, "b": 1})
            if i >= 50:  # warm-up: connection, tool listing, schema compilation
                samples.append(time.perf_counter() - started)
            assert not result.is_error
    return samples


async def proxied_calls(proxy: McpProxyClient, token: str, count: int) -> list[float]:
    samples = []
    for i in range(count + 50):
        started = time.perf_counter()
        result = await proxy.call_tool(token, server="bench", tool="add", arguments={"a": i, "b": 1})
        if i >= 50:
            samples.append(time.perf_counter() - started)
        assert not result.is_error, result
    return samples


async def concurrent_proxied(proxy: McpProxyClient, token: str, callers: int, seconds: float) -> float:
    done = 0
    stop_at = time.perf_counter() + seconds

    async def caller() -> None:
        nonlocal done
        while time.perf_counter() < stop_at:
            result = await proxy.call_tool(token, server="bench", tool="add", arguments={"a": 1, "b": 1})
            assert not result.is_error
            done += 1

    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(callers)))
    return done / (time.perf_counter() - started)


async def grpc_floor(address: str, count: int) -> list[float]:
    channel = dial(address)
    stub = health_pb2_grpc.HealthStub(channel)
    samples = []
    for i in range(count + 50):
        started = time.perf_counter()
        await stub.Check(health_pb2.HealthCheckRequest())
        if i >= 50:
            samples.append(time.perf_counter() - started)
    await channel.close()
    return samples


async def token_costs(count: int) -> list[tuple[str, str]]:
    """Mint and verify in this process: the pure cost, with no RPC around it."""
    key = VaultKey.generate()
    with tempfile.TemporaryDirectory() as tmp:
        ledger = await SqliteTokenLedger.open(Path(tmp), max_ttl_us=7 * 86_400_000_000)
        tokens = TokenAuthority(key.derive(SIGNING_PURPOSE), ledger)
        rows = []
        for grants in (["bench"], [f"server-{i:02d}" for i in range(20)]):
            token, _ = await tokens.mint("sess-bench", grants, ttl_us=3_600_000_000)
            for _ in range(1000):
                tokens.verify(token)
            started = time.perf_counter()
            for _ in range(count):
                tokens.verify(token)
            per = (time.perf_counter() - started) / count
            rows.append((f"verify, {len(grants):>2} grants ({len(token)} chars)", f"{per * 1e6:6.1f} us"))
        started = time.perf_counter()
        for _ in range(200):
            await tokens.mint("sess-bench", ["bench"], ttl_us=3_600_000_000)
        rows.append(
            (
                "mint (signs and records the token id)",
                f"{(time.perf_counter() - started) / 200 * 1e3:6.3f} ms",
            )
        )
        await ledger.aclose()
    return rows


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="shorter runs, for a smoke check")
    parser.add_argument("--serve-upstream", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    count = 200 if args.quick else 2000
    seconds = 1.0 if args.quick else 4.0
    with tempfile.TemporaryDirectory() as tmp:
        port_file = Path(tmp) / "upstream.port"
        upstream = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "--serve-upstream", str(port_file), start_new_session=True
        )
        try:
            while not port_file.exists():  # written by the other process once it listens
                if upstream.returncode is not None:
                    raise RuntimeError("the upstream MCP server did not start")
                await asyncio.sleep(0.05)
            url = f"http://127.0.0.1:{port_file.read_text().strip()}/mcp"
            key_file = Path(tmp) / "vault.key"
            write_key_file(key_file, VaultKey.generate())
            data_dir = Path(tmp) / "proxy"
            with service("mcp_proxy", "--data-dir", str(data_dir), "--key-file", str(key_file)) as address:
                async with McpProxyClient.connect(address) as proxy:
                    await proxy.put_credential(
                        mcp_proxy_pb2.Credential(
                            name="bench", kind=mcp_proxy_pb2.CREDENTIAL_KIND_MCP_OAUTH, mcp_server_url=url
                        ),
                        mcp_proxy_pb2.CredentialSecret(token=BEARER),
                    )
                    token = (await proxy.mint_session_token("sess-bench", ["bench"])).token
                    direct = await direct_calls(url, count)
                    proxied = await proxied_calls(proxy, token, count)
                    floor = await grpc_floor(address, count)
                    direct_again = await direct_calls(url, count)  # the machine may have changed meanwhile
                    d50 = sorted(direct + direct_again)[len(direct + direct_again) // 2]
                    p50 = sorted(proxied)[len(proxied) // 2]
                    d99 = sorted(direct + direct_again)[int(len(direct + direct_again) * 0.99)]
                    p99 = sorted(proxied)[int(len(proxied) * 0.99)]
                    table(
                        f"CallTool of `add`, sequential, {count} calls each",
                        [
                            ("direct MCP call (open session, bearer)", summary_ms(direct + direct_again)),
                            ("through the proxy (gRPC + token + vault)", summary_ms(proxied)),
                            (
                                "overhead of the proxy",
                                f"p50 {(p50 - d50) * 1e3:7.3f} ms  p99 {(p99 - d99) * 1e3:7.3f} ms",
                            ),
                            ("gRPC floor to the proxy (Health/Check)", summary_ms(floor)),
                        ],
                    )
                    rows = []
                    for callers in (1, 16):
                        rate = await concurrent_proxied(proxy, token, callers, seconds)
                        rows.append((f"{callers:>2} concurrent callers", f"{rate:7.0f} calls/s"))
                    table("CallTool throughput through the proxy", rows)
        finally:
            upstream.terminate()
            await upstream.wait()
    table("Session tokens (in process)", await token_costs(20_000 if not args.quick else 2000))


if __name__ == "__main__":
    if "--serve-upstream" in sys.argv:
        serve_upstream(Path(sys.argv[sys.argv.index("--serve-upstream") + 1]))
    else:
        asyncio.run(main())
