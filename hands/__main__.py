"""Entry point: `python -m hands` (also `managed-agents hands`)."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Sequence

from hands import app
from hands.config import HandsConfig
from managed_agents.mesh.logs import configure_logging
from managed_agents.mesh.server import announce, wait_for_signal
from managed_agents.mesh.telemetry import build_tracer_provider

log = logging.getLogger("hands")


async def _serve(config: HandsConfig) -> None:
    tracer_provider = build_tracer_provider("hands", os.environ)
    try:
        running = await app.start(config, tracer_provider)
    except (OSError, RuntimeError) as exc:
        log.error("cannot start: %s", exc)
        raise SystemExit(2) from None
    announce(running.address, config.port_file)
    await wait_for_signal()
    log.info("stopping: sandboxes stay on disk for the next hands server on %s", config.work_root)
    await running.aclose(config.grace_seconds)
    if tracer_provider is not None:
        tracer_provider.shutdown()


def main(argv: Sequence[str] | None = None) -> None:
    """Runs a hands server until SIGTERM or SIGINT."""
    config = HandsConfig.from_args(sys.argv[1:] if argv is None else argv, os.environ)
    configure_logging("hands", config.log_level)
    asyncio.run(_serve(config))


if __name__ == "__main__":
    main()
