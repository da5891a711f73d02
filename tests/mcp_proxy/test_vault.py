"""The vault over gRPC: credentials go in and come back as metadata only; bad input is refused and writes
nothing; the database holds ciphertext bound to each credential's name, kind and destination."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import pytest
from google.protobuf import duration_pb2

from managed_agents.mesh.channel import dial
from managed_agents.mesh.errors import InvalidArgument
from managed_agents.v1 import mcp_proxy_pb2, mcp_proxy_pb2_grpc
from mcp_proxy.app import ProxyServer
from mcp_proxy.client import McpProxyClient
from mcp_proxy.vault import CredentialKind, CredentialSpec, Secret, SqliteVault, VaultKey
from tests.mcp_proxy.servers import Upstream, credential_for

MCP = mcp_proxy_pb2.CREDENTIAL_KIND_MCP_OAUTH
GIT = mcp_proxy_pb2.CREDENTIAL_KIND_GIT_TOKEN
API = mcp_proxy_pb2.CREDENTIAL_KIND_API_KEY


def api_key(
    name: str, token: str = "sk-test-123", hosts: tuple[str, ...] = ("api.example.com",)
) -> tuple[mcp_proxy_pb2.Credential, mcp_proxy_pb2.CredentialSecret]:
    return (
        mcp_proxy_pb2.Credential(name=name, kind=API, allowed_hosts=hosts),
        mcp_proxy_pb2.CredentialSecret(token=token),
    )


async def test_put_list_and_delete_credentials(proxy: McpProxyClient, mcp_upstream: Upstream) -> None:
    stored = await proxy.put_credential(*credential_for(mcp_upstream))
    assert stored.name == "files" and stored.kind == MCP
    assert stored.mcp_server_url == mcp_upstream.url and stored.token_endpoint == mcp_upstream.token_endpoint
    assert stored.client_id == "proxy-client"
    assert abs(stored.create_time.ToSeconds() - time.time()) < 5
    assert not stored.HasField("expire_time")
    await proxy.put_credential(*api_key("search", hosts=("API.example.com", "api.example.com:8443")))
    git = await proxy.put_credential(
        mcp_proxy_pb2.Credential(name="github", kind=GIT, allowed_hosts=["github.com"]),
        mcp_proxy_pb2.CredentialSecret(token="ghp_x"),
    )
    assert list(git.allowed_hosts) == ["github.com"]

    listed = await proxy.list_credentials()
    assert [c.name for c in listed] == ["files", "github", "search"]
    assert list(listed[2].allowed_hosts) == ["api.example.com", "api.example.com:8443"]

    assert await proxy.delete_credential("github") is True
    assert await proxy.delete_credential("github") is False
    assert [c.name for c in await proxy.list_credentials()] == ["files", "search"]


async def test_putting_again_replaces_the_secret_and_keeps_the_creation_time(proxy: McpProxyClient) -> None:
    first = await proxy.put_credential(*api_key("search", token="old-key"))
    credential, secret = api_key("search", token="new-key")
    secret.token_ttl.FromSeconds(600)
    second = await proxy.put_credential(credential, secret)
    assert second.create_time == first.create_time
    assert second.update_time.ToMicroseconds() > first.update_time.ToMicroseconds()
    assert 590 < second.expire_time.ToSeconds() - time.time() <= 600
    assert len(await proxy.list_credentials()) == 1


async def test_list_credentials_pages_by_name(proxy_server: ProxyServer, proxy: McpProxyClient) -> None:
    names = [f"key-{i:02d}" for i in range(7)]
    for name in reversed(names):
        await proxy.put_credential(*api_key(name))
    channel = dial(proxy_server.address)
    stub = mcp_proxy_pb2_grpc.VaultServiceStub(channel)
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        page = await stub.ListCredentials(mcp_proxy_pb2.ListCredentialsRequest(page_size=3, page_token=token))
        seen.extend(c.name for c in page.credentials)
        pages += 1
        token = page.next_page_token
        if not token:
            break
    await channel.close()
    assert seen == names and pages == 3
    assert [c.name for c in await proxy.list_credentials()] == names


async def test_secrets_are_sealed_and_bound_to_their_credential(tmp_path: Path) -> None:
    vault_key = VaultKey.generate()
    data_dir = tmp_path / "vault"
    vault = await SqliteVault.open(data_dir, vault_key)
    spec = CredentialSpec("files", CredentialKind.MCP_OAUTH, mcp_server_url="https://mcp.example.com/mcp")
    await vault.put(spec, Secret(token="tok-plain-123", refresh_token="ref-plain-456"), token_ttl_us=0)
    await vault.put(CredentialSpec("other", CredentialKind.API_KEY), Secret(token="other-secret-789"), token_ttl_us=0)
    _, secret = await vault.secret("files")
    assert (secret.token, secret.refresh_token) == ("tok-plain-123", "ref-plain-456")
    assert "tok-plain-123" not in repr(secret)
    await vault.aclose()
    assert (data_dir / "vault.sqlite3").stat().st_mode & 0o777 == 0o600
    assert data_dir.stat().st_mode & 0o777 == 0o700

    # Someone with the database but not the key points the credential at their own server...
    db = sqlite3.connect(data_dir / "vault.sqlite3")
    db.execute("UPDATE credentials SET spec = replace(spec, 'mcp.example.com', 'evil.example.net')")
    db.commit()
    vault = await SqliteVault.open(data_dir, vault_key)
    with pytest.raises(Exception, match="fails authentication"):
        await vault.secret("files")
    await vault.aclose()
    # ...or moves another credential's ciphertext under this name: neither opens.
    db.execute("UPDATE credentials SET spec = replace(spec, 'evil.example.net', 'mcp.example.com')")
    db.execute(
        "UPDATE credentials SET sealed = (SELECT sealed FROM credentials WHERE name = 'other') WHERE name = 'files'"
    )
    db.commit()
    db.close()
    vault = await SqliteVault.open(data_dir, vault_key)
    with pytest.raises(Exception, match="fails authentication"):
        await vault.secret("files")
    assert (await vault.secret("other"))[1].token == "other-secret-789"
    await vault.aclose()


Call = Callable[[mcp_proxy_pb2_grpc.VaultServiceStub], Awaitable[object]]


def _put(credential: mcp_proxy_pb2.Credential, secret: mcp_proxy_pb2.CredentialSecret | None = None) -> Call:
    request = mcp_proxy_pb2.PutCredentialRequest(credential=credential)
    if secret is not None:
        request.secret.CopyFrom(secret)
    return lambda stub: stub.PutCredential(request)


def _mcp(**fields: object) -> mcp_proxy_pb2.Credential:
    values: dict[str, object] = {"name": "srv", "kind": MCP, "mcp_server_url": "https://mcp.example.com/mcp"}
    values.update(fields)
    return mcp_proxy_pb2.Credential(**values)  # type: ignore[arg-type]


TOKEN = mcp_proxy_pb2.CredentialSecret(token="t0k3n")

BAD_PUTS: dict[str, tuple[Call, str]] = {
    "no credential": (
        lambda s: s.PutCredential(mcp_proxy_pb2.PutCredentialRequest(secret=TOKEN)),
        "credential:",
    ),
    "no secret": (_put(_mcp()), "secret: is required"),
    "no name": (_put(_mcp(name=""), TOKEN), "credential.name: is required"),
    "upper-case name": (_put(_mcp(name="Files"), TOKEN), "credential.name"),
    "long name": (_put(_mcp(name="x" * 65), TOKEN), "credential.name"),
    "name with the separator": (_put(_mcp(name="a__b"), TOKEN), "must not contain '__'"),
    "no kind": (_put(_mcp(kind=0), TOKEN), "credential.kind"),
    "unknown kind": (_put(_mcp(kind=9), TOKEN), "credential.kind"),
    "no server url": (_put(_mcp(mcp_server_url=""), TOKEN), "credential.mcp_server_url: is required"),
    "ftp url": (_put(_mcp(mcp_server_url="ftp://x/mcp"), TOKEN), "http:// or https://"),
    "url with a password": (_put(_mcp(mcp_server_url="https://u:p@x/mcp"), TOKEN), "user name or password"),
    "url with a newline": (_put(_mcp(mcp_server_url="https://x/\nmcp"), TOKEN), "control characters"),
    "url too long": (_put(_mcp(mcp_server_url="https://x/" + "a" * 2048), TOKEN), "longer than 2048"),
    "bad port": (_put(_mcp(mcp_server_url="https://x:99999/mcp"), TOKEN), "not a URL"),
    "hosts on an mcp credential": (_put(_mcp(allowed_hosts=["x.com"]), TOKEN), "allowed_hosts"),
    "mcp url on an api key": (
        _put(mcp_proxy_pb2.Credential(name="k", kind=API, mcp_server_url="https://x/"), TOKEN),
        "only for CREDENTIAL_KIND_MCP_OAUTH",
    ),
    "bad host": (
        _put(mcp_proxy_pb2.Credential(name="k", kind=API, allowed_hosts=["not a host"]), TOKEN),
        "allowed_hosts[0]",
    ),
    "empty secret": (_put(_mcp(), mcp_proxy_pb2.CredentialSecret()), "needs a token, a refresh_token"),
    "refresh without endpoint": (
        _put(_mcp(), mcp_proxy_pb2.CredentialSecret(refresh_token="r")),
        "token_endpoint: is required",
    ),
    "oversized token": (
        _put(_mcp(), mcp_proxy_pb2.CredentialSecret(token="x" * (16 * 1024 + 1))),
        "the limit is 16384",
    ),
    "token with a line break": (
        _put(_mcp(), mcp_proxy_pb2.CredentialSecret(token="abc\r\nX-Injected: 1")),
        "visible ASCII",
    ),
    "api key without a token": (
        _put(mcp_proxy_pb2.Credential(name="k", kind=API), mcp_proxy_pb2.CredentialSecret()),
        "secret.token: is required",
    ),
    "negative token ttl": (
        _put(_mcp(), mcp_proxy_pb2.CredentialSecret(token="t", token_ttl=duration_pb2.Duration(seconds=-5))),
        "secret.token_ttl",
    ),
    "bad delete name": (
        lambda s: s.DeleteCredential(mcp_proxy_pb2.DeleteCredentialRequest(name="../etc")),
        "name",
    ),
    "negative page size": (
        lambda s: s.ListCredentials(mcp_proxy_pb2.ListCredentialsRequest(page_size=-1)),
        "page_size",
    ),
    "forged page token": (
        lambda s: s.ListCredentials(mcp_proxy_pb2.ListCredentialsRequest(page_token="garbage")),
        "page_token",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_PUTS))
async def test_bad_vault_requests_are_invalid_argument_and_write_nothing(
    case: str, proxy_server: ProxyServer, proxy: McpProxyClient
) -> None:
    await proxy.put_credential(*api_key("kept"))
    call, expected = BAD_PUTS[case]
    channel = dial(proxy_server.address)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await call(mcp_proxy_pb2_grpc.VaultServiceStub(channel))
    finally:
        await channel.close()
    details = raised.value.details() or ""
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, details
    assert expected in details
    assert "Traceback" not in details and "t0k3n" not in details and "abc" not in details
    assert [c.name for c in await proxy.list_credentials()] == ["kept"]


async def test_invalid_arguments_reach_clients_typed_with_the_field(proxy: McpProxyClient) -> None:
    with pytest.raises(InvalidArgument) as raised:
        await proxy.put_credential(*api_key("Bad Name"))
    assert raised.value.violations[0].field == "credential.name"
