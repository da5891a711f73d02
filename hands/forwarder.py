"""The doors out of a sandbox: TCP ports on the sandbox's own loopback, each leading to a relay of the hands
server (git on one, outbound HTTP on another).

Hands starts this program inside the sandbox's network namespace only (`nsenter --net`), so it listens where
the sandbox's programs can connect, while its files, memory, environment and process stay outside the
sandbox's other namespaces: sandboxed code can neither see nor signal it. Each connection is piped to the
Unix socket of the door's relay in the hands server, which decides what may pass.

    python -m hands.forwarder --door 7480=/path/to/git.sock --door 7481=/path/to/egress.sock
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


async def _door(port: int, socket_path: str) -> asyncio.Server:
    async def connection(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            relay_reader, relay_writer = await asyncio.open_unix_connection(socket_path)
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(_pipe(client_reader, relay_writer), _pipe(relay_reader, client_writer))
        for writer in (client_writer, relay_writer):
            writer.close()

    return await asyncio.start_server(connection, "127.0.0.1", port)


async def _serve(doors: list[tuple[int, str]]) -> None:
    servers = [await _door(port, path) for port, path in doors]
    sys.stdout.write("ready\n")  # the hands server waits for this line before the sandbox may use a door
    sys.stdout.flush()
    await asyncio.gather(*(server.serve_forever() for server in servers))


def _door_spec(text: str) -> tuple[int, str]:
    port, sep, path = text.partition("=")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536 or not path:
        raise argparse.ArgumentTypeError(f"{text!r} is not PORT=SOCKET")
    return int(port), path


def main() -> None:
    """Entry point."""
    parser = argparse.ArgumentParser(prog="python -m hands.forwarder", description=__doc__)
    parser.add_argument(
        "--door",
        type=_door_spec,
        action="append",
        required=True,
        help="PORT=SOCKET: listen on PORT of the sandbox's loopback and pipe each connection to the Unix socket",
    )
    args = parser.parse_args()
    # Dies with the hands server that started it (nsenter execs into this process, so that is our parent).
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args.door))


if __name__ == "__main__":
    main()
