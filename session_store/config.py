"""Configuration of a session store process: flags, each with an environment variable fallback."""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, cast

from managed_agents.mesh.config import add_flag, add_metrics_flag, mesh_secret_or_exit, mesh_tls_or_exit, parse_listen
from managed_agents.mesh.tls import MeshTls

Synchronous = Literal["normal", "full"]


@dataclass(frozen=True, slots=True)
class StoreConfig:
    """Everything a session store process needs to start."""

    listen: str = "127.0.0.1:7301"
    data_dir: Path = Path(".managed-agents/store")
    store_url: str = ""
    synchronous: Synchronous = "normal"
    port_file: Path | None = None
    grace_seconds: float = 10.0
    log_level: str = "info"
    metrics_listen: str = ""
    # The deployment's shared secret (managed_agents.mesh.auth); never shown in a repr.
    mesh_secret: str = field(default="", repr=False)
    mesh_tls: MeshTls | None = field(default=None, repr=False)

    @classmethod
    def parser(cls, environ: Mapping[str, str], prog: str = "python -m session_store") -> argparse.ArgumentParser:
        """The argument parser, with defaults taken from `environ`."""
        defaults = cls()
        parser = argparse.ArgumentParser(
            prog=prog,
            description=(
                "Session store of the managed-agents mesh: a durable, append-only event log per agent "
                "session, "
                "served over gRPC (managed_agents.v1.SessionService) with health checking and reflection."
            ),
        )
        add_flag(
            parser,
            "--listen",
            env="SESSION_STORE_LISTEN",
            environ=environ,
            default=defaults.listen,
            type=parse_listen,
            help="host:port to serve on; port 0 picks a free port",
        )
        add_flag(
            parser,
            "--data-dir",
            env="SESSION_STORE_DATA_DIR",
            environ=environ,
            default=defaults.data_dir,
            type=Path,
            help="directory of the SQLite database (created if missing, locked while in use)",
        )
        add_flag(
            parser,
            "--store-url",
            env="SESSION_STORE_URL",
            environ=environ,
            default="",
            help="postgresql://user:password@host:port/db to keep the log in PostgreSQL, shared by any number of "
            "store servers, instead of SQLite in --data-dir (apply the schema first: `python -m session_store "
            "migrate --store-url URL`)",
        )
        add_flag(
            parser,
            "--sync",
            env="SESSION_STORE_SYNC",
            environ=environ,
            default=defaults.synchronous,
            choices=["normal", "full"],
            help="durability: 'normal' survives any process crash (kill -9); 'full' also survives power "
            "loss, at one fsync per group commit",
        )
        add_flag(
            parser,
            "--port-file",
            env="SESSION_STORE_PORT_FILE",
            environ=environ,
            default=None,
            type=Path,
            help="write the bound host:port to this file once serving",
        )
        add_flag(
            parser,
            "--grace",
            env="SESSION_STORE_GRACE",
            environ=environ,
            default=defaults.grace_seconds,
            type=float,
            help="seconds in-flight calls get to finish on SIGTERM",
        )
        add_flag(
            parser,
            "--log-level",
            env="SESSION_STORE_LOG_LEVEL",
            environ=environ,
            default=defaults.log_level,
            choices=["debug", "info", "warning", "error"],
            help="log level",
        )
        add_metrics_flag(parser, environ, env="SESSION_STORE_METRICS_LISTEN")
        return parser

    @classmethod
    def from_args(cls, argv: Sequence[str], environ: Mapping[str, str]) -> StoreConfig:
        """Parses `argv`; flags beat environment variables, which beat defaults."""
        parser = cls.parser(environ)
        args = parser.parse_args(argv)
        return cls(
            listen=args.listen,
            data_dir=args.data_dir,
            store_url=args.store_url,
            synchronous=cast(Synchronous, args.sync),
            port_file=args.port_file,
            grace_seconds=args.grace,
            log_level=args.log_level,
            metrics_listen=args.metrics_listen,
            mesh_secret=mesh_secret_or_exit(parser, environ),
            mesh_tls=mesh_tls_or_exit(parser, environ),
        )
