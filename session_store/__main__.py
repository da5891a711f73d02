"""Entry point: `python -m session_store` (also `managed-agents store`)."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Sequence

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
    except (OSError, RuntimeError) as exc:
        log.error("cannot start: %s", exc)
        raise SystemExit(2) from None
    announce(running.address, config.port_file)
    await wait_for_signal()
    log.info("stopping: finishing in-flight calls for up to %.1f s", config.grace_seconds)
    await running.aclose(config.grace_seconds)
    if tracer_provider is not None:
        tracer_provider.shutdown()


def main(argv: Sequence[str] | None = None) -> None:
    """Runs a session store until SIGTERM or SIGINT."""
    config = StoreConfig.from_args(sys.argv[1:] if argv is None else argv, os.environ)
    configure_logging("session-store", config.log_level)
    asyncio.run(_serve(config))


if __name__ == "__main__":
    main()
