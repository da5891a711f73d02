"""The vault key: made by `generate-key`, required (and checked) at start-up, never stored with the vault, and
rotated by `rotate-key`, after which the old key opens nothing. Also the process itself: it serves both
services under reflection and stops cleanly on SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import sys
from pathlib import Path

import pytest

from mcp_proxy import app
from mcp_proxy.client import McpProxyClient
from mcp_proxy.config import ProxyConfig
from mcp_proxy.vault import CredentialSpec, SqliteVault, VaultKey, VaultKeyError, open_sealed, write_key_file
from tests.contract.test_grpcurl import grpcurl
from tests.helpers import ROOT, ServiceProcess
from tests.mcp_proxy.servers import Upstream, credential_for

pytestmark = pytest.mark.slow


async def run(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    """`python -m mcp_proxy ARGS`: exit code and everything it printed."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mcp_proxy",
        *args,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode()


async def test_generate_key_writes_an_owner_only_key_and_never_overwrites(tmp_path: Path) -> None:
    key_file = tmp_path / "vault.key"
    code, out = await run("generate-key", "--key-file", str(key_file))
    assert code == 0, out
    assert key_file.stat().st_mode & 0o777 == 0o600
    key = VaultKey.from_text(key_file.read_text(), source="test")
    assert f"wrote vault key {key.key_id}" in out
    code, out = await run("generate-key", "--key-file", str(key_file))
    assert code == 2 and "refusing to overwrite" in out
    assert VaultKey.from_text(key_file.read_text(), source="test") == key


@pytest.mark.parametrize(
    ("setup", "expected"),
    [
        ("none", "no vault key: give --key-file FILE"),
        ("missing file", "does not exist"),
        ("readable by others", "can be read by other users (mode 0644)"),
        ("not base64", "is not base64 text"),
        ("short", "holds 16 bytes; a vault key is 32 random bytes"),
        ("short env", "MCP_PROXY_VAULT_KEY holds 3 bytes"),
    ],
)
async def test_a_missing_or_unusable_key_is_exit_2_with_a_sentence(tmp_path: Path, setup: str, expected: str) -> None:
    key_file = tmp_path / "vault.key"
    args = ["--listen", "127.0.0.1:0", "--data-dir", str(tmp_path / "data")]
    env = {"MCP_PROXY_VAULT_KEY": "", "MCP_PROXY_KEY_FILE": ""}
    if setup == "readable by others":
        write_key_file(key_file, VaultKey.generate())
        key_file.chmod(0o644)
    elif setup == "not base64":
        key_file.write_text("this is not a key!")
        key_file.chmod(0o600)
    elif setup == "short":
        key_file.write_text("A" * 22 + "==")
        key_file.chmod(0o600)
    elif setup == "short env":
        env["MCP_PROXY_VAULT_KEY"] = "AAAA"
    if setup in ("missing file", "readable by others", "not base64", "short"):
        args += ["--key-file", str(key_file)]
    code, out = await run(*args, env=env)
    assert code == 2, out
    assert expected in out
    assert "Traceback" not in out
    # Refused before the vault was touched.
    assert not (tmp_path / "data").exists()


async def test_a_key_from_the_environment_serves_and_the_wrong_key_is_refused(
    tmp_path: Path, mcp_upstream: Upstream
) -> None:
    data_dir = tmp_path / "data"
    key = VaultKey.generate()
    process = ServiceProcess(
        "mcp_proxy", ["--data-dir", str(data_dir)], tmp_path, env={"MCP_PROXY_VAULT_KEY": key.to_text()}
    )
    process.start()
    try:
        code, out, err = await grpcurl(process.address, "list")
        assert code == 0, err
        assert {"managed_agents.v1.VaultService", "managed_agents.v1.McpProxyService"} <= set(out.split())
        async with McpProxyClient.connect(process.address) as proxy:
            await proxy.put_credential(*credential_for(mcp_upstream))
        # A second proxy on the same vault is refused: the data directory is locked.
        code, out = await run(
            "--listen", "127.0.0.1:0", "--data-dir", str(data_dir), env={"MCP_PROXY_VAULT_KEY": key.to_text()}
        )
        assert code == 2 and "in use by another mcp_proxy process" in out
    finally:
        assert process.terminate() == 0, process.log()
    assert "listening on" in process.log()
    code, out = await run(
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        str(data_dir),
        env={"MCP_PROXY_VAULT_KEY": VaultKey.generate().to_text()},
    )
    assert code == 2 and f"was sealed with key id {key.key_id}" in out


async def test_rotate_key_reencrypts_everything_and_the_old_key_opens_nothing(
    tmp_path: Path, mcp_upstream: Upstream
) -> None:
    data_dir = tmp_path / "data"
    old_file, new_file = tmp_path / "old.key", tmp_path / "new.key"
    old, new = VaultKey.generate(), VaultKey.generate()
    write_key_file(old_file, old)
    write_key_file(new_file, new)
    config = ProxyConfig(listen="127.0.0.1:0", data_dir=data_dir)

    server = await app.start(config, old, None)
    async with McpProxyClient.connect(server.address) as proxy:
        await proxy.put_credential(*credential_for(mcp_upstream))
        await proxy.put_credential(*credential_for(mcp_upstream, name="files-too"))
        old_token = (await proxy.mint_session_token("sess-1", ["files"])).token
        # Rotation refuses to run beside a serving proxy.
        code, out = await run(
            "rotate-key",
            "--data-dir",
            str(data_dir),
            "--old-key-file",
            str(old_file),
            "--new-key-file",
            str(new_file),
        )
        assert code == 2 and "in use by another mcp_proxy process" in out
    await server.aclose(grace=1.0)

    code, out = await run(
        "rotate-key",
        "--data-dir",
        str(data_dir),
        "--old-key-file",
        str(new_file),
        "--new-key-file",
        str(old_file),
    )
    assert code == 2 and f"the old key (id {new.key_id}) does not open" in out
    code, out = await run(
        "rotate-key",
        "--data-dir",
        str(data_dir),
        "--old-key-file",
        str(old_file),
        "--new-key-file",
        str(new_file),
    )
    assert code == 0, out
    assert f"re-encrypted 2 credentials of {data_dir}: key {old.key_id} -> {new.key_id}" in out

    with pytest.raises(VaultKeyError, match="does not open"):
        await SqliteVault.open(data_dir, old)
    db = sqlite3.connect(data_dir / "vault.sqlite3")
    rows = db.execute("SELECT name, kind, spec, key_id, sealed FROM credentials").fetchall()
    db.close()
    assert {row[3] for row in rows} == {new.key_id}
    for name, kind, spec, _key_id, sealed in rows:
        with pytest.raises(Exception, match="fails authentication"):
            open_sealed(old, CredentialSpec.from_json(name, kind, spec), sealed)
    assert old.to_text().encode() not in (data_dir / "vault.sqlite3").read_bytes()
    assert json.dumps(new.to_text()).encode() not in (data_dir / "vault.sqlite3").read_bytes()

    server = await app.start(config, new, None)
    async with McpProxyClient.connect(server.address) as proxy:
        assert [c.name for c in await proxy.list_credentials()] == ["files", "files-too"]
        # Tokens were signed with a key derived from the old one; sessions mint new ones.
        with pytest.raises(Exception, match="signature does not verify"):
            await proxy.list_tools(old_token)
        token = (await proxy.mint_session_token("sess-1", ["files"])).token
        result = await proxy.call_tool(token, server="files", tool="add", arguments={"a": 20, "b": 22})
        assert result.content[0].text.text == "42"
    await server.aclose(grace=1.0)
    assert mcp_upstream.presented[-1] == mcp_upstream.access_token
