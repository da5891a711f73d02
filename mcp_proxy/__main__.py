"""Entry point: `python -m mcp_proxy` (serve), `... generate-key` and `... rotate-key`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from managed_agents.mesh.errors import MeshError
from managed_agents.mesh.logs import configure_logging
from managed_agents.mesh.server import announce, wait_for_signal
from managed_agents.mesh.telemetry import build_tracer_provider
from mcp_proxy.config import ProxyConfig
from mcp_proxy.vault import VaultKey, VaultKeyError, VaultLocked, read_key_file, rotate_key, write_key_file

log = logging.getLogger("mcp_proxy")

# Libraries that log every HTTP request, or whole MCP messages at debug level: at most warnings from them,
# whatever the proxy's own level, so no request detail of an upstream call ends up in the log.
_QUIET_LOGGERS = ("httpx2", "httpcore", "mcp", "mcp_types")


async def _serve(config: ProxyConfig) -> None:
    try:
        key = config.vault_key()
    except VaultKeyError as exc:
        log.error("cannot start: %s", exc)
        raise SystemExit(2) from None
    # Imported here: the MCP SDK takes about a second to import, which the key commands need not wait for.
    from mcp_proxy import app

    tracer_provider = build_tracer_provider("mcp-proxy", os.environ)
    try:
        running = await app.start(config, key, tracer_provider)
    except (OSError, VaultKeyError, VaultLocked) as exc:
        log.error("cannot start: %s", exc)
        raise SystemExit(2) from None
    announce(running.address, config.port_file)
    await wait_for_signal()
    log.info("stopping: finishing in-flight calls for up to %.1f s", config.grace_seconds)
    await running.aclose(config.grace_seconds)
    if tracer_provider is not None:
        tracer_provider.shutdown()


def _generate_key(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m mcp_proxy generate-key",
        description="Writes a new random vault key (base64, 32 bytes) to a new file with mode 0600.",
    )
    parser.add_argument("--key-file", type=Path, required=True, help="file to create (never overwritten)")
    args = parser.parse_args(argv)
    key = VaultKey.generate()
    write_key_file(args.key_file, key)
    sys.stdout.write(f"wrote vault key {key.key_id} to {args.key_file}\n")


def _rotate_key(argv: Sequence[str], environ: dict[str, str]) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m mcp_proxy rotate-key",
        description=(
            "Re-encrypts every credential of a vault under a new key, in one transaction; afterwards the "
            "old key no longer opens the vault. Stop the proxy first (the data directory is locked while it "
            "runs). Session tokens signed under the old key stop verifying: sessions mint new ones."
        ),
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path(environ.get("MCP_PROXY_DATA_DIR", ProxyConfig().data_dir)),
        help="the vault's data directory [env: MCP_PROXY_DATA_DIR]",
    )
    parser.add_argument("--old-key-file", type=Path, required=True, help="the key the vault is sealed with now")
    parser.add_argument("--new-key-file", type=Path, required=True, help="the key to seal it with from now on")
    args = parser.parse_args(argv)
    old, new = read_key_file(args.old_key_file), read_key_file(args.new_key_file)
    count = rotate_key(args.data_dir, old, new)
    sys.stdout.write(f"re-encrypted {count} credentials of {args.data_dir}: key {old.key_id} -> {new.key_id}\n")


def main(argv: Sequence[str] | None = None) -> None:
    """Runs the proxy until SIGTERM or SIGINT, or one of the key commands."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("generate-key", "rotate-key"):
        configure_logging("mcp-proxy", "info", json_lines=False)
        try:
            if args[0] == "generate-key":
                _generate_key(args[1:])
            else:
                _rotate_key(args[1:], dict(os.environ))
        except (VaultKeyError, VaultLocked, MeshError, OSError) as exc:
            log.error("%s failed: %s", args[0], exc)
            raise SystemExit(2) from None
        return
    config = ProxyConfig.from_args(args, os.environ)
    configure_logging("mcp-proxy", config.log_level)
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLogger().level))
    asyncio.run(_serve(config))


if __name__ == "__main__":
    main()
