"""OAuth 2.0 access tokens of MCP credentials: the refresh-token grant (RFC 6749 section 6), and a keeper that
hands out a current token, refreshing it when it is known to have expired or an upstream refused it."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx2

from managed_agents.mesh.errors import CredentialNotFound
from mcp_proxy.vault import CredentialRecord, Secret, Vault

log = logging.getLogger(__name__)

# Refresh this long before the recorded expiry, so a token does not die between check and use.
EXPIRY_SKEW_US = 30_000_000
MAX_RESPONSE_BYTES = 64 * 1024
# RFC 6749 error codes are short ASCII words; anything else from a server is not repeated to callers.
_ERROR_CODE = re.compile(r"[A-Za-z0-9_.-]{1,64}")


class OAuthError(Exception):
    """A refresh failed; the message is a sentence fit for a tool result (it never holds a secret)."""


@dataclass(frozen=True, slots=True)
class TokenGrant:
    """What a token endpoint granted. `refresh_token` is empty when the server did not rotate it."""

    access_token: str = field(repr=False)
    refresh_token: str = field(default="", repr=False)
    expires_in: float = 0.0


async def refresh_access_token(
    http: httpx2.AsyncClient,
    *,
    token_endpoint: str,
    client_id: str,
    client_secret: str,
    refresh_token: str,
    time_limit: float,
) -> TokenGrant:
    """Exchanges `refresh_token` at `token_endpoint` for a new access token.

    The client authenticates with `client_secret_post` (client id and secret in the form body), the method
    MCP authorization servers register clients with by default.

    Raises:
        OAuthError: the endpoint is unreachable, slow, refuses, or answers something that is not a token.
    """
    form = {"grant_type": "refresh_token", "refresh_token": refresh_token}
    if client_id:
        form["client_id"] = client_id
    if client_secret:
        form["client_secret"] = client_secret
    try:
        async with asyncio.timeout(time_limit):
            response = await http.post(token_endpoint, data=form, headers={"Accept": "application/json"})
    except TimeoutError:
        raise OAuthError(f"the token endpoint did not answer within {time_limit:g} s") from None
    except httpx2.HTTPError as exc:
        raise OAuthError(f"the token endpoint could not be reached ({type(exc).__name__})") from None
    body = response.content[:MAX_RESPONSE_BYTES]
    try:
        data = response.json() if len(response.content) <= MAX_RESPONSE_BYTES else None
    except ValueError:
        data = None
    if response.status_code != 200:
        code = data.get("error") if isinstance(data, dict) else None
        reason = f" ({code})" if isinstance(code, str) and _ERROR_CODE.fullmatch(code) else ""
        raise OAuthError(f"the token endpoint refused the refresh with HTTP {response.status_code}{reason}")
    if not isinstance(data, dict) or not isinstance(data.get("access_token"), str) or not data["access_token"]:
        raise OAuthError(
            f"the token endpoint answered HTTP 200 without an access_token ({len(body)} bytes of "
            f"{response.headers.get('content-type', 'no content type')})"
        )
    token_type = data.get("token_type", "Bearer")
    if not isinstance(token_type, str) or token_type.lower() != "bearer":
        raise OAuthError("the token endpoint granted a token that is not a bearer token")
    expires_in = data.get("expires_in", 0)
    new_refresh = data.get("refresh_token", "")
    return TokenGrant(
        access_token=data["access_token"],
        refresh_token=new_refresh if isinstance(new_refresh, str) else "",
        expires_in=float(expires_in) if isinstance(expires_in, int | float) and expires_in > 0 else 0.0,
    )


class AccessTokens:
    """Current access tokens of the vault's MCP credentials.

    Refreshes are single-flight per credential: when several calls find the same token refused, one refresh
    runs and the others use its result, since many servers rotate the refresh token and would refuse the
    second use of the old one.
    """

    def __init__(
        self,
        vault: Vault,
        http: httpx2.AsyncClient,
        *,
        refresh_timeout: float = 30.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._vault = vault
        self._http = http
        self._refresh_timeout = refresh_timeout
        self._clock = clock
        self._locks: dict[str, asyncio.Lock] = {}

    def _expired(self, record: CredentialRecord) -> bool:
        expiry = record.expire_time_us
        return bool(expiry) and self._clock() * 1_000_000 >= expiry - EXPIRY_SKEW_US

    async def current(self, name: str) -> str:
        """The access token to send now; refreshed first if the vault knows it has expired.

        Raises:
            OAuthError: the token has expired and could not be refreshed.
        """
        record, secret = await self._vault.secret(name)
        if secret.token and not self._expired(record):
            return secret.token
        if not secret.refresh_token:
            if secret.token:
                # Expired by our clock, but the server decides; it may still take it.
                return secret.token
            raise OAuthError("the credential has neither an access token nor a refresh token")
        return await self.refreshed(name, refused=secret.token)

    async def refreshed(self, name: str, *, refused: str) -> str:
        """A token other than `refused`: one that another refresh just stored, or a freshly refreshed one.

        Raises:
            OAuthError: no refresh token, no token endpoint, or the endpoint would not refresh.
        """
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            record, secret = await self._vault.secret(name)
            if secret.token and secret.token != refused and not self._expired(record):
                return secret.token
            return await self._refresh(record, secret)

    async def _refresh(self, record: CredentialRecord, secret: Secret) -> str:
        spec = record.spec
        if not secret.refresh_token:
            raise OAuthError("the credential has no refresh token to renew its access token with")
        if not spec.token_endpoint:
            raise OAuthError("the credential has no token_endpoint to refresh its access token at")
        grant = await refresh_access_token(
            self._http,
            token_endpoint=spec.token_endpoint,
            client_id=spec.client_id,
            client_secret=secret.client_secret,
            refresh_token=secret.refresh_token,
            time_limit=self._refresh_timeout,
        )
        try:
            await self._vault.update_tokens(
                record,
                token=grant.access_token,
                refresh_token=grant.refresh_token or secret.refresh_token,
                token_ttl_us=int(grant.expires_in * 1_000_000),
            )
        except CredentialNotFound:
            raise OAuthError("the credential was deleted or replaced while its token was refreshed") from None
        log.info("refreshed the access token of credential %r", spec.name)
        return grant.access_token
