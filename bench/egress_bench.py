"""Egress relay benchmark: what an HTTPS request from inside a sandbox, with its API key put in on the way,
costs over the same request made directly from the host.

The API (aiohttp over TLS, demanding the key) runs in this process; the proxy and hands run as their own
processes. The same client program (Python's urllib, a new connection and TLS handshake per request, as most
scripts make them) runs twice: on the host, straight to the API with the key; and inside a bwrap sandbox,
where the key is a placeholder and the request goes door -> hands (TLS ended with the sandbox CA) -> RelayHttp
-> proxy (key put in, TLS to the API) and back.

    python bench/egress_bench.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aiohttp import web

from bench.common import service, summary_ms, table
from hands.client import HandsClient
from hands.egress_ca import CA_CERT, EgressCA
from managed_agents.v1 import mcp_proxy_pb2, sandbox_pb2
from mcp_proxy.client import McpProxyClient
from mcp_proxy.vault import VaultKey, write_key_file

KEY = "sk-bench-0123456789abcdefghijklmnopqrstuvwxyz"
HOST = "127.0.0.2"

CLIENT = """
import json, os, sys, threading, time, urllib.request
url, count, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
headers = {"Authorization": "Bearer " + os.environ["BENCH_KEY"]}
samples = []
def worker():
    for _ in range(count):
        started = time.perf_counter()
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as answer:
            assert answer.status == 200 and answer.read() == b"ok"
        samples.append(time.perf_counter() - started)
began = time.perf_counter()
pool = [threading.Thread(target=worker) for _ in range(threads)]
for t in pool: t.start()
for t in pool: t.join()
print(json.dumps({"samples": samples, "seconds": time.perf_counter() - began}))
"""


async def start_api(ca_dir: Path) -> tuple[web.AppRunner, int]:
    async def handle(request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != f"Bearer {KEY}":
            return web.Response(status=401, text="no key")
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, HOST, 0, ssl_context=EgressCA.load_or_create(ca_dir).server_context(HOST))
    await site.start()
    return runner, runner.addresses[0][1]


async def direct(url: str, ca_file: Path, count: int, threads: int) -> dict[str, object]:
    env = {**os.environ, "BENCH_KEY": KEY, "SSL_CERT_FILE": str(ca_file), "no_proxy": "*", "NO_PROXY": "*"}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CLIENT, url, str(count), str(threads), env=env, stdout=asyncio.subprocess.PIPE
    )
    out, _ = await process.communicate()
    result: dict[str, object] = json.loads(out)
    return result


async def relayed(hands: HandsClient, sandbox_id: str, url: str, count: int, threads: int, n: int) -> dict[str, object]:
    command = f"python3 - {url} {count} {threads} <<'EOF'\n{textwrap.dedent(CLIENT)}\nEOF"
    answer = await hands.execute(sandbox_id, execution_id=f"bench-{n}", name="bash", input={"command": command})
    if answer.is_error:
        raise RuntimeError(answer.output)
    result: dict[str, object] = json.loads(answer.output)
    return result


def _samples(result: dict[str, object]) -> list[float]:
    samples = result["samples"]
    assert isinstance(samples, list)
    return [float(s) for s in samples]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="shorter runs, for a smoke check")
    args = parser.parse_args()
    count = 50 if args.quick else 400
    with tempfile.TemporaryDirectory() as tmp:
        ca_dir = Path(tmp) / "api-ca"
        runner, port = await start_api(ca_dir)
        url = f"https://{HOST}:{port}/"
        key_file = Path(tmp) / "vault.key"
        write_key_file(key_file, VaultKey.generate())
        proxy_args = ["--data-dir", f"{tmp}/proxy", "--key-file", str(key_file)]
        try:
            with (
                service("mcp_proxy", *proxy_args, "--upstream-ca-file", str(ca_dir / CA_CERT)) as proxy_address,
                service("hands", "--work-root", f"{tmp}/sandboxes", "--proxy", proxy_address) as hands_address,
            ):
                async with McpProxyClient.connect(proxy_address) as proxy, HandsClient.connect(hands_address) as hands:
                    await proxy.put_credential(
                        mcp_proxy_pb2.Credential(
                            name="bench", kind=mcp_proxy_pb2.CREDENTIAL_KIND_API_KEY, allowed_hosts=[f"{HOST}:{port}"]
                        ),
                        mcp_proxy_pb2.CredentialSecret(token=KEY),
                    )
                    token = (await proxy.mint_session_token("sess-bench", ["bench"])).token
                    resources = sandbox_pb2.Resources(
                        secrets=[sandbox_pb2.SandboxSecret(env="BENCH_KEY", credential="bench")]
                    )
                    sandbox = await hands.provision(resources=resources, credential_token=token)
                    await relayed(hands, sandbox.id, url, 5, 1, 0)  # warm: the CA's certificate for the host
                    first = await direct(url, ca_dir / CA_CERT, count, 1)
                    through = await relayed(hands, sandbox.id, url, count, 1, 1)
                    again = await direct(url, ca_dir / CA_CERT, count, 1)
                    base = _samples(first) + _samples(again)
                    via = _samples(through)
                    base.sort()
                    via.sort()
                    table(
                        f"HTTPS GET with an API key, new connection each, sequential, {count} requests",
                        [
                            ("direct from the host (key in hand)", summary_ms(base)),
                            ("from a sandbox through the egress relay", summary_ms(via)),
                            (
                                "overhead of the relay",
                                f"p50 {(via[len(via) // 2] - base[len(base) // 2]) * 1e3:7.3f} ms  "
                                f"p99 {(via[int(len(via) * 0.99)] - base[int(len(base) * 0.99)]) * 1e3:7.3f} ms",
                            ),
                        ],
                    )
                    rows = []
                    for threads in (1, 8):
                        per = max(10, count // threads)
                        d = await direct(url, ca_dir / CA_CERT, per, threads)
                        r = await relayed(hands, sandbox.id, url, per, threads, 10 + threads)
                        for name, result in (("direct", d), ("relayed", r)):
                            seconds = result["seconds"]
                            assert isinstance(seconds, float)
                            rate = len(_samples(result)) / seconds
                            rows.append((f"{name}, {threads} client threads", f"{rate:7.0f} requests/s"))
                    table("Throughput", rows)
        finally:
            await runner.cleanup()


if __name__ == "__main__":
    asyncio.run(main())
