"""The `managed-agents` command: session commands against a real store process, exit codes, the demo."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT, ServiceProcess


def cli(*args: str, store: str = "", timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NO_COLOR": "1"}
    if store:
        env["MANAGED_AGENTS_STORE"] = store
    return subprocess.run(
        [sys.executable, "-m", "managed_agents.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_session_commands_create_send_show_and_list(store_process: ServiceProcess) -> None:
    store = store_process.start().address
    created = cli("sessions", "create", "--id", "cli-1", "--title", "from the cli", store=store)
    assert created.returncode == 0, created.stderr
    assert created.stdout.strip() == "cli-1"
    sent = cli("sessions", "send", "cli-1", "hello there", "--no-wake", store=store)
    assert sent.returncode == 0 and "appended as seq 1" in sent.stdout
    shown = cli("sessions", "show", "cli-1", store=store)
    assert shown.returncode == 0
    assert "user.message" in shown.stdout and "hello there" in shown.stdout
    as_json = cli("sessions", "show", "cli-1", "--json", store=store)
    lines = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert lines[0]["id"] == "cli-1" and lines[1]["type"] == "user.message"
    listed = cli("sessions", "list", store=store)
    assert "cli-1" in listed.stdout and "from the cli" in listed.stdout


def test_exit_codes_say_what_went_wrong(store_process: ServiceProcess) -> None:
    store = store_process.start().address
    missing = cli("sessions", "show", "nope", store=store)
    assert missing.returncode == 1
    assert "session nope does not exist" in missing.stderr and "Traceback" not in missing.stderr
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{probe.getsockname()[1]}"
    unreachable = cli("sessions", "list", store=closed, timeout=120)
    assert unreachable.returncode == 3, unreachable.stderr
    assert "cannot reach the mesh" in unreachable.stderr
    usage = cli("sessions", "frobnicate")
    assert usage.returncode == 2


def test_help_explains_every_command() -> None:
    top = cli("--help")
    assert top.returncode == 0
    for command in ("store", "brain", "hands", "proxy", "up", "run", "demo", "sessions", "interrupt", "credentials"):
        assert command in top.stdout
    store_help = cli("store", "--help")
    assert "--data-dir" in store_help.stdout and "SESSION_STORE_DATA_DIR" in store_help.stdout


@pytest.mark.slow
def test_demo_runs_a_whole_session_across_separate_processes(tmp_path: Path) -> None:
    # As `make run` runs it: no MANAGED_AGENTS_HOME, so the mesh lives in ./.managed-agents, a relative path the
    # services (started from another directory) and bwrap (run from inside each workspace) must not misread.
    result = subprocess.run(
        [sys.executable, "-m", "managed_agents.cli", "demo"],
        cwd=tmp_path,
        env={
            k: v
            for k, v in {**os.environ, "NO_COLOR": "1"}.items()
            if k not in ("ANTHROPIC_API_KEY", "MANAGED_AGENTS_HOME")
        },
        capture_output=True,
        text=True,
        timeout=180,
    )
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "played by a local stand-in" in out
    for service in ("model", "store", "hands", "brain"):
        assert f"{service} " in out and "pid" in out
    for event_type in ("sandbox.provisioned", "agent.tool_use", "agent.tool_result", "session.status_idle"):
        assert event_type in out
    assert "Ran 2 tests" in out and "OK" in out, "the tests ran inside the sandbox"
    assert "turn ended: end_turn" in out
    assert "bwrap:" not in out, "the sandbox started"
    assert (tmp_path / ".managed-agents" / "store").is_dir(), "the mesh kept its data where it was run"
    assert not (tmp_path / ".managed-agents" / "mesh.json").exists(), (
        "the mesh was stopped and its address file removed"
    )


def test_sessions_can_be_granted_mcp_servers_repositories_and_secrets(store_process: ServiceProcess) -> None:
    store = store_process.start().address
    created = cli(
        "sessions",
        "create",
        "--json",
        "--mcp-server",
        "tickets",
        "--repo",
        "github=https://github.com/me/app.git#dev",
        "--secret",
        "WEATHER_API_KEY=weather",
        store=store,
    )
    assert created.returncode == 0, created.stderr
    agent = json.loads(created.stdout)["agent"]
    assert agent["mcp_servers"] == ["tickets"]
    assert agent["resources"]["repositories"] == [
        {"url": "https://github.com/me/app.git", "credential": "github", "branch": "dev"}
    ]
    assert agent["resources"]["secrets"] == [{"env": "WEATHER_API_KEY", "credential": "weather"}]
    bad = cli("sessions", "create", "--repo", "https://github.com/me/app.git", store=store)
    assert bad.returncode == 2 and "is not CREDENTIAL=URL" in bad.stderr
    bad_secret = cli("sessions", "create", "--secret", "weather", store=store)
    assert bad_secret.returncode == 2 and "is not ENV=CREDENTIAL" in bad_secret.stderr
