"""Entry point: `python -m session_store` (also `managed-agents store`)."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Sequence

import asyncpg

from managed_agents.mesh.logs import configure_logging
from managed_agents.mesh.server import announce, wait_for_signal
from managed_agents.mesh.telemetry import build_tracer_provider
from session_store import app
from session_store.config import StoreConfig

log = logging.getLogger("session_store")


async def _serve(config: StoreConfig) -> None:
    tracer_provider = build_tracer_provider("session-store", os.environ)
    try:
        running = await app.start(config, tracer_provider)
    except (OSError, RuntimeError, asyncpg.PostgresError) as exc:
        log.error("cannot start: %s", exc)
        raise SystemExit(2) from None
    announce(running.address, config.port_file)
    await wait_for_signal()
    log.info("stopping: finishing in-flight calls for up to %.1f s", config.grace_seconds)
    await running.aclose(config.grace_seconds)
    if tracer_provider is not None:
        tracer_provider.shutdown()


def _migrate(argv: Sequence[str]) -> None:
    import argparse

    from session_store.postgres import migrate

    parser = argparse.ArgumentParser(
        prog="python -m session_store migrate",
        description="Applies the pending schema migrations of a PostgreSQL session store (safe to run repeatedly "
        "and concurrently).",
    )
    parser.add_argument(
        "--store-url",
        default=os.environ.get("SESSION_STORE_URL", ""),
        help="postgresql:// URL [env: SESSION_STORE_URL]",
    )
    args = parser.parse_args(argv)
    if not args.store_url:
        parser.error("--store-url (or SESSION_STORE_URL) is required")
    try:
        applied = asyncio.run(migrate(args.store_url))
    except (OSError, RuntimeError) as error:
        raise SystemExit(f"error: cannot migrate: {error}") from None
    sys.stdout.write(f"applied migrations {applied}\n" if applied else "the schema is up to date\n")


def main(argv: Sequence[str] | None = None) -> None:
    """Runs a session store until SIGTERM or SIGINT (or, with `migrate`, applies the PostgreSQL schema)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["migrate"]:
        _migrate(argv[1:])
        return
    config = StoreConfig.from_args(argv, os.environ)
    configure_logging("session-store", config.log_level)
    asyncio.run(_serve(config))


if __name__ == "__main__":
    main()
