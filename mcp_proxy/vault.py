"""The credential vault: secrets sealed with AES-256-GCM in one SQLite file, readable only with the vault key.

Each credential row holds its metadata in clear (name, kind, where the secret may be sent) and its secret as
`nonce || AES-256-GCM(key, secret JSON)`, with the name, kind and metadata as associated data: a ciphertext
moved to another row, or a row whose server URL was edited to point elsewhere, fails authentication instead
of sending the secret somewhere new. Every row names the id of the key that sealed it, and the database
keeps a key check value, so the wrong key is refused at start-up with a sentence rather than at first use.
The key itself never touches the database; `rotate_key` re-seals every row under a new key in one
transaction, after which the old key opens nothing.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import enum
import fcntl
import hashlib
import hmac
import json
import os
import sqlite3
import stat
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import aiosqlite
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from managed_agents.mesh.errors import CredentialNotFound, Internal

KEY_BYTES = 32
NONCE_BYTES = 12
DATABASE_NAME = "vault.sqlite3"
SCHEMA_VERSION = 1
_KEY_CHECK_PLAINTEXT = b"managed-agents vault key check v1"
_KEY_CHECK_AAD = b"managed-agents/vault/key-check"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS credentials (
    name        TEXT PRIMARY KEY,
    kind        INTEGER NOT NULL,
    spec        TEXT NOT NULL,
    key_id      TEXT NOT NULL,
    sealed      BLOB NOT NULL,
    create_time INTEGER NOT NULL,
    update_time INTEGER NOT NULL,
    expire_time INTEGER NOT NULL
) WITHOUT ROWID;
"""


class VaultKeyError(Exception):
    """The vault key is missing, malformed, unsafe to use, or does not open this vault."""


class VaultLocked(Exception):
    """Another process holds the vault's data directory."""


class CredentialKind(enum.IntEnum):
    """Kind of a credential; the numbers match `managed_agents.v1.CredentialKind`."""

    MCP_OAUTH = 1
    GIT_TOKEN = 2
    API_KEY = 3


@dataclass(frozen=True, slots=True)
class CredentialSpec:
    """A credential's metadata: what it is and where its secret may be sent. Never secret itself."""

    name: str
    kind: CredentialKind
    mcp_server_url: str = ""
    token_endpoint: str = ""
    client_id: str = ""
    allowed_hosts: tuple[str, ...] = ()

    def to_json(self) -> str:
        """Canonical JSON of the metadata, stable across versions (it is part of the associated data)."""
        return json.dumps(
            {
                "mcp_server_url": self.mcp_server_url,
                "token_endpoint": self.token_endpoint,
                "client_id": self.client_id,
                "allowed_hosts": list(self.allowed_hosts),
            },
            sort_keys=True,
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, name: str, kind: int, text: str) -> CredentialSpec:
        """The spec of a stored row."""
        data = json.loads(text)
        return cls(
            name=name,
            kind=CredentialKind(kind),
            mcp_server_url=str(data.get("mcp_server_url", "")),
            token_endpoint=str(data.get("token_endpoint", "")),
            client_id=str(data.get("client_id", "")),
            allowed_hosts=tuple(str(h) for h in data.get("allowed_hosts", ())),
        )


@dataclass(frozen=True, slots=True)
class Secret:
    """Secret material of a credential. Its repr shows nothing, so a log line or traceback cannot leak it."""

    token: str = field(default="", repr=False)
    refresh_token: str = field(default="", repr=False)
    client_secret: str = field(default="", repr=False)

    def to_bytes(self) -> bytes:
        """The plaintext that gets sealed."""
        return json.dumps(
            {"token": self.token, "refresh_token": self.refresh_token, "client_secret": self.client_secret},
            separators=(",", ":"),
        ).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Secret:
        """The secret of an opened plaintext."""
        values = json.loads(data)
        return cls(
            token=str(values.get("token", "")),
            refresh_token=str(values.get("refresh_token", "")),
            client_secret=str(values.get("client_secret", "")),
        )


@dataclass(frozen=True, slots=True)
class CredentialRecord:
    """A stored credential's metadata and times (microseconds since the epoch; 0 = not known)."""

    spec: CredentialSpec
    create_time_us: int
    update_time_us: int
    expire_time_us: int


@dataclass(frozen=True, slots=True)
class VaultKey:
    """A 256-bit vault key. Its repr shows only the key id."""

    material: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if len(self.material) != KEY_BYTES:
            raise VaultKeyError(f"a vault key is {KEY_BYTES} bytes; this one has {len(self.material)}")

    @property
    def key_id(self) -> str:
        """A short public name of the key, derived one-way so it says nothing about the key."""
        return hmac.new(self.material, b"managed-agents vault key id", hashlib.sha256).hexdigest()[:16]

    @classmethod
    def generate(cls) -> VaultKey:
        """A new random key."""
        return cls(os.urandom(KEY_BYTES))

    @classmethod
    def from_text(cls, text: str, *, source: str) -> VaultKey:
        """The key written as base64 (standard or URL-safe, padding optional) in `source`."""
        value = text.strip()
        try:
            material = base64.b64decode(value.replace("-", "+").replace("_", "/") + "=" * (-len(value) % 4))
        except (binascii.Error, ValueError):
            raise VaultKeyError(f"{source} is not base64 text") from None
        if len(material) != KEY_BYTES:
            raise VaultKeyError(
                f"{source} holds {len(material)} bytes; a vault key is {KEY_BYTES} random bytes in base64 "
                "(make one with `python -m mcp_proxy generate-key --key-file FILE`)"
            )
        return cls(material)

    def to_text(self) -> str:
        """The key as base64, as key files and `MCP_PROXY_VAULT_KEY` hold it."""
        return base64.b64encode(self.material).decode()

    def derive(self, purpose: bytes) -> bytes:
        """A 32-byte subkey for `purpose` (HKDF-SHA256), so one key never serves two algorithms."""
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=purpose).derive(self.material)


def read_key_file(path: Path) -> VaultKey:
    """The key in `path`, which must be a regular file that only its owner can read."""
    try:
        info = path.stat()
    except FileNotFoundError:
        raise VaultKeyError(
            f"key file {path} does not exist (make one with `python -m mcp_proxy generate-key --key-file {path}`)"
        ) from None
    except OSError as exc:
        raise VaultKeyError(f"cannot read key file {path}: {exc.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise VaultKeyError(f"key file {path} is not a regular file")
    if info.st_mode & 0o077:
        raise VaultKeyError(
            f"key file {path} can be read by other users (mode {stat.S_IMODE(info.st_mode):04o}); "
            f"run `chmod 600 {path}`"
        )
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise VaultKeyError(f"cannot read key file {path}: {exc}") from None
    return VaultKey.from_text(text, source=f"key file {path}")


def write_key_file(path: Path, key: VaultKey) -> None:
    """Writes `key` to a new file `path` with mode 0600; refuses to overwrite an existing file."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise VaultKeyError(f"{path} exists; refusing to overwrite a key (that would lose a vault)") from None
    except OSError as exc:
        raise VaultKeyError(f"cannot create {path}: {exc.strerror}") from None
    with os.fdopen(fd, "w") as out:
        out.write(key.to_text() + "\n")


# Sealing -------------------------------------------------------------------------------------------------


def _associated_data(spec: CredentialSpec) -> bytes:
    return b"\0".join(
        (
            b"managed-agents/vault/v1",
            spec.name.encode(),
            str(int(spec.kind)).encode(),
            spec.to_json().encode(),
        )
    )


def seal(key: VaultKey, spec: CredentialSpec, secret: Secret) -> bytes:
    """`nonce || ciphertext+tag` of `secret`, bound to `spec`."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key.material).encrypt(nonce, secret.to_bytes(), _associated_data(spec))


def open_sealed(key: VaultKey, spec: CredentialSpec, sealed: bytes) -> Secret:
    """The secret sealed for `spec`; raises `Internal` if it fails authentication."""
    try:
        plain = AESGCM(key.material).decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], _associated_data(spec))
    except (InvalidTag, ValueError):
        raise Internal(
            f"the vault entry of credential {spec.name!r} fails authentication: it was altered outside the "
            "proxy; put the credential again"
        ) from None
    return Secret.from_bytes(plain)


def _key_check(key: VaultKey) -> str:
    nonce = os.urandom(NONCE_BYTES)
    sealed = nonce + AESGCM(key.material).encrypt(nonce, _KEY_CHECK_PLAINTEXT, _KEY_CHECK_AAD)
    return base64.b64encode(sealed).decode()


def _key_opens(key: VaultKey, check: str) -> bool:
    sealed = base64.b64decode(check)
    try:
        return (
            AESGCM(key.material).decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], _KEY_CHECK_AAD)
            == _KEY_CHECK_PLAINTEXT
        )
    except InvalidTag:
        return False


# The interface -------------------------------------------------------------------------------------------


class Vault(Protocol):
    """Where credentials live. Only the proxy's own code reads secrets back (`secret`); no RPC does."""

    async def put(self, spec: CredentialSpec, secret: Secret, *, token_ttl_us: int) -> CredentialRecord:
        """Stores a credential, replacing one of the same name (whose creation time it keeps)."""
        ...

    async def get(self, name: str) -> CredentialRecord:
        """A credential's metadata; raises `CredentialNotFound`."""
        ...

    async def list(self, *, after: str, limit: int) -> list[CredentialRecord]:
        """Up to `limit` credentials whose names sort after `after`, by name."""
        ...

    async def delete(self, name: str) -> bool:
        """Deletes a credential; True if it existed."""
        ...

    async def secret(self, name: str) -> tuple[CredentialRecord, Secret]:
        """A credential with its opened secret; raises `CredentialNotFound`."""
        ...

    async def update_tokens(
        self, record: CredentialRecord, *, token: str, refresh_token: str, token_ttl_us: int
    ) -> CredentialRecord:
        """Replaces the access and refresh tokens after a refresh that started from `record`.

        Raises:
            CredentialNotFound: the credential was deleted or replaced since `record` (the newer put wins).
        """
        ...

    async def aclose(self) -> None:
        """Closes the database."""
        ...


# SQLite --------------------------------------------------------------------------------------------------


def _now_us() -> int:
    return time.time_ns() // 1000


def _expire_us(now_us: int, token_ttl_us: int) -> int:
    return now_us + token_ttl_us if token_ttl_us > 0 else 0


def _lock(data_dir: Path) -> int:
    """Creates (mode 0700) and locks `data_dir` for this process; the lock dies with the process."""
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    lock_fd = os.open(data_dir / "LOCK", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(lock_fd)
        raise VaultLocked(
            f"{data_dir} is in use by another mcp_proxy process; stop it first (or give this one its own --data-dir)"
        ) from None
    return lock_fd


def _create_private(path: Path) -> None:
    # SQLite creates files with the process umask; make the database owner-only before it ever holds a byte.
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.close(fd)
    os.chmod(path, 0o600)


async def _connect(path: Path) -> aiosqlite.Connection:
    _create_private(path)
    conn = await aiosqlite.connect(path, isolation_level=None)
    # FULL: a refreshed token lost to a power failure after the fact would strand a rotated refresh token.
    # secure_delete: deleted credentials are overwritten in the file, not left in free pages.
    for pragma in ("journal_mode = WAL", "synchronous = FULL", "secure_delete = ON", "foreign_keys = ON"):
        await conn.execute(f"PRAGMA {pragma}")
    await conn.executescript(_SCHEMA)
    return conn


async def _meta(conn: aiosqlite.Connection, key: str) -> str | None:
    async with conn.execute("SELECT value FROM meta WHERE key = ?", (key,)) as cursor:
        row = await cursor.fetchone()
    return None if row is None else str(row[0])


async def _check_key(conn: aiosqlite.Connection, key: VaultKey, path: Path) -> None:
    """Refuses a key that did not seal this vault; stamps a new vault with the key's check value."""
    check = await _meta(conn, "key_check")
    if check is None:
        await conn.execute("BEGIN IMMEDIATE")
        await conn.executemany(
            "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
            [("schema_version", str(SCHEMA_VERSION)), ("key_id", key.key_id), ("key_check", _key_check(key))],
        )
        await conn.execute("COMMIT")
        return
    if not _key_opens(key, check):
        raise VaultKeyError(
            f"the vault key (id {key.key_id}) does not open {path}, which was sealed with key id "
            f"{await _meta(conn, 'key_id')}; give the key it was created or last rotated with"
        )


_RECORD_COLUMNS = "name, kind, spec, key_id, sealed, create_time, update_time, expire_time"


def _record(row: Sequence[object]) -> CredentialRecord:
    name, kind, spec, _key_id, _sealed, create, update, expire = row
    return CredentialRecord(
        spec=CredentialSpec.from_json(str(name), int(str(kind)), str(spec)),
        create_time_us=int(str(create)),
        update_time_us=int(str(update)),
        expire_time_us=int(str(expire)),
    )


@dataclass(frozen=True, slots=True)
class _Entry:
    """A credential row as held in memory: metadata and the still-sealed secret."""

    record: CredentialRecord
    key_id: str
    sealed: bytes = field(repr=False)


class SqliteVault:
    """`Vault` in `DATA_DIR/vault.sqlite3`, sealed with one key; the data directory is locked while open.

    Every row is also held in memory, still sealed (a secret is opened only for the use that needs it), so
    the per-call lookups of the proxy cost no database round trip. That is sound because this object is the
    only writer: the data directory lock keeps any other process out, and every write updates both.
    """

    def __init__(self, conn: aiosqlite.Connection, key: VaultKey, lock_fd: int, entries: dict[str, _Entry]) -> None:
        self._conn = conn
        self._key = key
        self._lock_fd = lock_fd
        self._entries = entries
        # Writes run one at a time, so the database and the in-memory rows change together.
        self._writing = asyncio.Lock()

    @classmethod
    async def open(cls, data_dir: Path, key: VaultKey) -> SqliteVault:
        """Opens (creating if needed) the vault in `data_dir`; raises `VaultKeyError` for the wrong key."""
        lock_fd = _lock(data_dir)
        path = data_dir / DATABASE_NAME
        try:
            conn = await _connect(path)
            try:
                await _check_key(conn, key, path)
                async with conn.execute(f"SELECT {_RECORD_COLUMNS} FROM credentials") as cursor:
                    rows = await cursor.fetchall()
            except BaseException:
                await conn.close()
                raise
        except BaseException:
            os.close(lock_fd)
            raise
        entries = {str(row[0]): _Entry(_record(tuple(row)), str(row[3]), bytes(row[4])) for row in rows}
        return cls(conn, key, lock_fd, entries)

    async def aclose(self) -> None:
        """Closes the database and releases the data directory."""
        await self._conn.close()
        os.close(self._lock_fd)

    def _entry(self, name: str) -> _Entry:
        entry = self._entries.get(name)
        if entry is None:
            raise CredentialNotFound(f"no credential is named {name!r}; PutCredential stores one")
        return entry

    async def put(self, spec: CredentialSpec, secret: Secret, *, token_ttl_us: int) -> CredentialRecord:
        async with self._writing:
            return await self._put(spec, secret, token_ttl_us=token_ttl_us)

    async def _put(self, spec: CredentialSpec, secret: Secret, *, token_ttl_us: int) -> CredentialRecord:
        now = _now_us()
        old = self._entries.get(spec.name)
        record = CredentialRecord(
            spec=spec,
            create_time_us=old.record.create_time_us if old else now,
            update_time_us=now,
            expire_time_us=_expire_us(now, token_ttl_us),
        )
        entry = _Entry(record, self._key.key_id, seal(self._key, spec, secret))
        # One statement, so the row is either wholly old or wholly new.
        await self._conn.execute(
            f"INSERT OR REPLACE INTO credentials ({_RECORD_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                spec.name,
                int(spec.kind),
                spec.to_json(),
                entry.key_id,
                entry.sealed,
                record.create_time_us,
                record.update_time_us,
                record.expire_time_us,
            ),
        )
        self._entries[spec.name] = entry
        return record

    async def get(self, name: str) -> CredentialRecord:
        return self._entry(name).record

    async def list(self, *, after: str, limit: int) -> list[CredentialRecord]:
        names = sorted(name for name in self._entries if name > after)[:limit]
        return [self._entries[name].record for name in names]

    async def delete(self, name: str) -> bool:
        async with self._writing:
            if name not in self._entries:
                return False
            await self._conn.execute("DELETE FROM credentials WHERE name = ?", (name,))
            del self._entries[name]
            return True

    async def secret(self, name: str) -> tuple[CredentialRecord, Secret]:
        entry = self._entry(name)
        if entry.key_id != self._key.key_id:
            raise Internal(
                f"credential {name!r} was sealed with key id {entry.key_id}, not the current key "
                f"{self._key.key_id}; finish the key rotation (`python -m mcp_proxy rotate-key`)"
            )
        return entry.record, open_sealed(self._key, entry.record.spec, entry.sealed)

    async def update_tokens(
        self, record: CredentialRecord, *, token: str, refresh_token: str, token_ttl_us: int
    ) -> CredentialRecord:
        name = record.spec.name
        async with self._writing:
            current = self._entries.get(name)
            if current is None or current.record != record:
                raise CredentialNotFound(f"credential {name!r} was deleted or replaced during a token refresh")
            _, old = await self.secret(name)
            now = _now_us()
            new = Secret(token=token, refresh_token=refresh_token, client_secret=old.client_secret)
            updated = CredentialRecord(record.spec, record.create_time_us, now, _expire_us(now, token_ttl_us))
            entry = _Entry(updated, self._key.key_id, seal(self._key, record.spec, new))
            await self._conn.execute(
                "UPDATE credentials SET sealed = ?, key_id = ?, update_time = ?, expire_time = ? WHERE name = ?",
                (entry.sealed, entry.key_id, updated.update_time_us, updated.expire_time_us, name),
            )
            self._entries[name] = entry
            return updated


def rotate_key(data_dir: Path, old: VaultKey, new: VaultKey) -> int:
    """Re-seals every credential in `data_dir` under `new`, in one transaction; returns how many.

    Synchronous on purpose: it runs from the command line, never beside a serving proxy (the data directory
    lock makes sure of that). After it commits, `old` no longer opens the vault.
    """
    if old.key_id == new.key_id:
        raise VaultKeyError("the old and new keys are the same key")
    lock_fd = _lock(data_dir)
    path = data_dir / DATABASE_NAME
    try:
        if not path.exists():
            raise VaultKeyError(f"there is no vault in {data_dir} ({DATABASE_NAME} is missing)")
        conn = sqlite3.connect(path, isolation_level=None)
        try:
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA secure_delete = ON")
            conn.execute("BEGIN IMMEDIATE")
            check = conn.execute("SELECT value FROM meta WHERE key = 'key_check'").fetchone()
            if check is None or not _key_opens(old, str(check[0])):
                raise VaultKeyError(f"the old key (id {old.key_id}) does not open {path}")
            rows = conn.execute(f"SELECT {_RECORD_COLUMNS} FROM credentials").fetchall()
            for row in rows:
                record = _record(row)
                if str(row[3]) != old.key_id:
                    raise VaultKeyError(
                        f"credential {record.spec.name!r} is sealed with key id {row[3]}, not the old key"
                    )
                secret = open_sealed(old, record.spec, bytes(row[4]))
                conn.execute(
                    "UPDATE credentials SET sealed = ?, key_id = ? WHERE name = ?",
                    (seal(new, record.spec, secret), new.key_id, record.spec.name),
                )
            conn.executemany(
                "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                [("key_id", new.key_id), ("key_check", _key_check(new))],
            )
            conn.execute("COMMIT")
            # Old ciphertexts may linger in the write-ahead log until a checkpoint; make it now.
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            return len(rows)
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        finally:
            conn.close()
    finally:
        os.close(lock_fd)
