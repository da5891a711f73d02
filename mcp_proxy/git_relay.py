"""The git relay: forwards one git smart-HTTP request to a repository, adding the vault's git token on the way.

Hands servers call it (`McpProxyService.RelayGit`) for their sandboxes, whose git remotes point at a local
port with no secret behind it. A request is relayed only if its session token grants the git credential it
names, the credential is a git token, and the URL's host is one the credential allows; only git's own
smart-HTTP paths are relayed. The token is added as HTTP Basic (`x-access-token:<token>`, as git hosts
accept) and goes nowhere else.
"""

from __future__ import annotations

import base64
import logging
import re
from collections.abc import AsyncIterator, Sequence
from urllib.parse import urlsplit

import aiohttp

from managed_agents.mesh.errors import InvalidArgument, NotGranted, Unavailable
from mcp_proxy.http_upstream import RelayedResponse, UpstreamHttp, host_allowed
from mcp_proxy.tokens import TokenAuthority
from mcp_proxy.vault import CredentialKind, Vault

log = logging.getLogger(__name__)

MAX_URL_CHARS = 4096
MAX_HEADERS = 64
CHUNK_BYTES = 256 * 1024
# The paths of git's smart HTTP protocol, and nothing else (no dumb-HTTP file reads, no web UI).
_GIT_PATH = re.compile(r"/(info/refs|git-upload-pack|git-receive-pack)$")
_SERVICES = {"git-upload-pack", "git-receive-pack"}
# Headers git sends that are worth passing on; everything else (hop-by-hop, Authorization) is dropped.
_REQUEST_HEADERS = {"content-type", "accept", "accept-encoding", "content-encoding", "git-protocol", "user-agent"}
_RESPONSE_HEADERS = {"content-type", "content-encoding", "cache-control", "expires", "pragma"}


def check_url(url: str, method: str, *, allow_http: bool) -> None:
    """Refuses anything but a git smart-HTTP request to an http(s) URL, with a sentence."""
    if not url or len(url) > MAX_URL_CHARS:
        raise InvalidArgument.field("head.url", f"must be 1 to {MAX_URL_CHARS} characters")
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname or parts.username or parts.password:
        raise InvalidArgument.field("head.url", "must be an https:// URL with a host and no user or password")
    if parts.scheme == "http" and not allow_http:
        raise InvalidArgument.field("head.url", "plain http:// is refused (the proxy runs without --git-allow-http)")
    if not _GIT_PATH.search(parts.path):
        raise InvalidArgument.field("head.url", "only git smart-HTTP requests (info/refs, git-*-pack) are relayed")
    if parts.path.endswith("/info/refs"):
        service = dict(p.split("=", 1) for p in parts.query.split("&") if "=" in p).get("service", "")
        if method != "GET" or service not in _SERVICES:
            raise InvalidArgument.field("head.url", "info/refs is relayed only as GET with a git service")
    elif method != "POST":
        raise InvalidArgument.field("head.method", "git-upload-pack and git-receive-pack are relayed only as POST")


class GitRelay:
    """Relays git requests for holders of session tokens."""

    def __init__(
        self, vault: Vault, tokens: TokenAuthority, upstream: UpstreamHttp, *, allow_http: bool = False
    ) -> None:
        self._vault = vault
        self._tokens = tokens
        self._upstream = upstream
        self._allow_http = allow_http

    async def relay(
        self,
        *,
        session_token: str,
        credential: str,
        url: str,
        method: str,
        headers: Sequence[tuple[str, str]],
        body: AsyncIterator[bytes],
    ) -> RelayedResponse:
        """Checks the request and forwards it; the caller must drain (or close) the response body."""
        grant = self._tokens.verify(session_token)
        if not grant.allows(credential):
            raise NotGranted(f"the session's token does not grant credential {credential!r}")
        check_url(url, method, allow_http=self._allow_http)
        if len(headers) > MAX_HEADERS:
            raise InvalidArgument.field("head.headers", f"at most {MAX_HEADERS} headers")
        record, secret = await self._vault.secret(credential)
        if record.spec.kind is not CredentialKind.GIT_TOKEN:
            raise NotGranted(f"credential {credential!r} is not a git token")
        if not host_allowed(url, record.spec.allowed_hosts):
            host = urlsplit(url).netloc
            raise NotGranted(f"credential {credential!r} may not be sent to {host} (not in its allowed hosts)")
        basic = base64.b64encode(f"x-access-token:{secret.token}".encode()).decode()
        outgoing = {k: v for k, v in headers if k.lower() in _REQUEST_HEADERS}
        outgoing["Authorization"] = f"Basic {basic}"
        try:
            response = await self._upstream.session().request(
                method, url, headers=outgoing, data=body if method == "POST" else None, allow_redirects=False
            )
        except (aiohttp.ClientError, TimeoutError) as error:
            raise Unavailable(f"the git server at {urlsplit(url).netloc} could not be reached: {error}") from error
        log.info(
            "relayed git %s %s for session %s: HTTP %d", method, urlsplit(url).path, grant.session_id, response.status
        )

        async def chunks() -> AsyncIterator[bytes]:
            try:
                async for chunk in response.content.iter_chunked(CHUNK_BYTES):
                    yield chunk
            finally:
                response.release()

        kept = [(k, v) for k, v in response.headers.items() if k.lower() in _RESPONSE_HEADERS]
        return RelayedResponse(response.status, kept, chunks())
