"""Command-line flags that fall back to environment variables, then to defaults (flag > env > default)."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from typing import Any

from managed_agents.mesh.auth import MeshSecretError, mesh_secret
from managed_agents.mesh.tls import MeshTls, MeshTlsError, mesh_tls


def add_flag(
    parser: argparse.ArgumentParser,
    flag: str,
    *,
    env: str,
    environ: Mapping[str, str],
    default: Any,
    help: str,
    type: Callable[[str], Any] = str,
    choices: list[str] | None = None,
) -> None:
    """Adds `--flag` whose default comes from `environ[env]` if set; the help text names the variable."""
    raw = environ.get(env)
    value = type(raw) if raw not in (None, "") else default
    parser.add_argument(
        flag,
        default=value,
        type=type,
        choices=choices,
        help=f"{help} [env: {env}; default: {default}]",
    )


def parse_listen(value: str) -> str:
    """Checks a `host:port` listen address (port 0 picks a free port)."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"{value!r} is not host:port (e.g. 127.0.0.1:7301, or port 0 for any)")
    return value


def mesh_secret_or_exit(parser: argparse.ArgumentParser, environ: Mapping[str, str]) -> str:
    """The deployment's mesh secret (`managed_agents.mesh.auth`); a bad one ends the process with usage exit 2."""
    try:
        return mesh_secret(environ)
    except MeshSecretError as error:
        parser.error(str(error))


def mesh_tls_or_exit(parser: argparse.ArgumentParser, environ: Mapping[str, str]) -> MeshTls | None:
    """The mesh's TLS material (`managed_agents.mesh.tls`), or None; unusable files end the process with usage
    exit 2."""
    try:
        return mesh_tls(environ)
    except MeshTlsError as error:
        parser.error(str(error))


def add_metrics_flag(parser: argparse.ArgumentParser, environ: Mapping[str, str], *, env: str) -> None:
    """`--metrics-listen`, the same for every service (see `managed_agents.mesh.metrics`)."""
    add_flag(
        parser,
        "--metrics-listen",
        env=env,
        environ=environ,
        default="",
        help="host:port serving Prometheus text at /metrics (port 0 picks one); empty serves none. With "
        "OTEL_EXPORTER_OTLP_ENDPOINT set, metrics are also exported over OTLP",
    )
