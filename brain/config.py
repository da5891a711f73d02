"""Configuration of a brain process: flags, each with an environment variable fallback."""

from __future__ import annotations

import argparse
import os
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from managed_agents.mesh.config import add_flag, add_metrics_flag, mesh_secret_or_exit, mesh_tls_or_exit, parse_listen
from managed_agents.mesh.failpoints import ENV as FAILPOINTS_ENV
from managed_agents.mesh.tls import MeshTls


def default_holder() -> str:
    """A lease holder name unique to this process: host, pid and a random suffix."""
    return f"brain/{socket.gethostname()}:{os.getpid()}:{os.urandom(2).hex()}"


@dataclass(frozen=True, slots=True)
class BrainConfig:
    """Everything a brain process needs to start."""

    listen: str = "127.0.0.1:7303"
    store: str = "127.0.0.1:7301"
    hands: str = "127.0.0.1:7302"
    proxy: str = ""
    model: str = "claude-sonnet-5-5"
    max_tokens: int = 8192
    max_steps: int = 50
    context_budget_tokens: int = 150_000
    lease_ttl: float = 10.0
    scan_interval: float = 2.0
    model_attempts: int = 6
    retry_base_delay: float = 0.5
    api_key: str = ""
    base_url: str = ""
    port_file: Path | None = None
    grace_seconds: float = 10.0
    log_level: str = "info"
    metrics_listen: str = ""
    failpoints: str = ""
    # The deployment's shared secret (managed_agents.mesh.auth); never shown in a repr.
    mesh_secret: str = field(default="", repr=False)
    mesh_tls: MeshTls | None = field(default=None, repr=False)

    @classmethod
    def parser(cls, environ: Mapping[str, str], prog: str = "python -m brain") -> argparse.ArgumentParser:
        """The argument parser, with defaults taken from `environ`."""
        d = cls()
        parser = argparse.ArgumentParser(
            prog=prog,
            description=(
                "Brain of the managed-agents mesh: the stateless harness that drives sessions (calls the "
                "model, writes every step to the session store, runs tool calls in hands). Serves "
                "managed_agents.v1.BrainService (Wake, Interrupt) and adopts sessions other brains lost."
            ),
            epilog="The model is Claude through the anthropic SDK: ANTHROPIC_API_KEY is required, and "
            "ANTHROPIC_BASE_URL points it at any endpoint that speaks the Messages API.",
        )

        def flag(name: str, env: str, default: object, help: str, **kw: object) -> None:
            add_flag(parser, name, env=env, environ=environ, default=default, help=help, **kw)  # type: ignore[arg-type]

        flag(
            "--listen",
            "BRAIN_LISTEN",
            d.listen,
            "host:port to serve on; port 0 picks a free port",
            type=parse_listen,
        )
        flag(
            "--store",
            "BRAIN_STORE",
            d.store,
            "session store address (host:port), or several store servers sharing one PostgreSQL log separated by "
            "commas (calls are spread round robin over those that are up)",
        )
        flag(
            "--hands",
            "BRAIN_HANDS",
            d.hands,
            "hands address (host:port), or several separated by commas (new sandboxes go to the least loaded); "
            "empty offers no sandbox tools",
        )
        flag(
            "--proxy",
            "BRAIN_PROXY",
            d.proxy,
            "mcp_proxy address (host:port) through which sessions reach the MCP servers granted to them; empty "
            "offers no MCP tools",
        )
        flag("--model", "BRAIN_MODEL", d.model, "model for sessions that do not name one")
        flag("--max-tokens", "BRAIN_MAX_TOKENS", d.max_tokens, "max_tokens of each model call", type=int)
        flag(
            "--max-steps",
            "BRAIN_MAX_STEPS",
            d.max_steps,
            "model calls per turn before it is stopped",
            type=int,
        )
        flag(
            "--context-budget",
            "BRAIN_CONTEXT_BUDGET",
            d.context_budget_tokens,
            "estimated input tokens a request may use before old context is compacted",
            type=int,
        )
        flag(
            "--lease-ttl",
            "BRAIN_LEASE_TTL",
            d.lease_ttl,
            "seconds a session's lease lasts unless renewed; a dead brain's sessions move after this",
            type=float,
        )
        flag(
            "--scan-interval",
            "BRAIN_SCAN_INTERVAL",
            d.scan_interval,
            "seconds between scans for sessions whose brain died (jittered)",
            type=float,
        )
        flag(
            "--model-attempts",
            "BRAIN_MODEL_ATTEMPTS",
            d.model_attempts,
            "attempts per model call on 429/5xx/overload before the turn ends",
            type=int,
        )
        flag(
            "--retry-delay",
            "BRAIN_RETRY_DELAY",
            d.retry_base_delay,
            "first retry delay in seconds (doubles each attempt, jittered, at most 20 s)",
            type=float,
        )
        flag("--port-file", "BRAIN_PORT_FILE", None, "write the bound host:port here once serving", type=Path)
        flag("--grace", "BRAIN_GRACE", d.grace_seconds, "seconds in-flight calls get on SIGTERM", type=float)
        flag(
            "--log-level",
            "BRAIN_LOG_LEVEL",
            d.log_level,
            "log level",
            choices=["debug", "info", "warning", "error"],
        )
        add_metrics_flag(parser, environ, env="BRAIN_METRICS_LISTEN")
        return parser

    @classmethod
    def from_args(cls, argv: Sequence[str], environ: Mapping[str, str]) -> BrainConfig:
        """Parses `argv`; flags beat environment variables, which beat defaults."""
        parser = cls.parser(environ)
        args = parser.parse_args(argv)
        return cls(
            listen=args.listen,
            store=args.store,
            hands=args.hands,
            proxy=args.proxy,
            model=args.model,
            max_tokens=args.max_tokens,
            max_steps=args.max_steps,
            context_budget_tokens=args.context_budget,
            lease_ttl=args.lease_ttl,
            scan_interval=args.scan_interval,
            model_attempts=args.model_attempts,
            retry_base_delay=args.retry_delay,
            api_key=environ.get("ANTHROPIC_API_KEY", ""),
            base_url=environ.get("ANTHROPIC_BASE_URL", ""),
            port_file=args.port_file,
            grace_seconds=args.grace,
            log_level=args.log_level,
            metrics_listen=args.metrics_listen,
            failpoints=environ.get(FAILPOINTS_ENV, ""),
            mesh_secret=mesh_secret_or_exit(parser, environ),
            mesh_tls=mesh_tls_or_exit(parser, environ),
        )
