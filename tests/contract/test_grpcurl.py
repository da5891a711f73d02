"""grpcurl, with no proto files at hand, explores and drives the store through reflection."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from session_store.app import StoreServer

GRPCURL = Path(sys.executable).parent / "grpcurl"


async def grpcurl(*args: str, data: str | None = None) -> tuple[int, str, str]:
    assert GRPCURL.exists(), f"{GRPCURL} is missing: `make test` installs it (scripts/install-grpcurl)"
    argv = [str(GRPCURL), "-plaintext"]
    if data is not None:
        argv += ["-d", data]
    process = await asyncio.create_subprocess_exec(
        *argv, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_grpcurl_lists_and_describes_services_through_reflection(store_server: StoreServer) -> None:
    code, out, err = await grpcurl(store_server.address, "list")
    assert code == 0, err
    assert set(out.split()) >= {
        "managed_agents.v1.SessionService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    }
    code, out, err = await grpcurl(store_server.address, "describe", "managed_agents.v1.SessionService")
    assert code == 0, err
    assert "rpc EmitEvent" in out and "rpc WatchSession" in out


async def test_grpcurl_creates_appends_and_reads_a_session(store_server: StoreServer) -> None:
    address = store_server.address
    code, out, err = await grpcurl(
        address, "managed_agents.v1.SessionService/CreateSession", data='{"session_id": "curl-1"}'
    )
    assert code == 0, err
    assert json.loads(out)["session"]["status"] == "SESSION_STATUS_IDLE"
    message = {"session_id": "curl-1", "event": {"user_message": {"content": [{"text": {"text": "hi"}}]}}}
    code, out, err = await grpcurl(address, "managed_agents.v1.SessionService/EmitEvent", data=json.dumps(message))
    assert code == 0, err
    event = json.loads(out)["event"]
    assert event["type"] == "user.message" and event["seq"] == "1"
    code, out, err = await grpcurl(
        address, "managed_agents.v1.SessionService/GetSession", data='{"session_id": "curl-1"}'
    )
    assert code == 0, err
    body = json.loads(out)
    assert body["session"]["last_seq"] == "1"
    assert body["events"][0]["user_message"]["content"][0]["text"]["text"] == "hi"


async def test_grpcurl_sees_errors_as_status_codes_with_sentences(store_server: StoreServer) -> None:
    code, _, err = await grpcurl(
        store_server.address, "managed_agents.v1.SessionService/GetSession", data='{"session_id": "nope"}'
    )
    assert code != 0
    assert "Code: NotFound" in err and "session nope does not exist" in err
    assert "SESSION_NOT_FOUND" in err


async def test_health_check_reports_serving(store_server: StoreServer) -> None:
    code, out, err = await grpcurl(
        store_server.address,
        "grpc.health.v1.Health/Check",
        data='{"service": "managed_agents.v1.SessionService"}',
    )
    assert code == 0, err
    assert json.loads(out)["status"] == "SERVING"
