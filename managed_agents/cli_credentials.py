"""`managed-agents credentials`: put, list and delete the vault's credentials (MCP servers, git, API keys).

Secrets are read from files or environment variables named on the command line, never from the command
line itself, where `ps` and shell history would show them. Nothing here can read a secret back: the vault
has no such call.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from google.protobuf import json_format

from managed_agents.mesh.tls import MeshTls
from managed_agents.terminal_text import visible
from managed_agents.v1 import mcp_proxy_pb2
from mcp_proxy.client import McpProxyClient

_KINDS = {
    "mcp": mcp_proxy_pb2.CREDENTIAL_KIND_MCP_OAUTH,
    "git": mcp_proxy_pb2.CREDENTIAL_KIND_GIT_TOKEN,
    "api-key": mcp_proxy_pb2.CREDENTIAL_KIND_API_KEY,
}
_KIND_NAMES = {v: k for k, v in _KINDS.items()}


class SecretSourceError(ValueError):
    """A secret could not be read from where the command line said it is."""


def _read_secret(source: str | None, what: str) -> str:
    """The secret at `source`: `env:NAME` or `file:PATH` (a bare path means a file); '' if not given."""
    if not source:
        return ""
    if source.startswith("env:"):
        name = source.removeprefix("env:")
        value = os.environ.get(name, "")
        if not value:
            raise SecretSourceError(f"{what}: the environment variable {name} is not set or empty")
        return value.strip()
    path = Path(source.removeprefix("file:"))
    try:
        value = path.read_text().strip()
    except OSError as error:
        raise SecretSourceError(f"{what}: cannot read {path}: {error.strerror}") from None
    if not value:
        raise SecretSourceError(f"{what}: {path} is empty")
    return value


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Adds `credentials put|list|delete` to the CLI."""
    credentials = commands.add_parser(
        "credentials",
        help="store, list and delete the vault's credentials (MCP servers, git tokens, API keys)",
        description="The vault (in mcp_proxy) holds credentials encrypted; sessions use them through the proxy "
        "and never see them. Secrets are given as env:NAME or file:PATH, never on the command line.",
    )
    credentials.add_argument("--proxy", help="mcp_proxy address")
    actions = credentials.add_subparsers(dest="action", metavar="ACTION", required=True)
    put = actions.add_parser("put", help="store or replace a credential")
    put.add_argument("name", help="1-64 of [a-z0-9_-]; sessions name it in agent.mcp_servers")
    put.add_argument("--kind", choices=sorted(_KINDS), required=True, help="what the secret is for")
    put.add_argument("--url", help="mcp: the MCP server's streamable HTTP URL")
    put.add_argument("--token-endpoint", help="mcp: OAuth token endpoint, to refresh the access token")
    put.add_argument("--client-id", help="mcp: OAuth client id")
    put.add_argument("--host", action="append", default=[], help="git, api-key: a host the secret may go to")
    put.add_argument("--token", metavar="SOURCE", required=True, help="the token or key: env:NAME or file:PATH")
    put.add_argument("--refresh-token", metavar="SOURCE", help="mcp: OAuth refresh token (env:NAME or file:PATH)")
    put.add_argument("--client-secret", metavar="SOURCE", help="mcp: OAuth client secret (env:NAME or file:PATH)")
    put.add_argument("--token-ttl", type=float, default=0, help="seconds until the token expires, if it does")
    listing = actions.add_parser("list", help="credentials' names and metadata (never their secrets)")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    delete = actions.add_parser("delete", help="delete a credential")
    delete.add_argument("name")


async def run(args: argparse.Namespace, address: str, mesh_secret: str, tls: MeshTls | None = None) -> int:
    """Runs one `credentials` action; returns the exit code (errors are raised as `MeshError`)."""
    async with McpProxyClient.connect(address, mesh_secret=mesh_secret, tls=tls) as proxy:
        if args.action == "put":
            try:
                secret = mcp_proxy_pb2.CredentialSecret(
                    token=_read_secret(args.token, "--token"),
                    refresh_token=_read_secret(args.refresh_token, "--refresh-token"),
                    client_secret=_read_secret(args.client_secret, "--client-secret"),
                )
            except SecretSourceError as error:
                print(f"error: {error}")
                return 2
            if args.token_ttl:
                secret.token_ttl.FromNanoseconds(int(args.token_ttl * 1e9))
            credential = mcp_proxy_pb2.Credential(
                name=args.name,
                kind=_KINDS[args.kind],
                mcp_server_url=args.url or "",
                token_endpoint=args.token_endpoint or "",
                client_id=args.client_id or "",
                allowed_hosts=args.host,
            )
            stored = await proxy.put_credential(credential, secret)
            print(f"stored credential {visible(stored.name, oneline=True)} ({args.kind})")
        elif args.action == "list":
            listed = await proxy.list_credentials()
            for credential in listed:
                if args.json:
                    fields = json_format.MessageToDict(credential, preserving_proto_field_name=True)
                    print(json.dumps(fields))  # ensure_ascii: every control character escaped
                else:
                    where = visible(credential.mcp_server_url or ", ".join(credential.allowed_hosts), oneline=True)
                    name = visible(credential.name, oneline=True)
                    print(f"{name:<24} {_KIND_NAMES.get(credential.kind, '?'):<8} {where}")
            if not listed and not args.json:
                print("no credentials")
        else:
            existed = await proxy.delete_credential(args.name)
            print(f"deleted credential {args.name}" if existed else f"there was no credential {args.name}")
    return 0
