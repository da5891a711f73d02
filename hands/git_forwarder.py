"""The one door out of a sandbox: a TCP port on the sandbox's own loopback that leads to its git relay.

Hands starts this program inside the sandbox's network namespace only (`nsenter --net`), so it listens where
the sandbox's git can connect, while its files, memory, environment and process stay outside the sandbox's
other namespaces: sandboxed code can neither see nor signal it. Each connection is piped to the Unix socket
of the sandbox's relay in the hands server, which forwards to the granted repositories and nowhere else.

    python -m hands.git_forwarder --port 7480 --socket /path/to/git.sock
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import signal
import sys

_PR_SET_PDEATHSIG = 1


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while chunk := await reader.read(65536):
            writer.write(chunk)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(OSError):
            writer.write_eof()


async def _serve(port: int, socket_path: str) -> None:
    async def connection(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            relay_reader, relay_writer = await asyncio.open_unix_connection(socket_path)
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(_pipe(client_reader, relay_writer), _pipe(relay_reader, client_writer))
        for writer in (client_writer, relay_writer):
            writer.close()

    server = await asyncio.start_server(connection, "127.0.0.1", port)
    sys.stdout.write("ready\n")  # the hands server waits for this line before cloning
    sys.stdout.flush()
    async with server:
        await server.serve_forever()


def main() -> None:
    """Entry point."""
    parser = argparse.ArgumentParser(prog="python -m hands.git_forwarder", description=__doc__)
    parser.add_argument("--port", type=int, required=True, help="port on the sandbox's loopback")
    parser.add_argument("--socket", required=True, help="Unix socket of the sandbox's relay")
    args = parser.parse_args()
    # Dies with the hands server that started it (nsenter execs into this process, so that is our parent).
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args.port, args.socket))


if __name__ == "__main__":
    main()
