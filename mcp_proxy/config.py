"""Configuration of an mcp_proxy process: flags, each with an environment variable fallback."""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from managed_agents.mesh.config import add_flag, add_metrics_flag, mesh_secret_or_exit, mesh_tls_or_exit, parse_listen
from managed_agents.mesh.tls import MeshTls
from mcp_proxy.vault import VaultKey, VaultKeyError, read_key_file

KEY_ENV = "MCP_PROXY_VAULT_KEY"


def _positive(value: str) -> float:
    number = float(value)
    if not number > 0:
        raise argparse.ArgumentTypeError(f"{value!r} is not a positive number of seconds")
    return number


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    """Everything an mcp_proxy process needs to start (the vault key is loaded with `vault_key()`)."""

    listen: str = "127.0.0.1:7304"
    data_dir: Path = Path(".managed-agents/proxy")
    key_file: Path | None = None
    # The key itself when given through the environment; never shown in a repr.
    key_text: str = field(default="", repr=False)
    port_file: Path | None = None
    grace_seconds: float = 10.0
    log_level: str = "info"
    metrics_listen: str = ""
    connect_timeout: float = 10.0
    list_timeout: float = 10.0
    refresh_timeout: float = 30.0
    git_allow_http: bool = False
    egress_allow_http: bool = False
    upstream_ca_file: Path | None = None
    # The deployment's shared secret (managed_agents.mesh.auth); never shown in a repr.
    mesh_secret: str = field(default="", repr=False)
    mesh_tls: MeshTls | None = field(default=None, repr=False)

    def vault_key(self) -> VaultKey:
        """The vault key: from `key_file` if set, else from `MCP_PROXY_VAULT_KEY`.

        Raises:
            VaultKeyError: neither is given, or the one given is not a usable key.
        """
        if self.key_file is not None:
            return read_key_file(self.key_file)
        if self.key_text:
            return VaultKey.from_text(self.key_text, source=KEY_ENV)
        raise VaultKeyError(
            f"no vault key: give --key-file FILE (make one with `python -m mcp_proxy generate-key --key-file "
            f"FILE`) or set {KEY_ENV} to a base64 key"
        )

    @classmethod
    def parser(cls, environ: Mapping[str, str], prog: str = "python -m mcp_proxy") -> argparse.ArgumentParser:
        """The argument parser, with defaults taken from `environ`."""
        defaults = cls()
        parser = argparse.ArgumentParser(
            prog=prog,
            description=(
                "Credential vault and MCP proxy of the managed-agents mesh, served over gRPC "
                "(managed_agents.v1.VaultService and McpProxyService) with health checking and reflection. "
                "Other commands: `generate-key --key-file F`, `rotate-key --data-dir D --old-key-file A "
                "--new-key-file B`."
            ),
        )
        add_flag(
            parser,
            "--listen",
            env="MCP_PROXY_LISTEN",
            environ=environ,
            default=defaults.listen,
            type=parse_listen,
            help="host:port to serve on; port 0 picks a free port",
        )
        add_flag(
            parser,
            "--data-dir",
            env="MCP_PROXY_DATA_DIR",
            environ=environ,
            default=defaults.data_dir,
            type=Path,
            help="directory of the vault and token databases (created mode 0700, locked while in use)",
        )
        add_flag(
            parser,
            "--key-file",
            env="MCP_PROXY_KEY_FILE",
            environ=environ,
            default=None,
            type=Path,
            help=f"file holding the base64 vault key, mode 0600 (else the key is read from {KEY_ENV})",
        )
        add_flag(
            parser,
            "--port-file",
            env="MCP_PROXY_PORT_FILE",
            environ=environ,
            default=None,
            type=Path,
            help="write the bound host:port to this file once serving",
        )
        add_flag(
            parser,
            "--grace",
            env="MCP_PROXY_GRACE",
            environ=environ,
            default=defaults.grace_seconds,
            type=float,
            help="seconds in-flight calls get to finish on SIGTERM",
        )
        add_flag(
            parser,
            "--log-level",
            env="MCP_PROXY_LOG_LEVEL",
            environ=environ,
            default=defaults.log_level,
            choices=["debug", "info", "warning", "error"],
            help="log level",
        )
        add_flag(
            parser,
            "--connect-timeout",
            env="MCP_PROXY_CONNECT_TIMEOUT",
            environ=environ,
            default=defaults.connect_timeout,
            type=_positive,
            help="seconds an upstream MCP server gets to complete the MCP handshake",
        )
        add_flag(
            parser,
            "--list-timeout",
            env="MCP_PROXY_LIST_TIMEOUT",
            environ=environ,
            default=defaults.list_timeout,
            type=_positive,
            help="seconds an upstream MCP server gets to list its tools in ListTools (else it is left out)",
        )
        add_flag(
            parser,
            "--refresh-timeout",
            env="MCP_PROXY_REFRESH_TIMEOUT",
            environ=environ,
            default=defaults.refresh_timeout,
            type=_positive,
            help="seconds an OAuth token endpoint gets to answer a refresh",
        )
        parser.add_argument(
            "--git-allow-http",
            action="store_true",
            default=environ.get("MCP_PROXY_GIT_ALLOW_HTTP", "") in ("1", "true"),
            help="let the git relay send tokens over plain http:// (for git servers on a trusted local network "
            "and tests; never over the internet) [env: MCP_PROXY_GIT_ALLOW_HTTP=1]",
        )
        parser.add_argument(
            "--egress-allow-http",
            action="store_true",
            default=environ.get("MCP_PROXY_EGRESS_ALLOW_HTTP", "") in ("1", "true"),
            help="let the egress relay put sandboxes' API keys into plain http:// requests (trusted local "
            "networks and tests only) [env: MCP_PROXY_EGRESS_ALLOW_HTTP=1]",
        )
        add_flag(
            parser,
            "--upstream-ca-file",
            env="MCP_PROXY_UPSTREAM_CA_FILE",
            environ=environ,
            default=None,
            type=Path,
            help="PEM file of CA certificates trusted, beside the system's, for the git and egress relays' "
            "https:// upstreams (a private CA)",
        )
        add_metrics_flag(parser, environ, env="MCP_PROXY_METRICS_LISTEN")
        return parser

    @classmethod
    def from_args(cls, argv: Sequence[str], environ: Mapping[str, str]) -> ProxyConfig:
        """Parses `argv`; flags beat environment variables, which beat defaults."""
        parser = cls.parser(environ)
        args = parser.parse_args(argv)
        return cls(
            listen=args.listen,
            data_dir=args.data_dir,
            key_file=args.key_file,
            key_text=environ.get(KEY_ENV, ""),
            port_file=args.port_file,
            grace_seconds=args.grace,
            log_level=args.log_level,
            metrics_listen=args.metrics_listen,
            connect_timeout=args.connect_timeout,
            list_timeout=args.list_timeout,
            refresh_timeout=args.refresh_timeout,
            git_allow_http=args.git_allow_http,
            egress_allow_http=args.egress_allow_http,
            upstream_ca_file=args.upstream_ca_file,
            mesh_secret=mesh_secret_or_exit(parser, environ),
            mesh_tls=mesh_tls_or_exit(parser, environ),
        )
