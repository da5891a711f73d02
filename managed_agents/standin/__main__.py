"""`python -m managed_agents.standin --script demo|FILE.json`: serve a scripted stand-in for Claude."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from managed_agents.mesh.config import add_flag, parse_listen
from managed_agents.mesh.logs import configure_logging
from managed_agents.mesh.server import announce, wait_for_signal
from managed_agents.standin import script as scripts
from managed_agents.standin.server import StandinServer


async def _serve(script: scripts.Script, listen: str, port_file: Path | None) -> None:
    host, _, port = listen.rpartition(":")
    server = await StandinServer.start(script, host=host, port=int(port))
    announce(f"{host}:{server.port}", port_file)
    await wait_for_signal()
    await server.aclose()


def main(argv: Sequence[str] | None = None) -> None:
    """Serves until SIGTERM or SIGINT."""
    parser = argparse.ArgumentParser(
        prog="python -m managed_agents.standin",
        description="A local stand-in for Claude speaking the Messages API (JSON and SSE), playing a script. "
        "Point the brain at it with ANTHROPIC_BASE_URL.",
    )
    add_flag(
        parser,
        "--listen",
        env="STANDIN_LISTEN",
        environ=os.environ,
        default="127.0.0.1:0",
        type=parse_listen,
        help="host:port to serve on",
    )
    add_flag(
        parser,
        "--script",
        env="STANDIN_SCRIPT",
        environ=os.environ,
        default="demo",
        help=f"a built-in script ({', '.join(scripts.BUILT_IN)}) or a JSON script file",
    )
    add_flag(
        parser,
        "--port-file",
        env="STANDIN_PORT_FILE",
        environ=os.environ,
        default=None,
        type=Path,
        help="write host:port here once serving",
    )
    add_flag(
        parser,
        "--log-level",
        env="STANDIN_LOG_LEVEL",
        environ=os.environ,
        default="warning",
        help="log level",
    )
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    configure_logging("standin-model", args.log_level)
    if args.script in scripts.BUILT_IN:
        script = scripts.BUILT_IN[args.script]()
    else:
        path = Path(args.script)
        if not path.is_file():
            parser.error(f"--script {args.script!r} is neither a built-in script nor a file")
        script = scripts.load(path)
    asyncio.run(_serve(script, args.listen, args.port_file))


if __name__ == "__main__":
    main()
