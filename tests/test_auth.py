"""Service authentication: servers given a mesh secret refuse every call without it (health checks aside),
with UNAUTHENTICATED and a sentence; `managed-agents up` closes its mesh without the user doing anything."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from managed_agents import events
from managed_agents.local_mesh import SECRET_FILE, LocalMesh
from managed_agents.mesh.auth import SECRET_ENV
from managed_agents.mesh.errors import NotMeshPeer
from managed_agents.v1 import session_pb2, session_pb2_grpc
from session_store.app import StoreServer
from session_store.client import SessionStoreClient
from tests.conftest import MESH_SECRET
from tests.helpers import ROOT


async def test_calls_with_the_secret_pass_unary_and_streaming(closed_store: StoreServer) -> None:
    async with SessionStoreClient.connect(closed_store.address, mesh_secret=MESH_SECRET) as store:
        session = await store.create_session()
        await store.emit(session.id, events.user_message("hello"))
        async for event in store.watch(session.id):
            assert event.seq == 1 and event.type == "user.message"
            break


@pytest.mark.parametrize("sent", ["", "Bearer wrong-secret", f"Basic {MESH_SECRET}"])
async def test_calls_without_the_secret_are_unauthenticated_with_a_sentence(
    closed_store: StoreServer, sent: str
) -> None:
    async with grpc.aio.insecure_channel(closed_store.address) as channel:
        stub = session_pb2_grpc.SessionServiceStub(channel)
        metadata = (("authorization", sent),) if sent else None
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.CreateSession(session_pb2.CreateSessionRequest(), metadata=metadata)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        details = refused.value.details() or ""
        assert ("accepts calls only from its mesh" in details) if not sent else ("not this mesh's" in details)
        with pytest.raises(grpc.aio.AioRpcError) as streaming:
            async for _ in stub.WatchSession(session_pb2.WatchSessionRequest(session_id="x"), metadata=metadata):
                pass
        assert streaming.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # Health stays open: orchestrators probe without credentials.
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    async with SessionStoreClient.connect(closed_store.address) as store:
        with pytest.raises(NotMeshPeer):
            await store.list_sessions()


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({SECRET_ENV: "short"}, "at least 32 printable characters"),
        ({"MANAGED_AGENTS_MESH_SECRET_FILE": "/nonexistent/mesh.secret"}, "cannot be read"),
    ],
)
def test_an_unusable_secret_stops_the_server_at_start_with_exit_2(
    tmp_path: Path, env: dict[str, str], expected: str
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "session_store", "--listen", "127.0.0.1:0", "--data-dir", str(tmp_path)],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode == 2
    assert expected in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
async def test_up_closes_every_service_and_the_cli_still_gets_in(tmp_path: Path) -> None:
    home = tmp_path / "home"
    environ = {k: v for k, v in os.environ.items() if k != "ANTHROPIC_API_KEY"}
    mesh = LocalMesh(home, environ, say=lambda _: None)
    addresses = mesh.start()
    try:
        assert stat.S_IMODE((home / SECRET_FILE).stat().st_mode) == 0o600
        assert stat.S_IMODE((home / "vault.key").stat().st_mode) == 0o600
        for service, address in [
            ("store", addresses.store),
            ("hands", addresses.hands),
            ("brain", addresses.brain),
            ("proxy", addresses.proxy),
        ]:
            # Reflection is a call like any other: closed, so not even the schema is open to outsiders.
            listed = subprocess.run(
                [str(ROOT / ".venv/bin/grpcurl"), "-plaintext", address, "list"],
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert listed.returncode != 0 and "Unauthenticated" in listed.stderr, (service, listed.stderr)
        cli_env = {**environ, "MANAGED_AGENTS_HOME": str(home), "NO_COLOR": "1"}
        token_file = tmp_path / "token"
        token_file.write_text("git-token-for-the-vault\n")

        def cli(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "managed_agents.cli", *args],
                env=cli_env,
                capture_output=True,
                text=True,
                timeout=60,
                cwd=ROOT,
            )

        put = cli(
            "credentials", "put", "repo", "--kind", "git", "--host", "git.example.com", "--token", str(token_file)
        )
        assert put.returncode == 0, put.stderr
        listed = cli("credentials", "list")
        assert listed.returncode == 0 and "repo" in listed.stdout and "git.example.com" in listed.stdout
        assert "git-token-for-the-vault" not in listed.stdout
        sessions = cli("sessions", "list")
        assert sessions.returncode == 0, sessions.stderr
        denied = subprocess.run(
            [sys.executable, "-m", "managed_agents.cli", "sessions", "--store", addresses.store, "list"],
            env={**cli_env, "MANAGED_AGENTS_HOME": str(tmp_path / "elsewhere")},
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
        )
        assert denied.returncode == 1 and "accepts calls only from its mesh" in denied.stderr
    finally:
        mesh.stop()
