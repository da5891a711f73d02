"""Entry point: `python -m brain` (also `managed-agents brain`)."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Sequence

from brain import app
from brain.config import BrainConfig
from managed_agents.mesh.logs import configure_logging
from managed_agents.mesh.server import announce, wait_for_signal
from managed_agents.mesh.telemetry import build_tracer_provider

log = logging.getLogger("brain")


async def _serve(config: BrainConfig) -> None:
    tracer_provider = build_tracer_provider("brain", os.environ)
    try:
        running = await app.start(config, tracer_provider)
    except (OSError, RuntimeError) as exc:
        log.error("cannot start: %s", exc)
        raise SystemExit(2) from None
    announce(running.address, config.port_file)
    await wait_for_signal()
    log.info("stopping: releasing the sessions this brain drives so others adopt them")
    await running.aclose(config.grace_seconds)
    if tracer_provider is not None:
        tracer_provider.shutdown()


def main(argv: Sequence[str] | None = None) -> None:
    """Runs a brain until SIGTERM or SIGINT."""
    config = BrainConfig.from_args(sys.argv[1:] if argv is None else argv, os.environ)
    configure_logging("brain", config.log_level)
    asyncio.run(_serve(config))


if __name__ == "__main__":
    main()
