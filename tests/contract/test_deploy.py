"""Deployment files, checked as far as this machine can without a container engine: compose.yaml is valid
Compose (`docker-compose config`, offline), it and the Dockerfile refer only to commands and flags that exist,
buf.gen.yaml is a valid buf configuration, and the `health` command that container health checks run tells
serving from not."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import socket
import subprocess
import sys
import tomllib
from asyncio.subprocess import PIPE
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import yaml

from brain.config import BrainConfig
from hands.config import HandsConfig
from mcp_proxy.config import ProxyConfig
from session_store.app import StoreServer
from session_store.config import StoreConfig
from tests.helpers import ROOT


def test_compose_file_is_valid_compose() -> None:
    compose = shutil.which("docker-compose")
    assert compose, "docker-compose is required to check compose.yaml: `make test` installs it"

    def config(**env: str) -> subprocess.CompletedProcess[str]:
        environ = {k: v for k, v in os.environ.items() if k != "ANTHROPIC_API_KEY"} | env
        command = [compose, "--project-directory", str(ROOT), "-f", str(ROOT / "compose.yaml"), "config", "-q"]
        return subprocess.run(command, capture_output=True, text=True, timeout=60, env=environ)

    checked = config(ANTHROPIC_API_KEY="sk-ant-check")
    assert checked.returncode == 0, checked.stderr
    # Without the model's key, compose refuses to start the brain, with a sentence saying what to set.
    unset = config()
    assert unset.returncode != 0 and "set ANTHROPIC_API_KEY for Claude" in unset.stderr


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "managed_agents.cli", *args], capture_output=True, text=True, timeout=60, cwd=ROOT
    )


def test_compose_wires_four_services_with_real_commands_flags_and_health_checks() -> None:
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"store", "proxy", "hands", "brain"}
    helps: dict[str, str] = {}
    for name, service in services.items():
        command = service["command"]
        subcommand = command[0]
        helps.setdefault(subcommand, _cli(subcommand, "--help").stdout)
        for flag in (arg for arg in command if arg.startswith("--")):
            assert flag in helps[subcommand], f"{name}: `managed-agents {subcommand}` has no {flag}"
        check = service["healthcheck"]["test"]
        assert check[:3] == ["CMD", "managed-agents", "health"], name
        assert re.fullmatch(r"127\.0\.0\.1:\d+", check[3]) and check[3].split(":")[1] in " ".join(command), name
        assert service["environment"]["MANAGED_AGENTS_MESH_SECRET_FILE"] == "/run/secrets/mesh_secret", name
        assert set(service["secrets"]) <= set(compose["secrets"]), name
        for dependency in service.get("depends_on", {}):
            assert dependency in services
    addresses = " ".join(" ".join(s["command"]) for s in services.values())
    for upstream in ("store:7301", "hands:7302", "proxy:7304"):
        assert upstream in addresses, "the brain and hands reach the others by service name"


def test_the_dockerfile_runs_the_installed_command_and_copies_every_package() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    entrypoint = re.search(r'ENTRYPOINT \["([^"]+)"\]', dockerfile)
    assert entrypoint and entrypoint.group(1) in project["project"]["scripts"]
    for package in project["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"]:
        assert f"COPY {package} ./{package}" in dockerfile
    assert "bubblewrap" in dockerfile and "git" in dockerfile


def test_buf_gen_yaml_is_a_valid_configuration(tmp_path: object) -> None:
    result = subprocess.run(
        [str(ROOT / ".venv/bin/buf"), "generate", "--output", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    # Remote plugins need buf.build; without network the configuration is still read and checked first.
    assert result.returncode == 0 or "unavailable" in result.stderr, result.stderr


async def _cli_async(*args: str) -> tuple[int, str, str]:
    # The server under test runs in this event loop: the command must not block it.
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "managed_agents.cli", *args, cwd=ROOT, stdout=PIPE, stderr=PIPE
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    return process.returncode or 0, out.decode(), err.decode()


async def test_health_tells_serving_from_down(store_server: StoreServer) -> None:
    code, out, _ = await _cli_async("health", store_server.address)
    assert code == 0 and "SERVING" in out
    code, _, _ = await _cli_async("health", store_server.address, "--service", "managed_agents.v1.SessionService")
    assert code == 0
    code, _, err = await _cli_async("health", store_server.address, "--service", "nope.Service")
    assert code == 1 and "does not serve nope.Service" in err
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{probe.getsockname()[1]}"
    code, _, err = await _cli_async("health", closed, "--timeout", "1")
    assert code == 3 and "cannot be reached" in err


def test_compose_commands_parse_with_each_services_own_parser() -> None:
    """Stricter than `--help`: the real parser accepts every command, values included, and the health check
    probes the port the service listens on."""
    parsers: dict[str, Callable[[Sequence[str], Mapping[str, str]], Any]] = {
        "store": StoreConfig.from_args,
        "brain": BrainConfig.from_args,
        "hands": HandsConfig.from_args,
        "proxy": ProxyConfig.from_args,
    }
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    for name, service in compose["services"].items():
        subcommand, *argv = service["command"]
        config = parsers[subcommand](argv, {})
        port = config.listen.rsplit(":", 1)[1]
        assert config.listen.startswith("0.0.0.0:"), f"{name} must listen beyond the container's loopback"
        assert service["healthcheck"]["test"][3] == f"127.0.0.1:{port}", name


def test_the_build_context_leaves_local_state_and_secrets_out() -> None:
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert {".venv", ".managed-agents", "secrets", ".git"} <= ignored
