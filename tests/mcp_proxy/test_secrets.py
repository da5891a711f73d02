"""No secret leaves the vault: after a proxy process has stored, used, refreshed and deleted credentials, and
refused bad requests, neither its database files, nor its log (at debug level), nor any RPC response or
error holds a secret or a session token."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from google.protobuf.message import Message

from managed_agents.mesh.errors import MeshError
from managed_agents.v1 import mcp_proxy_pb2
from mcp_proxy.client import McpProxyClient
from mcp_proxy.vault import VaultKey, write_key_file
from tests.helpers import ServiceProcess
from tests.mcp_proxy.servers import Upstream, credential_for

pytestmark = pytest.mark.slow


def _forms(secret: str) -> list[bytes]:
    """The ways a secret could sit in a file: as is, in base64, hex, or UTF-16."""
    raw = secret.encode()
    return [
        raw,
        base64.b64encode(raw),
        base64.urlsafe_b64encode(raw).rstrip(b"="),
        raw.hex().encode(),
        secret.encode("utf-16-le"),
    ]


async def test_no_secret_in_the_database_the_log_or_any_response(tmp_path: Path, mcp_upstream: Upstream) -> None:
    key_file = tmp_path / "vault.key"
    key = VaultKey.generate()
    write_key_file(key_file, key)
    data_dir = tmp_path / "proxy-data"
    process = ServiceProcess(
        "mcp_proxy",
        ["--data-dir", str(data_dir), "--key-file", str(key_file), "--log-level", "debug"],
        tmp_path,
    )
    client_secret = mcp_upstream.client_secret
    api_secret = "sk-live-APIKEY-0123456789abcdef"
    git_secret = "ghp_GITTOKEN0123456789abcdef"
    seen: list[str] = []  # every response and error, as text and as wire bytes

    def keep(message: Message) -> None:
        seen.append(str(message))
        seen.append(message.SerializeToString().decode("latin-1"))

    process.start()
    try:
        async with McpProxyClient.connect(process.address) as proxy:
            keep(await proxy.put_credential(*credential_for(mcp_upstream)))
            keep(
                await proxy.put_credential(
                    mcp_proxy_pb2.Credential(
                        name="search",
                        kind=mcp_proxy_pb2.CREDENTIAL_KIND_API_KEY,
                        allowed_hosts=["api.example.com"],
                    ),
                    mcp_proxy_pb2.CredentialSecret(token=api_secret),
                )
            )
            keep(
                await proxy.put_credential(
                    mcp_proxy_pb2.Credential(name="git", kind=mcp_proxy_pb2.CREDENTIAL_KIND_GIT_TOKEN),
                    mcp_proxy_pb2.CredentialSecret(token=git_secret),
                )
            )
            for credential in await proxy.list_credentials():
                keep(credential)
            minted = await proxy.mint_session_token("sess-1", ["files", "search"])
            session_token = minted.token
            for tool in await proxy.list_tools(session_token):
                keep(tool)
            keep(await proxy.call_tool(session_token, server="files", tool="add", arguments={"a": 1, "b": 2}))
            keep(await proxy.call_tool(session_token, server="files", tool="picture", arguments={}))
            # Refresh: the upstream refuses the access token, the proxy refreshes, stores, and retries.
            mcp_upstream.expire_access_tokens()
            keep(await proxy.call_tool(session_token, server="files", tool="echo", arguments={"text": "hi"}))
            assert mcp_upstream.refreshes == 1
            # A refresh that fails: the error result must explain without quoting anything secret.
            mcp_upstream.expire_access_tokens()
            mcp_upstream.client_secret = "rotated-elsewhere"
            failed = await proxy.call_tool(session_token, server="files", tool="echo", arguments={"text": "x"})
            assert failed.is_error
            keep(failed)
            # Refused requests, including ones carrying secrets in the wrong place.
            bad_requests = [
                proxy.put_credential(
                    mcp_proxy_pb2.Credential(name="Bad Name", kind=mcp_proxy_pb2.CREDENTIAL_KIND_API_KEY),
                    mcp_proxy_pb2.CredentialSecret(token=api_secret),
                ),
                proxy.put_credential(
                    mcp_proxy_pb2.Credential(name="bad", kind=mcp_proxy_pb2.CREDENTIAL_KIND_API_KEY),
                    mcp_proxy_pb2.CredentialSecret(token=api_secret + "\n"),
                ),
                proxy.call_tool(session_token, server="git", tool="clone", arguments={}),
                proxy.call_tool(session_token + "x", server="files", tool="add", arguments={}),
                proxy.list_tools(session_token[:-3]),
            ]
            for request in bad_requests:
                with pytest.raises(MeshError) as raised:
                    await request
                seen.append(str(raised.value))
                seen.extend(f"{v.field} {v.description}" for v in raised.value.violations)
                seen.extend(raised.value.metadata.values())
            assert await proxy.delete_credential("git")
    finally:
        code = process.terminate()
    assert code == 0, process.log()

    # The secrets did flow where they should: the upstream saw the vault's tokens and the refreshed one.
    assert mcp_upstream.access_token in mcp_upstream.presented
    assert mcp_upstream.issued[0] in mcp_upstream.presented

    secrets = {
        "access token": mcp_upstream.access_token,
        "refresh token": mcp_upstream.refresh_token,
        "client secret": client_secret,
        "refreshed access token": mcp_upstream.issued[0],
        "rotated refresh token": mcp_upstream.issued[1],
        "api key": api_secret,
        "git token (deleted)": git_secret,
        "vault key": key.to_text(),
    }
    files = {path: path.read_bytes() for path in data_dir.iterdir() if path.is_file()}
    assert any(path.name.startswith("vault.sqlite3") for path in files)
    log = process.log()
    assert "listening on" in log and "refreshed the access token of credential 'files'" in log
    responses = "\n".join(seen)
    for what, secret in secrets.items():
        for form in _forms(secret):
            for path, content in files.items():
                assert form not in content, f"the {what} is in {path.name}"
            assert form.decode("latin-1") not in log, f"the {what} is in the proxy's log"
            assert form.decode("latin-1") not in responses, f"the {what} is in an RPC response"
    # Session tokens are bearer secrets too: never logged, never stored.
    assert session_token not in log
    for path, content in files.items():
        assert session_token.encode() not in content, f"the session token is in {path.name}"
