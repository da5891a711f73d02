"""`managed-agents`: run the mesh's services and inspect sessions from a terminal.

Exit codes: 0 success; 1 the mesh refused the request (not found, invalid, conflict); 2 bad command line;
3 a service could not be reached; 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Sequence

from google.protobuf import json_format
from google.protobuf.message import Message

from managed_agents import events
from managed_agents.mesh.errors import MeshError, Unavailable
from managed_agents.render import Renderer
from managed_agents.v1 import events_pb2
from session_store.client import SessionStoreClient

EXIT_REFUSED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_INTERRUPTED = 1, 2, 3, 130
DEFAULT_STORE = "127.0.0.1:7301"

_STATUSES = {"idle": 1, "running": 2, "rescheduling": 3, "terminated": 4}


def _store_target(args: argparse.Namespace) -> str:
    return str(args.store or os.environ.get("MANAGED_AGENTS_STORE") or DEFAULT_STORE)


def _json_line(message: Message) -> str:
    fields = json_format.MessageToDict(message, preserving_proto_field_name=True)
    return json.dumps(fields, ensure_ascii=False)


async def _sessions_list(args: argparse.Namespace) -> int:
    async with SessionStoreClient.connect(_store_target(args)) as store:
        page = await store.list_sessions(status=_STATUSES.get(args.status, 0), page_size=args.limit)  # type: ignore[arg-type]
    if args.json:
        for session in page.sessions:
            print(_json_line(session))
        return 0
    if not page.sessions:
        print("no sessions")
        return 0
    print(f"{'SESSION':<32} {'STATUS':<13} {'EVENTS':>6}  {'CREATED':<20} TITLE")
    for session in page.sessions:
        status = events_pb2.SessionStatus.Name(session.status).removeprefix("SESSION_STATUS_").lower()
        created = session.create_time.ToDatetime().strftime("%Y-%m-%d %H:%M:%S")
        print(f"{session.id:<32} {status:<13} {session.last_seq:>6}  {created:<20} {session.title}")
    return 0


async def _sessions_show(args: argparse.Namespace) -> int:
    async with SessionStoreClient.connect(_store_target(args)) as store:
        session, log = await store.read_session(args.session_id)
    if args.json:
        print(_json_line(session))
        for event in log:
            print(_json_line(event))
        return 0
    renderer = Renderer.for_terminal(sys.stdout.isatty())
    status = events_pb2.SessionStatus.Name(session.status).removeprefix("SESSION_STATUS_").lower()
    print(renderer.paint(f"session {session.id}", "bold"), f"({status}, {session.last_seq} events)")
    if session.title:
        print(f"title: {session.title}")
    for event in log:
        print(renderer.line(event))
        if args.traces and event.trace_id:
            print(renderer.paint(f"       trace {event.trace_id} span {event.span_id}", "dim"))
    return 0


async def _sessions_tail(args: argparse.Namespace) -> int:
    renderer = Renderer.for_terminal(sys.stdout.isatty())
    async with SessionStoreClient.connect(_store_target(args)) as store:
        async for event in store.watch(args.session_id, after_seq=args.after):
            print(_json_line(event) if args.json else renderer.line(event), flush=True)
    return 0


async def _sessions_create(args: argparse.Namespace) -> int:
    async with SessionStoreClient.connect(_store_target(args)) as store:
        session = await store.create_session(session_id=args.id or "", title=args.title or "")
    print(_json_line(session) if args.json else session.id)
    return 0


async def _sessions_send(args: argparse.Namespace) -> int:
    async with SessionStoreClient.connect(_store_target(args)) as store:
        response = await store.emit(args.session_id, events.user_message(args.text, producer="cli"))
    print(_json_line(response.event) if args.json else f"appended as seq {response.event.seq}")
    return 0


def _store_main(argv: Sequence[str]) -> int:
    from session_store.__main__ import main as store_main

    store_main(argv)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from managed_agents.demo import run_demo

    return asyncio.run(run_demo(keep=args.keep))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="managed-agents",
        description="Managed Claude agents as a gRPC service mesh: run its services and inspect sessions.",
        epilog="Exit codes: 0 ok, 1 refused by the mesh, 2 bad usage, 3 unreachable, 130 interrupted.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    commands.add_parser(
        "store",
        help="run a session store server (flags as for python -m session_store; see `store --help`)",
        add_help=False,
    )
    demo = commands.add_parser(
        "demo", help="start a session store, write a short session through gRPC, watch it and read it back"
    )
    demo.add_argument("--keep", action="store_true", help="keep the store's data directory afterwards")

    sessions = commands.add_parser("sessions", help="list, show, follow, create and write to sessions")
    sessions.add_argument(
        "--store", help=f"session store address [env: MANAGED_AGENTS_STORE; default {DEFAULT_STORE}]"
    )
    actions = sessions.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = actions.add_parser("list", help="sessions, newest first")
    listing.add_argument("--status", choices=sorted(_STATUSES), help="only sessions in this status")
    listing.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    show = actions.add_parser("show", help="a session and its whole log")
    show.add_argument("session_id")
    show.add_argument(
        "--json", action="store_true", help="one JSON object per line: the session, then events"
    )
    show.add_argument("--traces", action="store_true", help="also print the trace and span id of each event")
    tail = actions.add_parser("tail", help="follow a session's events as they are appended (Ctrl-C to stop)")
    tail.add_argument("session_id")
    tail.add_argument("--after", type=int, default=0, help="start after this sequence number (default: all)")
    tail.add_argument("--json", action="store_true", help="one JSON object per line")
    create = actions.add_parser("create", help="create an idle session and print its id")
    create.add_argument("--id", help="choose the id (1-64 of [A-Za-z0-9_-])")
    create.add_argument("--title", help="a title for humans")
    create.add_argument("--json", action="store_true", help="print the whole session as JSON")
    send = actions.add_parser("send", help="append a user message")
    send.add_argument("session_id")
    send.add_argument("text")
    send.add_argument("--json", action="store_true", help="print the stored event as JSON")
    return parser


_SESSION_ACTIONS = {
    "list": _sessions_list,
    "show": _sessions_show,
    "tail": _sessions_tail,
    "create": _sessions_create,
    "send": _sessions_send,
}


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the `managed-agents` command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["store"]:
        raise SystemExit(_store_main(argv[1:]))
    args = _parser().parse_args(argv)
    try:
        code = _demo(args) if args.command == "demo" else asyncio.run(_SESSION_ACTIONS[args.action](args))
    except KeyboardInterrupt:
        code = EXIT_INTERRUPTED
    except Unavailable as error:
        print(f"error: cannot reach the mesh: {error}", file=sys.stderr)
        code = EXIT_UNREACHABLE
    except MeshError as error:
        print(f"error: {error}", file=sys.stderr)
        code = EXIT_REFUSED
    raise SystemExit(code)


if __name__ == "__main__":
    main()
