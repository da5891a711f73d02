"""What the git and egress relays share: one pool of upstream HTTP connections, trusting the system's CAs and
any the deployment adds, and the rule that decides whether a URL's host is one a credential allows."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp


@dataclass(frozen=True, slots=True)
class RelayedResponse:
    """The upstream's answer: status, headers and the body as it streams."""

    status: int
    headers: list[tuple[str, str]]
    body: AsyncIterator[bytes]


def host_of(url: str) -> str:
    """`host:port` of a URL, the port filled in from the scheme."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return f"{(parts.hostname or '').lower()}:{port}"


def host_allowed(url: str, allowed: Sequence[str]) -> bool:
    """True if `allowed` names the URL's host, bare (any port) or with its port."""
    host_port = host_of(url)
    host = host_port.rsplit(":", 1)[0]
    return any(entry.lower() in (host, host_port) for entry in allowed)


class UpstreamHttp:
    """A lazily opened `aiohttp` session for relayed requests: no automatic decompression (bodies pass as they
    are; the egress relay decodes what it must read itself, within bounds), a connect timeout, and no overall
    one (a clone or a download may take long)."""

    def __init__(self, *, ca_file: Path | None = None) -> None:
        self._ca_file = ca_file
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        """The shared session, opened on first use (it must be made on the serving event loop)."""
        if self._session is None:
            context = ssl.create_default_context()
            if self._ca_file is not None:
                context.load_verify_locations(cafile=str(self._ca_file))
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=context),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=15, sock_read=300),
                auto_decompress=False,
            )
        return self._session

    async def aclose(self) -> None:
        """Closes the connection pool."""
        if self._session is not None:
            await self._session.close()
