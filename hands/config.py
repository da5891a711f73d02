"""Configuration of a hands process: flags, each with an environment variable fallback."""

from __future__ import annotations

import argparse
import re
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from hands import disk
from hands.identities import DEFAULT_RANGE, parse_range
from managed_agents.mesh.config import add_flag, add_metrics_flag, mesh_secret_or_exit, mesh_tls_or_exit, parse_listen
from managed_agents.mesh.tls import MeshTls

_LABEL = re.compile(r"[A-Za-z0-9._-]{1,63}")


def label_problem(key: str, value: str) -> str:
    """Why `key=value` is not a valid placement label ('' if it is)."""
    if not _LABEL.fullmatch(key):
        return f"label key {key[:80]!r} is not 1 to 63 characters of [A-Za-z0-9._-]"
    if not _LABEL.fullmatch(value):
        return f"label value {value[:80]!r} of {key!r} is not 1 to 63 characters of [A-Za-z0-9._-]"
    return ""


def _uid_range(text: str) -> tuple[int, int]:
    try:
        return parse_range(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _disk_size(text: str) -> int:
    """`4GiB`, `512MiB`, or a number of bytes."""
    units = {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}
    number, factor = text.strip(), 1
    for suffix, size in units.items():
        if number.endswith(suffix):
            number, factor = number[: -len(suffix)].strip(), size
    if not number.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 4GiB, 512MiB or a number of bytes")
    value = int(number) * factor
    if not disk.MIN_BYTES <= value <= disk.MAX_BYTES:
        raise argparse.ArgumentTypeError(f"{text!r} must be between 64MiB and 1TiB")
    return value


def parse_labels(text: str) -> tuple[tuple[str, str], ...]:
    """`key=value,key=value` as sorted pairs; raises `ArgumentTypeError` with a sentence."""
    pairs: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"{item!r} is not key=value")
        if problem := label_problem(key, value):
            raise argparse.ArgumentTypeError(problem)
        pairs[key] = value
    return tuple(sorted(pairs.items()))


@dataclass(frozen=True, slots=True)
class HandsConfig:
    """Everything a hands process needs to start."""

    listen: str = "127.0.0.1:7302"
    work_root: Path = Path(".managed-agents/sandboxes")
    backend: str = "bwrap"
    instance: str = ""
    docker_url: str = ""
    default_image: str = "localhost/managed-agents-sandbox:1"
    labels: tuple[tuple[str, str], ...] = ()
    proxy: str = ""
    # (first uid, count): host identities given to sandboxes, one each.
    sandbox_uids: tuple[int, int] = DEFAULT_RANGE
    default_disk_bytes: int = disk.DEFAULT_BYTES
    # Runs bwrap sandboxes without a user namespace on hosts that cannot give one (an explicit choice).
    without_user_namespace: bool = False
    port_file: Path | None = None
    grace_seconds: float = 10.0
    log_level: str = "info"
    metrics_listen: str = ""
    # The deployment's shared secret (managed_agents.mesh.auth); never shown in a repr.
    mesh_secret: str = field(default="", repr=False)
    mesh_tls: MeshTls | None = field(default=None, repr=False)

    @property
    def instance_name(self) -> str:
        """This server's instance id, recorded on its sandboxes."""
        return self.instance or f"hands-{socket.gethostname()}"

    @classmethod
    def parser(cls, environ: Mapping[str, str], prog: str = "python -m hands") -> argparse.ArgumentParser:
        """The argument parser, with defaults taken from `environ`."""
        d = cls()
        parser = argparse.ArgumentParser(
            prog=prog,
            description=(
                "Hands of the managed-agents mesh: disposable sandboxes in which the model's tool calls run "
                "(bash and the text editor), served as managed_agents.v1.HandsService."
            ),
        )

        def flag(name: str, env: str, default: object, help: str, **kw: object) -> None:
            add_flag(parser, name, env=env, environ=environ, default=default, help=help, **kw)  # type: ignore[arg-type]

        flag(
            "--listen",
            "HANDS_LISTEN",
            d.listen,
            "host:port to serve on; port 0 picks a free port",
            type=parse_listen,
        )
        flag(
            "--work-root",
            "HANDS_WORK_ROOT",
            d.work_root,
            "directory holding each sandbox's workspace and records (kept across restarts)",
            type=Path,
        )
        flag(
            "--backend",
            "HANDS_BACKEND",
            d.backend,
            "bwrap: Linux namespaces via bubblewrap (fast, no daemon); docker: a container per sandbox through a "
            "Docker Engine API (Docker or Podman)",
            choices=["bwrap", "docker"],
        )
        flag(
            "--instance",
            "HANDS_INSTANCE",
            d.instance,
            "id of this server, recorded on its sandboxes (default: hands-<hostname>)",
        )
        flag(
            "--docker-url",
            "HANDS_DOCKER_URL",
            d.docker_url,
            "Docker Engine API socket for --backend docker (default: DOCKER_HOST or the standard socket)",
        )
        flag(
            "--default-image",
            "HANDS_DEFAULT_IMAGE",
            d.default_image,
            "container image for --backend docker when a sandbox asks for none",
        )
        flag(
            "--labels",
            "HANDS_LABELS",
            "",
            "placement labels this server carries, as key=value,key=value; a sandbox that asks for labels "
            "(resources.labels) is placed only on a server carrying all of them",
            type=parse_labels,
        )
        flag(
            "--proxy",
            "HANDS_PROXY",
            d.proxy,
            "mcp_proxy address (host:port) whose relays serve sandboxes' repositories (clone, fetch, push) and "
            "secrets (outbound HTTP with API keys put in), adding the vault's credentials outside the sandbox; "
            "empty refuses both",
        )
        first, count = d.sandbox_uids
        flag(
            "--sandbox-uids",
            "HANDS_SANDBOX_UIDS",
            f"{first}-{first + count - 1}",
            "FIRST-LAST: host uids (and gids) given to sandboxes, one of its own each; no account or other "
            "program should use them, and hands servers sharing a host may share the range",
            type=_uid_range,
        )
        flag(
            "--default-disk",
            "HANDS_DEFAULT_DISK",
            "4GiB",
            "disk quota of a sandbox that asks for none (its /workspace and /tmp share it), e.g. 4GiB or 512MiB",
            type=_disk_size,
        )
        parser.add_argument(
            "--without-user-namespace",
            action="store_true",
            default=environ.get("HANDS_WITHOUT_USER_NAMESPACE", "") in ("1", "true"),
            help="on a host that cannot give sandboxes a user namespace, run them anyway as unprivileged host uids "
            "without one (they lose the namespace: their uid is the same inside and out); without this flag "
            "hands refuses to start there [env: HANDS_WITHOUT_USER_NAMESPACE=1]",
        )
        flag("--port-file", "HANDS_PORT_FILE", None, "write the bound host:port here once serving", type=Path)
        flag("--grace", "HANDS_GRACE", d.grace_seconds, "seconds in-flight calls get on SIGTERM", type=float)
        flag(
            "--log-level",
            "HANDS_LOG_LEVEL",
            d.log_level,
            "log level",
            choices=["debug", "info", "warning", "error"],
        )
        add_metrics_flag(parser, environ, env="HANDS_METRICS_LISTEN")
        return parser

    @classmethod
    def from_args(cls, argv: Sequence[str], environ: Mapping[str, str]) -> HandsConfig:
        """Parses `argv`; flags beat environment variables, which beat defaults."""
        parser = cls.parser(environ)
        args = parser.parse_args(argv)
        return cls(
            listen=args.listen,
            # bwrap runs each shell from inside its workspace, where a relative path would mean something else.
            work_root=args.work_root.absolute(),
            backend=args.backend,
            instance=args.instance,
            docker_url=args.docker_url,
            default_image=args.default_image,
            labels=args.labels,
            proxy=args.proxy,
            sandbox_uids=args.sandbox_uids,
            default_disk_bytes=args.default_disk,
            without_user_namespace=args.without_user_namespace,
            port_file=args.port_file,
            grace_seconds=args.grace,
            log_level=args.log_level,
            metrics_listen=args.metrics_listen,
            mesh_secret=mesh_secret_or_exit(parser, environ),
            mesh_tls=mesh_tls_or_exit(parser, environ),
        )
