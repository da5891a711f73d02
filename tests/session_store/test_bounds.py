"""Every field of a session's spec has a bound; a spec past one is refused with INVALID_ARGUMENT naming the field
and the bound, and nothing is written. Pages of sessions and events stay under gRPC's default 4 MiB message
limit, so a client with default settings can list and read everything (issue 13)."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import grpc
import pytest
from google.protobuf import duration_pb2

from managed_agents import events
from managed_agents.v1 import sandbox_pb2, session_pb2, session_pb2_grpc
from session_store import rules
from session_store.app import StoreServer
from session_store.client import SessionStoreClient

GRPC_DEFAULT_LIMIT = 4 * 1024 * 1024
S, A, R = session_pb2.Session, session_pb2.AgentConfig, sandbox_pb2.Resources


def _seconds(value: float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(int(value * 1e9))
    return duration


def _with_unknown_field(session: session_pb2.Session, size: int) -> session_pb2.Session:
    """`session` carrying `size` bytes in field 99, which this server does not know."""
    blob = b"u" * size
    length = bytearray()
    value = len(blob)
    while value > 0x7F:
        length.append((value & 0x7F) | 0x80)
        value >>= 7
    length.append(value)
    raw = session.SerializeToString() + bytes([0x9A, 0x06]) + bytes(length) + blob  # tag (99 << 3) | 2
    return session_pb2.Session.FromString(raw)


def _repo(**fields: str) -> sandbox_pb2.Resources:
    values = {"url": "https://git.example.com/o/app.git", "credential": "git"} | fields
    return R(repositories=[sandbox_pb2.Repository(**values)])


# case: (spec, text the message must contain: the field, then the bound or rule)
BAD_SPECS: dict[str, tuple[session_pb2.Session, tuple[str, ...]]] = {
    "120 KB tool name": (S(agent=A(tools=["x" * 120_000])), ("session.agent.tools[0]", "1 to 64 characters")),
    "129 tools": (S(agent=A(tools=[f"t{i}" for i in range(129)])), ("session.agent.tools", "limit is 128")),
    "tool name with a semicolon": (S(agent=A(tools=["bash;rm"])), ("session.agent.tools[0]", "[A-Za-z0-9_-]")),
    "tool named twice": (S(agent=A(tools=["bash", "bash"])), ("session.agent.tools[1]", "named twice")),
    "257-character title": (S(title="t" * 257), ("session.title", "limit is 256")),
    "escape sequence in the title": (S(title="ok \x1b[2J gone"), ("session.title", "control characters", "U+001B")),
    "C1 control in the title": (S(title="a\x9bb"), ("session.title", "U+009B")),
    "newline in the title": (S(title="two\nlines"), ("session.title", "U+000A")),
    "17 metadata entries": (S(metadata={f"k{i}": "v" for i in range(17)}), ("session.metadata", "limit is 16")),
    "65-character metadata key": (S(metadata={"k" * 65: "v"}), ("session.metadata", "1 to 64 characters")),
    "control in a metadata key": (S(metadata={"a\x00b": "v"}), ("session.metadata", "U+0000")),
    "513-character metadata value": (S(metadata={"k": "v" * 513}), ("session.metadata['k']", "limit is 512")),
    "escape in a metadata value": (S(metadata={"k": "\x1b]0;x"}), ("session.metadata['k']", "U+001B")),
    "129-character model": (S(agent=A(model="m" * 129)), ("session.agent.model", "1 to 128 characters")),
    "model with a space": (S(agent=A(model="claude sonnet")), ("session.agent.model",)),
    "100,001-character system prompt": (S(agent=A(system="s" * 100_001)), ("session.agent.system", "limit is 100000")),
    "max_tokens 128,001": (S(agent=A(max_tokens=128_001)), ("session.agent.max_tokens", "between 0 and 128000")),
    "negative max_tokens": (S(agent=A(max_tokens=-1)), ("session.agent.max_tokens", "between 0 and 128000")),
    "negative max_steps": (S(agent=A(max_steps=-3)), ("session.agent.max_steps", "between 0 and 1000")),
    "21 MCP servers": (
        S(agent=A(mcp_servers=[f"m{i}" for i in range(21)])),
        ("session.agent.mcp_servers", "limit is 20"),
    ),
    "MCP server not a credential name": (
        S(agent=A(mcp_servers=["Files!"])),
        ("session.agent.mcp_servers[0]", "[a-z0-9_-]"),
    ),
    "negative memory": (
        S(agent=A(resources=R(memory_bytes=-5))),
        ("session.agent.resources.memory_bytes", "between 16 MiB and 1 TiB", "got -5 bytes"),
    ),
    "memory above 1 TiB": (S(agent=A(resources=R(memory_bytes=2 << 40))), ("resources.memory_bytes",)),
    "negative max_processes": (
        S(agent=A(resources=R(max_processes=-1))),
        ("resources.max_processes", "between 1 and 65536"),
    ),
    "70,000 processes": (
        S(agent=A(resources=R(max_processes=70_000))),
        ("resources.max_processes", "between 1 and 65536"),
    ),
    "5 millicores": (S(agent=A(resources=R(cpu_millis=5))), ("resources.cpu_millis", "between 10 and 64000")),
    "1 MiB disk": (S(agent=A(resources=R(disk_bytes=1 << 20))), ("resources.disk_bytes", "between 64 MiB and 1 TiB")),
    "50 ms command timeout": (
        S(agent=A(resources=R(command_timeout=_seconds(0.05)))),
        ("resources.command_timeout", "between 0.1 s and 3600 s"),
    ),
    "negative command timeout": (S(agent=A(resources=R(command_timeout=_seconds(-1)))), ("resources.command_timeout",)),
    "malformed duration": (
        S(agent=A(resources=R(command_timeout=duration_pb2.Duration(seconds=5, nanos=-1)))),
        ("resources.command_timeout", "not a valid duration"),
    ),
    "8-day idle ttl": (
        S(agent=A(resources=R(idle_ttl=_seconds(8 * 86400)))),
        ("resources.idle_ttl", "between 1 s and 604800 s"),
    ),
    "image with a space": (S(agent=A(resources=R(image="evil image"))), ("resources.image", "512 visible ASCII")),
    "17 labels": (
        S(agent=A(resources=R(labels={f"k{i}": "v" for i in range(17)}))),
        ("resources.labels", "limit is 16"),
    ),
    "label key with a space": (
        S(agent=A(resources=R(labels={"bad key": "v"}))),
        ("resources.labels", "[A-Za-z0-9._-]"),
    ),
    "unknown network policy": (S(agent=A(resources=R(network=7))), ("resources.network", "7 is not a known value")),  # type: ignore[arg-type]
    "17 repositories": (
        S(agent=A(resources=R(repositories=[_repo(path=f"p{i}").repositories[0] for i in range(17)]))),
        ("resources.repositories", "limit is 16"),
    ),
    "ftp repository": (S(agent=A(resources=_repo(url="ftp://h/x.git"))), ("resources.repositories[0].url", "https://")),
    "repository URL with a user": (
        S(agent=A(resources=_repo(url="https://me:pw@h/x.git"))),
        ("resources.repositories[0].url", "without a user"),
    ),
    "3000-character repository URL": (
        S(agent=A(resources=_repo(url="https://h/" + "x" * 3000))),
        ("resources.repositories[0].url", "at most 2048"),
    ),
    "malformed IPv6 repository URL": (S(agent=A(resources=_repo(url="https://[::1/x.git"))), ("repositories[0].url",)),
    "repository without credential": (S(agent=A(resources=_repo(credential=""))), ("repositories[0].credential",)),
    "branch with '..'": (S(agent=A(resources=_repo(branch="a..b"))), ("repositories[0].branch", "without '..'")),
    "repository path escaping the workspace": (S(agent=A(resources=_repo(path="../x"))), ("repositories[0].path",)),
    "17 secrets": (
        S(agent=A(resources=R(secrets=[sandbox_pb2.SandboxSecret(env=f"K{i}", credential="k") for i in range(17)]))),
        ("resources.secrets", "limit is 16"),
    ),
    "lowercase secret variable": (
        S(agent=A(resources=R(secrets=[sandbox_pb2.SandboxSecret(env="key", credential="k")]))),
        ("resources.secrets[0].env", "[A-Z0-9_]"),
    ),
    "secret shadowing PATH": (
        S(agent=A(resources=R(secrets=[sandbox_pb2.SandboxSecret(env="PATH", credential="k")]))),
        ("resources.secrets[0].env", "set by the sandbox itself"),
    ),
    "secret variable named twice": (
        S(agent=A(resources=R(secrets=[sandbox_pb2.SandboxSecret(env="K", credential=c) for c in ("a", "b")]))),
        ("resources.secrets.env[1]", "named twice"),
    ),
    "2 MiB of unknown fields": (_with_unknown_field(S(title="x"), 2 << 20), ("session: is", "the limit is 1048576")),
}


@contextlib.asynccontextmanager
async def _default_client(address: str) -> AsyncIterator[session_pb2_grpc.SessionServiceStub]:
    """A stub on a channel with gRPC's default limits (4 MiB received), as grpcurl or any language has."""
    async with grpc.aio.insecure_channel(address) as channel:
        yield session_pb2_grpc.SessionServiceStub(channel)


async def test_every_spec_bound_is_enforced_and_refusals_write_nothing(
    store_server: StoreServer, store: SessionStoreClient
) -> None:
    await store.create_session(session_id="target", title="kept")
    async with _default_client(store_server.address) as stub:
        for index, (case, (spec, expected)) in enumerate(BAD_SPECS.items()):
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await stub.CreateSession(session_pb2.CreateSessionRequest(session_id=f"bad-{index}", session=spec))
            details = raised.value.details() or ""
            assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, f"{case}: {raised.value.code()} {details}"
            for text in expected:
                assert text in details, f"{case}: {text!r} not in {details!r}"
            assert "Traceback" not in details and len(details) < 400, f"{case}: {details!r}"
        listed = await stub.ListSessions(session_pb2.ListSessionsRequest())
    assert [s.id for s in listed.sessions] == ["target"]


async def test_a_spec_at_every_limit_is_accepted_and_unknown_fields_are_not_stored(
    store_server: StoreServer, store: SessionStoreClient
) -> None:
    wide = "\U0001f600"  # 4 bytes of UTF-8: limits count characters
    agent = A(
        model="m" * 128,
        system=wide * 100_000,
        max_tokens=128_000,
        max_steps=1000,
        tools=[f"{i:03d}" + "t" * 61 for i in range(128)],
        mcp_servers=[f"m{i}" for i in range(16)],
        resources=R(
            memory_bytes=1 << 40,
            max_processes=65536,
            cpu_millis=64000,
            disk_bytes=64 << 20,
            command_timeout=_seconds(3600),
            idle_ttl=_seconds(1),
            image="localhost/managed-agents-sandbox:1",
            labels={f"k{i}": "v" * 63 for i in range(16)},
            repositories=[_repo(path=f"r{i}", credential="git").repositories[0] for i in range(16)],
            secrets=[sandbox_pb2.SandboxSecret(env=f"K{i}", credential=f"s{i % 3}") for i in range(16)],
        ),
    )
    spec = _with_unknown_field(
        S(
            title=wide * 256,
            metadata={"k" * 64 if i == 0 else f"k{i}": "\t" + "v" * 511 for i in range(16)},
            agent=agent,
        ),
        100_000,
    )
    created = await store.create_session(
        session_id="at-the-limits", title=spec.title, metadata=dict(spec.metadata), agent=spec.agent
    )
    stored = (await store.get_session(created.id, view=session_pb2.SESSION_VIEW_BASIC)).session
    assert stored.agent == agent and stored.title == spec.title and dict(stored.metadata) == dict(spec.metadata)
    assert stored.ByteSize() < 1024 * 1024
    # Unknown fields sent straight over the wire are dropped, not stored unchecked.
    async with _default_client(store_server.address) as stub:
        raw = await stub.CreateSession(session_pb2.CreateSessionRequest(session_id="with-unknown", session=spec))
        assert raw.session.title == spec.title
        got = await stub.GetSession(session_pb2.GetSessionRequest(session_id="with-unknown"))
        assert got.session.ByteSize() == raw.session.ByteSize() < spec.ByteSize() - 90_000


async def test_listing_pages_by_bytes_so_every_page_fits_a_default_client(
    store_server: StoreServer, store: SessionStoreClient
) -> None:
    # 12 sessions of ~400 KB (100,000 four-byte characters): ~4.8 MB in all, more than one response may carry.
    ids = []
    for i in range(12):
        agent = A(system=f"{i:02d}" + "\U0001f600" * 99_998)
        ids.append((await store.create_session(session_id=f"big-{i:02d}", agent=agent)).id)
    seen: list[str] = []
    sizes: list[int] = []
    async with _default_client(store_server.address) as stub:
        token = ""
        while True:
            page = await stub.ListSessions(session_pb2.ListSessionsRequest(page_size=1000, page_token=token))
            sizes.append(page.ByteSize())
            seen += [s.id for s in page.sessions]
            assert all(len(s.agent.system) == 100_000 for s in page.sessions)
            token = page.next_page_token
            if not token:
                break
    assert seen == sorted(ids, reverse=True)  # newest first, each once
    assert len(sizes) >= 3 and max(sizes) <= 2 * 1024 * 1024 < GRPC_DEFAULT_LIMIT


async def test_event_pages_fit_a_default_client(store_server: StoreServer, store: SessionStoreClient) -> None:
    session = await store.create_session(agent=A(system="\U0001f600" * 100_000))
    # 10,000 small events (4.3 MB) and then 1 MiB ones: pages are cut by the whole response's size.
    for _ in range(10):
        await store.emit_batch(session.id, [events.user_message("x" * 400) for _ in range(1000)])
    for _ in range(6):
        await store.emit(session.id, events.user_message("y" * (1 << 20)))
    async with _default_client(store_server.address) as stub:
        for read in ("GetEvents", "GetSession"):
            token, seqs, sizes = "", [], []
            while True:
                if read == "GetEvents":
                    page: session_pb2.GetEventsResponse | session_pb2.GetSessionResponse = await stub.GetEvents(
                        session_pb2.GetEventsRequest(session_id=session.id, page_size=10_000, page_token=token)
                    )
                else:
                    page = await stub.GetSession(
                        session_pb2.GetSessionRequest(session_id=session.id, page_size=10_000, page_token=token)
                    )
                sizes.append(page.ByteSize())
                seqs += [e.seq for e in page.events]
                token = page.next_page_token
                if not token:
                    break
            assert seqs == list(range(1, 10_007)), read
            assert max(sizes) <= GRPC_DEFAULT_LIMIT, (read, sizes)


async def test_a_session_stored_before_the_limits_is_listed_without_its_spec(
    store_server: StoreServer, store: SessionStoreClient, store_url: str, tmp_path: Path
) -> None:
    """Three 14 MB sessions made every listing fail; those already stored must not keep doing so."""
    await store.create_session(session_id="small", title="fine")
    for n in range(3):
        legacy = S(title=f"legacy {n}", agent=A(tools=["x" * 120_000] * 40)).SerializeToString()  # ~4.8 MB
        row = rules.SessionRow.new(f"legacy-{n}", legacy, 1_700_000_000_000_000 + n).values()
        if store_url:
            connection = await asyncpg.connect(store_url)
            try:
                await connection.execute(
                    f"INSERT INTO sessions ({rules.SESSION_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
                    *row,
                )
            finally:
                await connection.close()
        else:
            conn = sqlite3.connect(tmp_path / "store" / "sessions.sqlite3", timeout=5)
            with conn:
                conn.execute(
                    f"INSERT INTO sessions ({rules.SESSION_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", row
                )
            conn.close()
    async with _default_client(store_server.address) as stub:
        listed, token = [], ""
        while True:
            page = await stub.ListSessions(session_pb2.ListSessionsRequest(page_token=token))
            assert page.ByteSize() < GRPC_DEFAULT_LIMIT
            listed += list(page.sessions)
            token = page.next_page_token
            if not token:
                break
    assert [s.id for s in listed] == ["small", "legacy-2", "legacy-1", "legacy-0"]
    assert [s.title for s in listed[1:]] == ["legacy 2", "legacy 1", "legacy 0"]
    assert not any(s.agent.tools for s in listed)
