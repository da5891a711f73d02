"""The vault's database holds ciphertext bound to each credential's name, kind and destination."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from mcp_proxy.vault import CredentialKind, CredentialSpec, Secret, SqliteVault, VaultKey


async def test_secrets_are_sealed_and_bound_to_their_credential(tmp_path: Path) -> None:
    vault_key = VaultKey.generate()
    data_dir = tmp_path / "vault"
    vault = await SqliteVault.open(data_dir, vault_key)
    spec = CredentialSpec("files", CredentialKind.MCP_OAUTH, mcp_server_url="https://mcp.example.com/mcp")
    await vault.put(spec, Secret(token="tok-plain-123", refresh_token="ref-plain-456"), token_ttl_us=0)
    await vault.put(
        CredentialSpec("other", CredentialKind.API_KEY), Secret(token="other-secret-789"), token_ttl_us=0
    )
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
        "UPDATE credentials SET sealed = (SELECT sealed FROM credentials WHERE name = 'other') "
        "WHERE name = 'files'"
    )
    db.commit()
    db.close()
    vault = await SqliteVault.open(data_dir, vault_key)
    with pytest.raises(Exception, match="fails authentication"):
        await vault.secret("files")
    assert (await vault.secret("other"))[1].token == "other-secret-789"
    await vault.aclose()
