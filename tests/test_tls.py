"""Mutual TLS: with MANAGED_AGENTS_TLS_DIR set, every port of the mesh speaks TLS, a session runs end to end
across the four processes, and clients without a certificate from the mesh's CA are refused at the handshake."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from managed_agents.local_mesh import LocalMesh, local_mesh_secret
from managed_agents.mesh.errors import Unavailable
from managed_agents.mesh.tls import MESH_NAME, TLS_DIR_ENV, MeshTls, write_dev_certs
from session_store.client import SessionStoreClient
from tests.helpers import ROOT

pytestmark = pytest.mark.slow


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "managed_agents.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )


def _grpcurl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(ROOT / ".venv/bin/grpcurl"), *args], capture_output=True, text=True, timeout=30)


def test_certs_makes_a_ca_and_a_peer_certificate_and_keeps_what_exists(tmp_path: Path) -> None:
    env = {**os.environ, "NO_COLOR": "1"}
    made = _cli(env, "certs", str(tmp_path / "certs"), "--name", "store.internal", "--name", "10.0.0.7")
    assert made.returncode == 0, made.stderr
    assert f"{TLS_DIR_ENV}=" in made.stdout and f"-servername {MESH_NAME}" in made.stdout
    assert stat.S_IMODE((tmp_path / "certs" / "mesh.key").stat().st_mode) == 0o600
    tls = MeshTls.load(tmp_path / "certs")
    assert b"BEGIN CERTIFICATE" in tls.ca and b"BEGIN CERTIFICATE" in tls.cert
    again = _cli(env, "certs", str(tmp_path / "certs"))
    assert again.returncode == 2 and "--force" in again.stderr
    broken = _cli({**env, TLS_DIR_ENV: str(tmp_path / "nowhere")}, "sessions", "list")
    assert broken.returncode == 2 and "managed-agents certs" in broken.stderr and "Traceback" not in broken.stderr


async def test_a_mesh_on_mutual_tls_runs_a_session_and_refuses_outsiders(tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    write_dev_certs(certs)
    home = tmp_path / "home"
    environ = {k: v for k, v in os.environ.items() if k != "ANTHROPIC_API_KEY"} | {TLS_DIR_ENV: str(certs)}
    mesh = LocalMesh(home, environ, say=lambda _: None)
    addresses = mesh.start()
    try:
        cli_env = {**environ, "MANAGED_AGENTS_HOME": str(home), "NO_COLOR": "1"}
        # A whole session: CLI -> brain, brain -> store and hands (the demo script runs tools in a sandbox).
        ran = _cli(cli_env, "run", "--json", "list the files")
        assert ran.returncode == 0, ran.stderr
        assert "agentToolResult" in ran.stdout and "STOP_REASON_END_TURN" in ran.stdout
        listed = _cli(cli_env, "credentials", "list")  # CLI -> mcp_proxy
        assert listed.returncode == 0, listed.stderr
        assert _cli(cli_env, "health", addresses.hands).returncode == 0

        secret = local_mesh_secret(home)
        async with SessionStoreClient.connect(addresses.store, mesh_secret=secret) as plaintext:
            with pytest.raises(Unavailable):
                await plaintext.list_sessions()
        write_dev_certs(tmp_path / "foreign")  # a CA of its own: certificates the mesh never vouched for
        foreign = MeshTls.load(tmp_path / "foreign")
        async with SessionStoreClient.connect(addresses.store, mesh_secret=secret, tls=foreign) as impostor:
            with pytest.raises(Unavailable):
                await impostor.list_sessions()
        no_tls = {k: v for k, v in cli_env.items() if k != TLS_DIR_ENV}
        assert _cli(no_tls, "health", addresses.hands).returncode == 3

        header = ["-H", f"authorization: Bearer {secret}"]
        tls_flags = [
            "-cacert",
            str(certs / "ca.crt"),
            "-cert",
            str(certs / "mesh.crt"),
            "-key",
            str(certs / "mesh.key"),
        ]
        services = _grpcurl(*tls_flags, "-servername", MESH_NAME, *header, addresses.brain, "list")
        assert services.returncode == 0 and "managed_agents.v1.BrainService" in services.stdout, services.stderr
        assert _grpcurl("-plaintext", *header, addresses.brain, "list").returncode != 0
        no_client_cert = _grpcurl("-cacert", str(certs / "ca.crt"), "-servername", MESH_NAME, addresses.brain, "list")
        assert no_client_cert.returncode != 0
    finally:
        mesh.stop()
