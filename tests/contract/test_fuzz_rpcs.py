"""Every RPC of every service, fuzzed: no request, however malformed, may get UNKNOWN or INTERNAL.

The RPCs come from the generated descriptors (every service `protos/managed_agents/v1` declares, plus health
checking and reflection), the servers from one local mesh (`managed_agents.local_mesh`, as `managed-agents up`
starts it) shared by the module, and each server is found by asking it, through reflection, what it serves.
Requests are raw bytes sent through generic channel calls, so they can be anything: messages hypothesis builds
from the descriptor (random values, huge strings, negative numbers, unknown enum numbers), those encodings
truncated, bit-flipped or spliced, and hand-encoded bytes the protobuf library would refuse to build (Structs
nested past the decoder's depth limit, invalid UTF-8 in string fields).

`MANAGED_AGENTS_FUZZ_EXAMPLES` scales the example counts; `MANAGED_AGENTS_FUZZ_RANDOM=1` explores with fresh
randomness instead of the fixed, derandomized examples CI runs.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor, message
from google.protobuf.message_factory import GetMessageClass
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

import managed_agents.v1
from managed_agents.local_mesh import LocalMesh, MeshAddresses, local_mesh_secret
from managed_agents.v1 import events_pb2, hands_pb2, mcp_proxy_pb2, session_pb2

pytestmark = pytest.mark.slow

FD = descriptor.FieldDescriptor
MIB = 1024 * 1024
_SCALE = float(os.environ.get("MANAGED_AGENTS_FUZZ_EXAMPLES", "1"))
_RANDOM = os.environ.get("MANAGED_AGENTS_FUZZ_RANDOM", "") == "1"
# A deep Struct's JSON depth: 32 levels still decode (3 message levels each, 100 at most), 33 do not.
_DEEP = (30, 31, 32, 33, 34, 40, 200)
_BAD_CODES = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
_UNARY_TIMEOUT = 20.0
# A response stream may go on for ever (watching a session, health): it is cut off after this long.
_STREAM_WINDOW = 0.3


# The RPCs -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rpc:
    """One method, as its descriptor declares it."""

    service: str
    name: str
    input: descriptor.Descriptor
    client_streaming: bool
    server_streaming: bool

    @property
    def path(self) -> str:
        return f"/{self.service}/{self.name}"


def _declared_services() -> list[descriptor.ServiceDescriptor]:
    services: list[descriptor.ServiceDescriptor] = []
    for info in pkgutil.iter_modules(managed_agents.v1.__path__):
        if info.name.endswith("_pb2"):
            module = importlib.import_module(f"managed_agents.v1.{info.name}")
            services.extend(module.DESCRIPTOR.services_by_name.values())
    services.extend(health_pb2.DESCRIPTOR.services_by_name.values())
    services.extend(reflection_pb2.DESCRIPTOR.services_by_name.values())
    return services


SERVICES = _declared_services()
RPCS = [
    Rpc(s.full_name, m.name, m.input_type, m.client_streaming, m.server_streaming) for s in SERVICES for m in s.methods
]
assert {s.full_name for s in SERVICES} >= {
    "managed_agents.v1.SessionService",
    "managed_agents.v1.HandsService",
    "managed_agents.v1.BrainService",
    "managed_agents.v1.McpProxyService",
    "managed_agents.v1.VaultService",
}, "the generated descriptors are not where this test looks"


# Hand encoding ------------------------------------------------------------------------------------------


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _nest(path: Sequence[int], payload: bytes) -> bytes:
    """`payload` as the last field of `path`, each earlier number a message field holding the next."""
    for number in reversed(path):
        payload = _field(number, payload)
    return payload


def _deep_value(levels: int) -> bytes:
    """A `google.protobuf.Value` holding `levels` Structs, each the only value of the one before."""
    value = _field(3, b"x")  # string_value
    for _ in range(levels):
        value = _field(5, _field(1, _field(1, b"k") + _field(2, value)))  # struct_value {fields {"k": value}}
    return value


def _deep(type_name: str, levels: int) -> bytes:
    """The encoding of a message of `type_name` (Struct, Value or ListValue) nested `levels` JSON levels."""
    value = _deep_value(levels)
    if type_name == "google.protobuf.Value":
        return value
    if type_name == "google.protobuf.ListValue":
        return _field(1, value)
    return _field(1, _field(1, b"k") + _field(2, value))  # Struct {fields {"k": value}}


_JSON_TYPES = ("google.protobuf.Struct", "google.protobuf.Value", "google.protobuf.ListValue")


def _of(field: descriptor.FieldDescriptor) -> descriptor.Descriptor:
    """The message type of a message field."""
    assert field.message_type is not None, field.full_name
    return field.message_type


def _paths(root: descriptor.Descriptor, want: Callable[[descriptor.FieldDescriptor], bool]) -> list[list[int]]:
    """Field-number paths from `root` to each field `want` picks, shortest first, each message type visited
    once (map fields count as messages: their entries are encoded as such)."""
    found: list[list[int]] = []
    queue: list[tuple[descriptor.Descriptor, list[int]]] = [(root, [])]
    seen = {root.full_name}
    while queue:
        message_type, path = queue.pop(0)
        for field in message_type.fields:
            if want(field):
                found.append([*path, field.number])
            if field.type == FD.TYPE_MESSAGE and _of(field).full_name not in seen:
                if _of(field).full_name in _JSON_TYPES:
                    continue
                seen.add(_of(field).full_name)
                queue.append((_of(field), [*path, field.number]))
    return found


def _string_paths(root: descriptor.Descriptor) -> list[list[int]]:
    return _paths(root, lambda f: f.type == FD.TYPE_STRING)


def _json_paths(root: descriptor.Descriptor) -> list[tuple[list[int], str]]:
    by_path: list[tuple[list[int], str]] = []
    for path in _paths(root, lambda f: f.type == FD.TYPE_MESSAGE and _of(f).full_name in _JSON_TYPES):
        by_path.append((path, _field_type(root, path)))
    return by_path


def _field_type(root: descriptor.Descriptor, path: Sequence[int]) -> str:
    message_type = root
    field = None
    for number in path:
        field = message_type.fields_by_number[number]
        if field.type == FD.TYPE_MESSAGE:
            message_type = _of(field)
    assert field is not None
    return str(_of(field).full_name)


# Messages from descriptors ------------------------------------------------------------------------------

_INT_RANGES = {
    FD.TYPE_INT32: (-(2**31), 2**31 - 1),
    FD.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FD.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FD.TYPE_INT64: (-(2**63), 2**63 - 1),
    FD.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FD.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FD.TYPE_UINT32: (0, 2**32 - 1),
    FD.TYPE_FIXED32: (0, 2**32 - 1),
    FD.TYPE_UINT64: (0, 2**64 - 1),
    FD.TYPE_FIXED64: (0, 2**64 - 1),
}
# Strings a service may treat specially: ids of the right shape, paths, URLs, names, whitespace, controls.
_FAMILIAR = [
    "",
    " ",
    "a",
    "sess_0000000000000000",
    "sbx_0000",
    "../../../../etc/passwd",
    "/workspace",
    "http://127.0.0.1:1/",
    "https://example.invalid/x.git",
    "Bearer x",
    "bash",
    "read_file",
    "\x00",
    "\r\n",
    "é",
    "💥" * 3,
    "\u202e",
    "a" * 65,
    "a" * 129,
    "a" * 4097,
    "-1",
    "0",
    "9" * 30,
    "NaN",
]


def _huge_text() -> st.SearchStrategy[str]:
    return st.builds(
        lambda c, n: c * (n // len(c.encode())), st.sampled_from(["a", "é", "💥", "\x00"]), st.integers(64 * 1024, MIB)
    )


# Names of things that exist in the fuzzed mesh (a session, its sandbox and token, a credential), filled in
# by the fixture before the first strategy is built: requests that name them get past the "not found".
_EXISTING: list[str] = []


def _strings() -> st.SearchStrategy[str]:
    pools = [st.sampled_from(_FAMILIAR), st.text(max_size=40), _huge_text()]
    if _EXISTING:
        pools[:0] = [st.sampled_from(list(_EXISTING))] * 2  # twice as likely as any other kind
    return st.one_of(*pools)


def _scalar(field: descriptor.FieldDescriptor) -> st.SearchStrategy[Any]:
    kind = field.type
    if kind in _INT_RANGES:
        low, high = _INT_RANGES[kind]
        return st.one_of(st.integers(low, high), st.sampled_from([low, high, 0, -1 if low < 0 else 1]))
    if kind == FD.TYPE_BOOL:
        return st.booleans()
    if kind == FD.TYPE_DOUBLE:
        return st.floats(allow_nan=True, allow_infinity=True)
    if kind == FD.TYPE_FLOAT:
        return st.floats(width=32, allow_nan=True, allow_infinity=True)
    if kind == FD.TYPE_STRING:
        return _strings()
    if kind == FD.TYPE_BYTES:
        return st.one_of(st.binary(max_size=64), st.builds(bytes, st.integers(0, MIB)))
    if kind == FD.TYPE_ENUM:
        assert field.enum_type is not None
        numbers = [v.number for v in field.enum_type.values]
        return st.one_of(st.sampled_from(numbers), st.integers(-(2**31), 2**31 - 1))
    raise AssertionError(f"unhandled field type {kind} of {field.full_name}")


_MAX_NESTING = 4
_CACHE: dict[tuple[str, int], st.SearchStrategy[message.Message]] = {}


def messages(message_type: descriptor.Descriptor, depth: int = 0) -> st.SearchStrategy[message.Message]:
    """Messages of `message_type` with random fields set (nested messages up to a few levels)."""
    key = (message_type.full_name, depth)
    if key in _CACHE:
        return _CACHE[key]
    cls = GetMessageClass(message_type)
    if depth >= _MAX_NESTING:
        return st.just(cls())
    # Each field set or not; set first, so that hypothesis's simplest example sets every field (requests with
    # fields missing mostly end at the first "is required").
    parts: list[st.SearchStrategy[list[tuple[descriptor.FieldDescriptor, Any]]]] = []
    in_oneof = {f.name for o in message_type.oneofs for f in o.fields}
    for oneof in message_type.oneofs:
        choices = [st.tuples(st.just(f), _value(f, depth)) for f in oneof.fields]
        parts.append(st.one_of(st.lists(st.one_of(choices), min_size=1, max_size=1), st.just([])))
    for field in message_type.fields:
        if field.name not in in_oneof:
            parts.append(st.one_of(st.tuples(st.just(field), _value(field, depth)).map(lambda p: [p]), st.just([])))

    def build(chosen: list[list[tuple[descriptor.FieldDescriptor, Any]]]) -> message.Message:
        built = cls()
        for assignments in chosen:
            for field, value in assignments:
                _assign(built, field, value)
        return built

    strategy = st.tuples(*parts).map(lambda chosen: build(list(chosen)))
    _CACHE[key] = strategy
    return strategy


def _is_map(field: descriptor.FieldDescriptor) -> bool:
    return field.type == FD.TYPE_MESSAGE and bool(_of(field).GetOptions().map_entry)


def _value(field: descriptor.FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    if _is_map(field):
        entry = _of(field)
        key = _scalar(entry.fields_by_name["key"])
        value_field = entry.fields_by_name["value"]
        value = messages(_of(value_field), depth + 1) if value_field.type == FD.TYPE_MESSAGE else _scalar(value_field)
        return st.dictionaries(key, value, max_size=3)
    single = messages(_of(field), depth + 1) if field.type == FD.TYPE_MESSAGE else _scalar(field)
    if field.is_repeated:
        return st.lists(single, max_size=3)
    return single


def _assign(target: message.Message, field: descriptor.FieldDescriptor, value: Any) -> None:
    if _is_map(field):
        container = getattr(target, field.name)
        for key, item in value.items():
            if isinstance(item, message.Message):
                container[key].CopyFrom(item)
            else:
                container[key] = item
    elif field.is_repeated:
        container = getattr(target, field.name)
        for item in value:
            if isinstance(item, message.Message):
                container.add().CopyFrom(item)
            else:
                container.append(item)
    elif isinstance(value, message.Message):
        getattr(target, field.name).CopyFrom(value)
    else:
        setattr(target, field.name, value)


# Bytes to send ------------------------------------------------------------------------------------------


def _truncate(data: bytes, at: int) -> bytes:
    return data[: at % (len(data) + 1)]


def _flip(data: bytes, at: int, bit: int) -> bytes:
    if not data:
        return b"\x80"
    at %= len(data)
    return data[:at] + bytes([data[at] ^ (1 << bit)]) + data[at + 1 :]


def _splice(data: bytes, at: int, junk: bytes) -> bytes:
    at %= len(data) + 1
    return data[:at] + junk + data[at:]


def _encoded(rpc: Rpc) -> st.SearchStrategy[bytes]:
    return messages(rpc.input).map(lambda m: m.SerializeToString())


def _mutated(rpc: Rpc) -> st.SearchStrategy[bytes]:
    positions = st.integers(0, 2**16)
    return st.one_of(
        st.builds(_truncate, _encoded(rpc), positions),
        st.builds(_flip, _encoded(rpc), positions, st.integers(0, 7)),
        st.builds(_splice, _encoded(rpc), positions, st.binary(min_size=1, max_size=12)),
        st.binary(max_size=64),
    )


def _hand_encoded(rpc: Rpc) -> st.SearchStrategy[bytes]:
    """Deep Structs and invalid UTF-8 where the request type has room for them, as (part of) the request."""
    options: list[st.SearchStrategy[bytes]] = []
    json_paths = _json_paths(rpc.input)
    if json_paths:
        options.append(
            st.builds(
                lambda where, levels: _nest(where[0][:-1], _field(where[0][-1], _deep(where[1], levels))),
                st.sampled_from(json_paths),
                st.sampled_from(_DEEP),
            )
        )
    strings = _string_paths(rpc.input)
    if strings:
        bad_utf8 = st.sampled_from([b"\xff", b"\xc3\x28", b"ok\xed\xa0\x80", b"\xf4\x90\x80\x80", b"a\x80b"])
        options.append(st.builds(_nest, st.sampled_from(strings), bad_utf8))
    if not options:
        return st.nothing()
    # Glued after a valid message, the bad field is one more field of it (protobuf merges what follows).
    return st.one_of(*options, st.builds(lambda a, b: a + b, _encoded(rpc), st.one_of(*options)))


def payloads(rpc: Rpc) -> st.SearchStrategy[bytes]:
    """Whatever the bytes of one request message may be."""
    # Valid encodings twice as often as each kind of broken one: most of them still fail validation.
    return st.one_of(_encoded(rpc), _encoded(rpc), _mutated(rpc), _hand_encoded(rpc))


# The mesh -----------------------------------------------------------------------------------------------


@dataclass
class Fuzzed:
    """The mesh under fuzzing: where each service is served, the secret to present, each server's log."""

    servers: dict[str, str]  # service -> address
    logs: dict[str, Path]  # address -> its process's log
    metadata: tuple[tuple[str, str], ...]
    channels: dict[str, grpc.Channel]

    def channel(self, service: str) -> grpc.Channel:
        address = self.servers.get(service)
        assert address, f"{service} is declared in the protos but no server of the mesh serves it"
        if address not in self.channels:
            self.channels[address] = grpc.insecure_channel(
                address, options=[("grpc.max_receive_message_length", 64 * MIB)]
            )
        return self.channels[address]


def _served(address: str, metadata: tuple[tuple[str, str], ...]) -> list[str]:
    with grpc.insecure_channel(address) as channel:
        call = channel.stream_stream(
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        (response,) = list(call(iter([request]), timeout=10, metadata=metadata))
    return [s.name for s in response.list_services_response.service]


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzzed]:
    """One local mesh for the module; a model whose every answer is a short text, so a session the fuzzer
    happens to wake ends its turn at once."""
    home = tmp_path_factory.mktemp("fuzz-mesh")
    script = home / "script.json"
    script.write_text('{"steps": [], "final_text": "fuzzed"}')
    environ = {k: v for k, v in os.environ.items() if not k.startswith("ANTHROPIC_")}
    local = LocalMesh(home, environ, say=lambda _: None)
    addresses: MeshAddresses = local.start(standin_script=str(script))
    try:
        metadata = (("authorization", f"Bearer {local_mesh_secret(home)}"),)
        modules = {
            addresses.store: "session_store",
            addresses.hands: "hands",
            addresses.brain: "brain",
            addresses.proxy: "mcp_proxy",
        }
        servers: dict[str, str] = {}
        for address in modules:
            for service in _served(address, metadata):
                # Health and reflection are everywhere: fuzz them on the store.
                servers.setdefault(service, address)
        fuzzed = Fuzzed(servers, {a: home / "logs" / f"{m}.log" for a, m in modules.items()}, metadata, {})
        _EXISTING[:] = _things(fuzzed)
        yield fuzzed
        for channel in fuzzed.channels.values():
            channel.close()
        dead = local.dead()
        assert not dead, f"{dead} died while fuzzed"
    finally:
        local.stop()


def _things(mesh: Fuzzed) -> list[str]:
    """Makes a session, a sandbox for it, a session token and a credential; their names."""

    def unary(service: str, method: str, request: message.Message, response_type: Any) -> Any:
        rpc = mesh.channel(service).unary_unary(
            f"/{service}/{method}",
            request_serializer=type(request).SerializeToString,
            response_deserializer=response_type.FromString,
        )
        return rpc(request, timeout=30, metadata=mesh.metadata)

    session = unary(
        "managed_agents.v1.SessionService",
        "CreateSession",
        session_pb2.CreateSessionRequest(),
        session_pb2.CreateSessionResponse,
    ).session
    sandbox = unary(
        "managed_agents.v1.HandsService",
        "Provision",
        hands_pb2.ProvisionRequest(session_id=session.id),
        hands_pb2.ProvisionResponse,
    ).sandbox
    credential = mcp_proxy_pb2.Credential(name="fuzz-api", kind=mcp_proxy_pb2.CREDENTIAL_KIND_API_KEY)
    credential.allowed_hosts.append("api.example.invalid")
    unary(
        "managed_agents.v1.VaultService",
        "PutCredential",
        mcp_proxy_pb2.PutCredentialRequest(credential=credential, secret=mcp_proxy_pb2.CredentialSecret(token="s3")),
        mcp_proxy_pb2.PutCredentialResponse,
    )
    token = unary(
        "managed_agents.v1.McpProxyService",
        "MintSessionToken",
        mcp_proxy_pb2.MintSessionTokenRequest(session_id=session.id, grants=["fuzz-api"]),
        mcp_proxy_pb2.MintSessionTokenResponse,
    ).token
    return [session.id, sandbox.id, token, "fuzz-api", "bash", "https://api.example.invalid/v1"]


# Calling ------------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    code: grpc.StatusCode
    details: str


def call(mesh: Fuzzed, rpc: Rpc, requests: Sequence[bytes]) -> Outcome:
    """Sends the requests (one unless the RPC takes a stream) as raw bytes; the status the call ended with."""
    channel = mesh.channel(rpc.service)
    kwargs: dict[str, Any] = {"metadata": mesh.metadata}
    try:
        if not rpc.client_streaming and not rpc.server_streaming:
            channel.unary_unary(rpc.path)(requests[0], timeout=_UNARY_TIMEOUT, **kwargs)
        elif not rpc.client_streaming:
            for _ in channel.unary_stream(rpc.path)(requests[0], timeout=_STREAM_WINDOW, **kwargs):
                pass
        elif not rpc.server_streaming:
            channel.stream_unary(rpc.path)(iter(requests), timeout=_UNARY_TIMEOUT, **kwargs)
        else:
            for _ in channel.stream_stream(rpc.path)(iter(requests), timeout=_UNARY_TIMEOUT, **kwargs):
                pass
    except grpc.RpcError as error:
        return Outcome(error.code(), error.details() or "")
    return Outcome(grpc.StatusCode.OK, "")


def _log_size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def check(mesh: Fuzzed, rpc: Rpc, requests: Sequence[bytes]) -> Outcome:
    """Calls, and fails with the bytes, the status and the server's log if the status is a server fault."""
    log = mesh.logs[mesh.servers[rpc.service]]
    before = _log_size(log)
    outcome = call(mesh, rpc, requests)
    shown = [r[:200].hex() + (f"... ({len(r)} bytes)" if len(r) > 200 else "") for r in requests]
    if currently_in_test_context():
        note(f"{rpc.path} <- {shown}: {outcome.code.name} {outcome.details[:300]!r}")
    bad = outcome.code in _BAD_CODES
    if outcome.code is grpc.StatusCode.DEADLINE_EXCEEDED and not rpc.server_streaming:
        bad = True  # a call that hangs: only a stream that goes on may be cut off
    if bad:
        time.sleep(0.2)  # let the server finish logging
        with log.open("rb") as server_log:
            server_log.seek(before)
            tail = server_log.read().decode(errors="replace")[-6000:]
        pytest.fail(
            f"{rpc.path} answered {outcome.code.name} {outcome.details!r}\nrequest(s): {shown}\nserver log:\n{tail}",
            pytrace=False,
        )
    return outcome


def _settings(examples: int) -> settings:
    return settings(
        max_examples=max(1, int(examples * _SCALE)),
        deadline=None,
        derandomize=not _RANDOM,
        database=None,
        suppress_health_check=list(HealthCheck),
        print_blob=_RANDOM,
    )


# The tests ----------------------------------------------------------------------------------------------

_IDS = [f"{r.service.rsplit('.', 1)[-1]}.{r.name}" for r in RPCS]


@pytest.mark.parametrize("rpc", RPCS, ids=_IDS)
def test_undecodable_requests_are_invalid_arguments(mesh: Fuzzed, rpc: Rpc) -> None:
    """Bytes that do not decode as the request get INVALID_ARGUMENT saying so, from every RPC."""
    expected = f"could not be decoded as {rpc.input.full_name}"
    cases: dict[str, bytes] = {"truncated": _field(15, b"abcde")[:-3], "bad tag": b"\x00"}
    strings = _string_paths(rpc.input)
    if strings:
        cases["invalid UTF-8"] = _nest(strings[0], b"\xc3\x28")
    for path, type_name in _json_paths(rpc.input)[:1]:
        cases["Struct 40 deep"] = _nest(path[:-1], _field(path[-1], _deep(type_name, 40)))
        cases["Struct 200 deep"] = _nest(path[:-1], _field(path[-1], _deep(type_name, 200)))
    for case, data in cases.items():
        outcome = check(mesh, rpc, [data])
        assert outcome.code is grpc.StatusCode.INVALID_ARGUMENT and expected in outcome.details, (case, outcome)
        assert outcome.details.endswith("it was not processed"), (case, outcome)


def _rpc(service: str, name: str) -> Rpc:
    return next(r for r in RPCS if r.service == service and r.name == name)


def test_a_struct_at_the_depth_limit_is_stored_and_read_back(mesh: Fuzzed) -> None:
    """A tool input as deep as still decodes is stored, and every way of reading it back decodes too (none
    wraps it deeper than the request that brought it); one level more is refused as undecodable."""
    session_id = _EXISTING[0]
    store = "managed_agents.v1.SessionService"

    def emit(levels: int) -> bytes:
        use = events_pb2.AgentToolUse(message_id="msg_fuzz", id=f"toolu_fuzz{levels}", name="bash")
        event = _field(32, use.SerializeToString() + _field(4, _deep("google.protobuf.Struct", levels)))
        return session_pb2.EmitEventRequest(session_id=session_id).SerializeToString() + _field(2, event)

    deepest = max(n for n in range(60) if _decodes(session_pb2.EmitEventRequest, emit(n)))
    refused = check(mesh, _rpc(store, "EmitEvent"), [emit(deepest + 1)])
    assert refused.code is grpc.StatusCode.INVALID_ARGUMENT and "deeper than protobuf decodes" in refused.details
    assert check(mesh, _rpc(store, "EmitEvent"), [emit(deepest)]).code is grpc.StatusCode.OK
    channel = mesh.channel(store)
    reads: list[tuple[str, message.Message, Callable[[bytes], Any]]] = [
        ("GetEvents", session_pb2.GetEventsRequest(session_id=session_id), session_pb2.GetEventsResponse.FromString),
        ("GetSession", session_pb2.GetSessionRequest(session_id=session_id), session_pb2.GetSessionResponse.FromString),
    ]
    for method, request, decode in reads:
        raw = channel.unary_unary(f"/{store}/{method}")(
            request.SerializeToString(), timeout=_UNARY_TIMEOUT, metadata=mesh.metadata
        )
        events = decode(raw).events
        assert any(e.agent_tool_use.id == f"toolu_fuzz{deepest}" for e in events), method
    watch = channel.unary_stream(f"/{store}/WatchSession")(
        session_pb2.WatchSessionRequest(session_id=session_id).SerializeToString(), timeout=5, metadata=mesh.metadata
    )
    for raw in watch:
        if session_pb2.WatchSessionResponse.FromString(raw).event.agent_tool_use.id == f"toolu_fuzz{deepest}":
            watch.cancel()
            break


def _decodes(message_type: type[message.Message], data: bytes) -> bool:
    try:
        message_type().ParseFromString(data)
    except message.DecodeError:
        return False
    return True


_STREAMING = [r for r in RPCS if r.client_streaming]


@pytest.mark.parametrize("rpc", _STREAMING, ids=[f"{r.service.rsplit('.', 1)[-1]}.{r.name}" for r in _STREAMING])
def test_an_undecodable_message_mid_stream_ends_the_call(mesh: Fuzzed, rpc: Rpc) -> None:
    """A request stream whose second message does not decode ends with INVALID_ARGUMENT (or the error the
    first message earned, if the server refused it before reading on), never a server fault."""
    first = GetMessageClass(rpc.input)()
    if rpc.service == "grpc.reflection.v1alpha.ServerReflection":
        first = reflection_pb2.ServerReflectionRequest(list_services="")
    outcome = check(mesh, rpc, [first.SerializeToString(), b"\x0a\x05ab", first.SerializeToString()])
    assert outcome.code is not grpc.StatusCode.OK, outcome
    if rpc.service == "grpc.reflection.v1alpha.ServerReflection":
        assert outcome.code is grpc.StatusCode.INVALID_ARGUMENT and "could not be decoded" in outcome.details


def _fuzz(rpc: Rpc) -> Callable[[Fuzzed], None]:
    examples = 12 if rpc.server_streaming and not rpc.client_streaming else 60

    @_settings(examples)
    @given(data=st.data())
    def fuzz(mesh: Fuzzed, data: st.DataObject) -> None:
        if rpc.client_streaming:
            requests = data.draw(st.lists(payloads(rpc), min_size=0, max_size=4), label="requests")
        else:
            requests = [data.draw(payloads(rpc), label="request")]
        check(mesh, rpc, requests)

    return fuzz


@pytest.mark.parametrize("rpc", RPCS, ids=_IDS)
def test_random_and_mutated_requests_never_get_a_server_fault(mesh: Fuzzed, rpc: Rpc) -> None:
    """Valid, mutated and hand-made bytes: any status but UNKNOWN and INTERNAL (and no hang)."""
    _fuzz(rpc)(mesh)
