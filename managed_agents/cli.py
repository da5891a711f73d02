"""`managed-agents`: run the mesh, run agent sessions, and inspect them from a terminal.

Exit codes: 0 success; 1 the mesh refused the request or the turn ended in an error; 2 bad command line;
3 a service could not be reached; 130 interrupted (Ctrl-C). `up` and `demo` stop their mesh on SIGTERM and
SIGHUP as on Ctrl-C and exit 128 + the signal's number: 143 for SIGTERM, 129 for SIGHUP.

Whatever came from a session (events, titles, tool output, error messages of services) is printed through
`managed_agents.terminal_text.visible`, with its control characters written out, so that it cannot drive the
terminal; `--json` output keeps it exact, escaped as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

from brain.client import BrainClient
from managed_agents import cli_credentials, events
from managed_agents.follow import TurnFollower
from managed_agents.local_mesh import LocalMesh, MeshAddresses, local_mesh_secret, mesh_home
from managed_agents.mesh.auth import MeshSecretError, mesh_secret, write_secret_file
from managed_agents.mesh.channel import dial
from managed_agents.mesh.errors import MeshError, Unavailable
from managed_agents.mesh.telemetry import build_tracer_provider
from managed_agents.mesh.tls import (
    CA_FILE,
    CERT_FILE,
    KEY_FILE,
    MESH_NAME,
    MeshTls,
    MeshTlsError,
    mesh_tls,
    write_dev_certs,
)
from managed_agents.render import Renderer
from managed_agents.terminal_text import event_line, json_text, visible
from managed_agents.v1 import brain_pb2, events_pb2, sandbox_pb2, session_pb2
from session_store.client import SessionStoreClient

EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
DEFAULTS = {"store": "127.0.0.1:7301", "hands": "127.0.0.1:7302", "brain": "127.0.0.1:7303", "proxy": "127.0.0.1:7304"}
DEMO_PROMPT = "Write a small Python module with a test suite in the sandbox, run the tests there, and report."

_STATUSES = {"idle": 1, "running": 2, "rescheduling": 3, "terminated": 4}


def _address(args: argparse.Namespace, service: str) -> str:
    """A service's address: flag, else MANAGED_AGENTS_<SERVICE>, else the mesh `up` started, else default."""
    given = getattr(args, service, None) or os.environ.get(f"MANAGED_AGENTS_{service.upper()}")
    if given:
        return str(given)
    running = MeshAddresses.load(mesh_home(os.environ))
    if running is not None and getattr(running, service):
        return str(getattr(running, service))
    return DEFAULTS[service]


def _secret() -> str:
    """The mesh secret to present: from the environment, else that of the mesh `up` started here."""
    configured = mesh_secret(os.environ)
    return configured or local_mesh_secret(mesh_home(os.environ))


def _tls() -> MeshTls | None:
    """The mesh's TLS material, when `MANAGED_AGENTS_TLS_DIR` names it (`managed_agents.mesh.tls`)."""
    return mesh_tls(os.environ)


def _json_line(message: Message) -> str:
    fields = json_format.MessageToDict(message, preserving_proto_field_name=True)
    return json_text(json.dumps(fields, ensure_ascii=False))


def _status_name(value: int) -> str:
    return events_pb2.SessionStatus.Name(value).removeprefix("SESSION_STATUS_").lower()  # type: ignore[arg-type]


# Sessions --------------------------------------------------------------------------------------------------


async def _sessions_list(args: argparse.Namespace) -> int:
    async with SessionStoreClient.connect(_address(args, "store"), mesh_secret=_secret(), tls=_tls()) as store:
        page = await store.list_sessions(status=_STATUSES.get(args.status, 0), page_size=args.limit)  # type: ignore[arg-type]
    if args.json:
        for session in page.sessions:
            print(_json_line(session))
        return EXIT_OK
    if not page.sessions:
        print("no sessions")
        return EXIT_OK
    print(f"{'SESSION':<32} {'STATUS':<13} {'EVENTS':>6}  {'CREATED':<20} TITLE")
    for session in page.sessions:
        created = session.create_time.ToDatetime().strftime("%Y-%m-%d %H:%M:%S")
        print(
            f"{visible(session.id, oneline=True):<32} {_status_name(session.status):<13} {session.last_seq:>6}  "
            f"{created:<20} {visible(session.title, oneline=True)}"
        )
    return EXIT_OK


async def _sessions_show(args: argparse.Namespace) -> int:
    async with SessionStoreClient.connect(_address(args, "store"), mesh_secret=_secret(), tls=_tls()) as store:
        session, log = await store.read_session(args.session_id)
    if args.json:
        print(_json_line(session))
        for event in log:
            print(_json_line(event))
        return EXIT_OK
    renderer = Renderer.for_terminal(sys.stdout.isatty())
    print(
        renderer.paint(f"session {visible(session.id, oneline=True)}", "bold"),
        f"({_status_name(session.status)}, {session.last_seq} events)",
    )
    if session.title:
        print(f"title: {visible(session.title, oneline=True)}")
    for event in log:
        print(event_line(renderer, event))
        if args.traces:
            trace = f"trace {event.trace_id} span {event.span_id}" if event.trace_id else "(not traced)"
            print(renderer.paint(f"       {visible(trace, oneline=True)}", "dim"))
    return EXIT_OK


async def _sessions_tail(args: argparse.Namespace) -> int:
    renderer = Renderer.for_terminal(sys.stdout.isatty())
    async with SessionStoreClient.connect(_address(args, "store"), mesh_secret=_secret(), tls=_tls()) as store:
        async for event in store.watch(args.session_id, after_seq=args.after):
            print(_json_line(event) if args.json else event_line(renderer, event), flush=True)
    return EXIT_OK


async def _sessions_create(args: argparse.Namespace) -> int:
    async with SessionStoreClient.connect(_address(args, "store"), mesh_secret=_secret(), tls=_tls()) as store:
        session = await store.create_session(session_id=args.id or "", title=args.title or "", agent=_agent(args))
    print(_json_line(session) if args.json else visible(session.id, oneline=True))
    return EXIT_OK


async def _sessions_send(args: argparse.Namespace) -> int:
    async with SessionStoreClient.connect(_address(args, "store"), mesh_secret=_secret(), tls=_tls()) as store:
        response = await store.emit(args.session_id, events.user_message(args.text, producer="cli"))
        if args.no_wake:
            print(_json_line(response.event) if args.json else f"appended as seq {response.event.seq}")
            return EXIT_OK
        async with BrainClient.connect(_address(args, "brain"), mesh_secret=_secret(), tls=_tls()) as brain:
            woken = await brain.wake(args.session_id)
        if args.json:
            print(_json_line(response.event))
        else:
            outcome = brain_pb2.WakeOutcome.Name(woken.outcome).removeprefix("WAKE_OUTCOME_").lower()
            print(f"appended as seq {response.event.seq}; brain: {outcome}")
        if args.follow:
            follower = TurnFollower(store, Renderer.for_terminal(sys.stdout.isatty()), json_lines=args.json)
            result = await follower.follow(args.session_id, after_seq=response.event.seq - 1)
            return EXIT_OK if result.ok else EXIT_REFUSED
    return EXIT_OK


# Running turns ---------------------------------------------------------------------------------------------


def _repository(text: str) -> sandbox_pb2.Repository:
    """`CREDENTIAL=URL[#BRANCH]`: a repository cloned into the session's sandbox with a vault git credential."""
    credential, sep, url = text.partition("=")
    if not sep or not credential or not url:
        raise argparse.ArgumentTypeError(f"{text!r} is not CREDENTIAL=URL (e.g. github=https://github.com/o/r.git)")
    url, _, branch = url.partition("#")
    return sandbox_pb2.Repository(url=url, credential=credential, branch=branch)


def _secret_env(text: str) -> sandbox_pb2.SandboxSecret:
    """`ENV=CREDENTIAL`: an API key the session's sandbox sees only as a placeholder in `$ENV`."""
    env, sep, credential = text.partition("=")
    if not sep or not env or not credential:
        raise argparse.ArgumentTypeError(f"{text!r} is not ENV=CREDENTIAL (e.g. WEATHER_API_KEY=weather)")
    return sandbox_pb2.SandboxSecret(env=env, credential=credential)


def _agent(args: argparse.Namespace) -> session_pb2.AgentConfig | None:
    """What the session may use, from `--mcp-server`, `--repo` and `--secret` (None: nothing beyond the
    default sandbox)."""
    if not (args.mcp_server or args.repo or args.secret):
        return None
    return session_pb2.AgentConfig(
        mcp_servers=args.mcp_server, resources=sandbox_pb2.Resources(repositories=args.repo, secrets=args.secret)
    )


def _add_grant_flags(parser: argparse.ArgumentParser) -> None:
    """The flags that grant a new session credentials of the vault."""
    parser.add_argument(
        "--mcp-server", action="append", default=[], metavar="NAME", help="grant the session this MCP server"
    )
    parser.add_argument(
        "--repo",
        action="append",
        default=[],
        type=_repository,
        metavar="CREDENTIAL=URL[#BRANCH]",
        help="clone this repository into the session's sandbox, pushing and pulling with the vault's git "
        "credential (the token never enters the sandbox)",
    )
    parser.add_argument(
        "--secret",
        action="append",
        default=[],
        type=_secret_env,
        metavar="ENV=CREDENTIAL",
        help="let the sandbox use this API-key credential: $ENV holds a placeholder, which the egress relay "
        "replaces by the key on HTTPS requests to the credential's allowed hosts (every other host is refused)",
    )


async def _run_prompt(
    store_address: str,
    brain_address: str,
    prompt: str,
    *,
    title: str,
    json_lines: bool,
    say: Callable[[str], None],
    agent: session_pb2.AgentConfig | None = None,
) -> int:
    renderer = Renderer.for_terminal(sys.stdout.isatty())
    # With OTEL_EXPORTER_OTLP_ENDPOINT set, the turn's trace starts here, at the Wake this command sends.
    provider = build_tracer_provider("managed-agents-cli", os.environ)
    tracer = provider.get_tracer("managed-agents-cli") if provider else trace.NoOpTracer()
    try:
        with tracer.start_as_current_span("cli.run"):
            return await _drive_turn(
                store_address,
                brain_address,
                prompt,
                title=title,
                json_lines=json_lines,
                say=say,
                renderer=renderer,
                tracer_provider=provider,
                agent=agent,
            )
    finally:
        if provider is not None:
            provider.shutdown()


async def _drive_turn(
    store_address: str,
    brain_address: str,
    prompt: str,
    *,
    title: str,
    json_lines: bool,
    say: Callable[[str], None],
    renderer: Renderer,
    tracer_provider: TracerProvider | None,
    agent: session_pb2.AgentConfig | None = None,
) -> int:
    async with (
        SessionStoreClient.connect(
            store_address, tracer_provider=tracer_provider, mesh_secret=_secret(), tls=_tls()
        ) as store,
        BrainClient.connect(brain_address, tracer_provider=tracer_provider, mesh_secret=_secret(), tls=_tls()) as brain,
    ):
        session = await store.create_session(title=title or prompt[:80], agent=agent)
        say(f"session {visible(session.id, oneline=True)}")
        await store.emit(session.id, events.user_message(prompt, producer="cli"))
        follower = TurnFollower(store, renderer, json_lines=json_lines)
        following = asyncio.create_task(follower.follow(session.id, after_seq=0))
        try:
            await brain.wake(session.id)
            outcome = await following
        except (KeyboardInterrupt, asyncio.CancelledError):
            following.cancel()
            say("interrupting the turn...")
            await brain.interrupt(session.id, reason="interrupted from the command line")
            return EXIT_INTERRUPTED
    reason = events_pb2.StopReason.Name(outcome.stop_reason).removeprefix("STOP_REASON_").lower()  # type: ignore[arg-type]
    say(
        f"turn ended: {reason}; {outcome.model_calls} model calls, {outcome.tool_calls} tool calls, "
        f"{outcome.input_tokens} input and {outcome.output_tokens} output tokens"
    )
    return EXIT_OK if outcome.ok else EXIT_REFUSED


async def _run(args: argparse.Namespace) -> int:
    def say(text: str) -> None:
        print(text, file=sys.stderr if args.json else sys.stdout, flush=True)

    return await _run_prompt(
        _address(args, "store"),
        _address(args, "brain"),
        args.prompt,
        title=args.title or "",
        json_lines=args.json,
        say=say,
        agent=_agent(args),
    )


async def _health(args: argparse.Namespace) -> int:
    """Exit 0 if the server answers SERVING, 1 if it answers anything else, 3 if it cannot be reached."""
    async with dial(args.address, tls=_tls()) as channel:
        try:
            answer = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service or ""), timeout=args.timeout
            )
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.NOT_FOUND:
                print(f"{args.address} does not serve {args.service}", file=sys.stderr)
                return EXIT_REFUSED
            details = visible(error.details() or error.code().name)
            print(f"{args.address} cannot be reached: {details}", file=sys.stderr)
            return EXIT_UNREACHABLE
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
    print(f"{args.address}{' ' + args.service if args.service else ''}: {status}")
    return EXIT_OK if answer.status == health_pb2.HealthCheckResponse.SERVING else EXIT_REFUSED


async def _interrupt(args: argparse.Namespace) -> int:
    async with BrainClient.connect(_address(args, "brain"), mesh_secret=_secret(), tls=_tls()) as brain:
        response = await brain.interrupt(args.session_id, reason=args.reason or "")
    print(f"interrupt recorded as seq {response.seq}" + ("" if response.was_running else " (the session was idle)"))
    return EXIT_OK


class _Stop(KeyboardInterrupt):
    """Ctrl-C, SIGTERM or SIGHUP, raised where `up` or `demo` is: they stop their mesh."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _exit_code(interrupt: KeyboardInterrupt) -> int:
    """128 + the signal's number: 130 for Ctrl-C (SIGINT), 143 for SIGTERM, 129 for SIGHUP."""
    return 128 + getattr(interrupt, "signum", signal.SIGINT)


def _say(text: str) -> None:
    """Prints, unless the terminal is gone (after a hangup): stopping the mesh matters more."""
    with contextlib.suppress(OSError):
        print(text, flush=True)


def _with_mesh(mesh: LocalMesh, body: Callable[[], int], *, stopping: str) -> int:
    """Runs `body`, which starts `mesh` and uses it, then stops the mesh however `body` ended.

    Ctrl-C, SIGTERM and SIGHUP all end it the same way, and the exit code says which (`_exit_code`); once the
    mesh is stopping, another of them kills what is left of it instead of waiting for a graceful stop. A signal
    ignored when the command started (`nohup`, a shell's background job) stays ignored.
    """
    stopping_now = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping_now
        if stopping_now:
            mesh.kill()
        else:
            stopping_now = True
            raise _Stop(signum)

    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    for signum, handler in previous.items():
        if handler != signal.SIG_IGN:
            signal.signal(signum, on_signal)
    try:
        return body()
    except KeyboardInterrupt as interrupt:
        return _exit_code(interrupt)
    finally:
        stopping_now = True
        _say(stopping)
        mesh.stop()
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)


def _up(args: argparse.Namespace) -> int:
    home = mesh_home(os.environ)
    mesh = LocalMesh(home, os.environ, say=print)
    if mesh.uses_standin:
        print(
            "ANTHROPIC_API_KEY is not set: the brain talks to a local stand-in that plays a scripted demo. "
            "Set ANTHROPIC_API_KEY (and ANTHROPIC_BASE_URL if needed) to use Claude."
        )

    def serve() -> int:
        mesh.start(standin_script=args.script, hands_backend=args.backend)
        print(f'the mesh is up; data and logs in {home}/. Try: managed-agents run "{DEMO_PROMPT}"')
        print("Ctrl-C (or SIGTERM, SIGHUP) stops it.", flush=True)
        while not (dead := mesh.dead()):
            time.sleep(0.5)
        print(f"error: {', '.join(dead)} exited; see the logs in {mesh.home}/logs", file=sys.stderr)
        return EXIT_REFUSED

    return _with_mesh(mesh, serve, stopping="\nstopping the mesh...")


def _demo(args: argparse.Namespace) -> int:
    home = mesh_home(os.environ)
    mesh = LocalMesh(home, os.environ, say=print)
    if mesh.uses_standin:
        print(
            "ANTHROPIC_API_KEY is not set, so Claude is played by a local stand-in (managed_agents.standin) "
            "that "
            "speaks the Messages API and follows a fixed demo script; the store, brain and hands are real.\n"
            "Set ANTHROPIC_API_KEY to run the same demonstration with Claude.\n"
        )

    def run_demo() -> int:
        print("starting the mesh: each service is its own process on a free loopback port")
        addresses = mesh.start(standin_script="demo", hands_backend=args.backend)
        print()
        return asyncio.run(
            _run_prompt(
                addresses.store,
                addresses.brain,
                args.prompt or DEMO_PROMPT,
                title="demo",
                json_lines=False,
                say=print,
            )
        )

    return _with_mesh(mesh, run_demo, stopping="\nstopping the mesh")


# Services --------------------------------------------------------------------------------------------------


def _service_main(module: str, argv: Sequence[str]) -> int:
    if module == "store":
        from session_store.__main__ import main as store_main

        store_main(argv)
    elif module == "brain":
        from brain.__main__ import main as brain_main

        brain_main(argv)
    elif module == "proxy":
        from mcp_proxy.__main__ import main as proxy_main

        proxy_main(argv)
    else:
        from hands.__main__ import main as hands_main

        hands_main(argv)
    return EXIT_OK


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="managed-agents",
        description="Managed Claude agents as a gRPC service mesh: a session store (the durable log), brains "
        "(the stateless harness calling Claude), hands (sandboxes) and the mcp_proxy (the vault, and the only "
        "way to MCP servers). Run the mesh, run sessions, inspect them.",
        epilog="Addresses come from flags, then MANAGED_AGENTS_STORE / _BRAIN / _HANDS / _PROXY, then the mesh "
        "that `managed-agents up` started here (.managed-agents/mesh.json). The mesh secret comes from "
        "MANAGED_AGENTS_MESH_SECRET_FILE (or _SECRET), else from that mesh; mutual TLS is on when "
        "MANAGED_AGENTS_TLS_DIR names the mesh's certificates. Exit codes: 0 ok, 1 refused or "
        "the turn failed, 2 bad usage, 3 unreachable, 130 interrupted (Ctrl-C); `up` and `demo` stop their mesh "
        "on SIGTERM and SIGHUP as on Ctrl-C and exit 143 and 129 (128 + the signal's number). Text from sessions "
        "is printed with control characters written out (ESC as \\x1b, a bidi override as \\u202e); --json keeps "
        "it exact.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, text in (
        ("store", "run a session store server"),
        ("brain", "run a brain server"),
        ("hands", "run a hands (sandbox) server"),
        ("proxy", "run the mcp_proxy (vault and MCP proxy) server, or make and rotate its keys"),
    ):
        commands.add_parser(name, help=f"{text} (its own flags: `managed-agents {name} --help`)", add_help=False)

    up = commands.add_parser(
        "up",
        help="start store, hands, mcp_proxy and brain as local processes until Ctrl-C",
        description="Starts the mesh as local processes and keeps it until Ctrl-C (exit 130), SIGTERM (exit 143) "
        "or SIGHUP (exit 129), which all stop every service (SIGTERM, then SIGKILL after 10 s; a second signal "
        "kills them at once) and remove mesh.json. If `up` itself is killed, a watchdog process stops the "
        "services.",
    )
    up.add_argument("--backend", default="bwrap", choices=["bwrap", "docker", "local"], help="sandbox backend")
    up.add_argument("--script", default="demo", help="stand-in script when ANTHROPIC_API_KEY is unset")
    demo = commands.add_parser("demo", help="start the mesh, run one agent session end to end, stop the mesh")
    demo.add_argument("--backend", default="bwrap", choices=["bwrap", "docker", "local"], help="sandbox backend")
    demo.add_argument("--prompt", help="the task (default: write and test a small program)")

    secret = commands.add_parser(
        "secret", help="make a mesh secret file (give its path to every service as MANAGED_AGENTS_MESH_SECRET_FILE)"
    )
    secret.add_argument("--out", type=Path, required=True, help="the file to write (readable by its owner only)")
    secret.add_argument("--force", action="store_true", help="replace an existing file")
    certs = commands.add_parser(
        "certs",
        help="make a CA and a peer certificate for a dev mesh's mutual TLS (point MANAGED_AGENTS_TLS_DIR at DIR)",
    )
    certs.add_argument("directory", type=Path, metavar="DIR", help="where to write ca.crt, mesh.crt and mesh.key")
    certs.add_argument(
        "--name",
        action="append",
        default=[],
        help="another DNS name or IP address the certificate should carry, for clients that check the address "
        "they dial (repeatable; localhost and 127.0.0.1 are always in)",
    )
    certs.add_argument("--days", type=int, default=365, help="validity in days (default 365)")
    certs.add_argument("--force", action="store_true", help="replace existing files")

    run = commands.add_parser("run", help="start a session with PROMPT and stream it until the turn ends")
    run.add_argument("prompt")
    run.add_argument("--title", help="session title (default: the prompt)")
    run.add_argument("--json", action="store_true", help="events as JSON lines on stdout")
    run.add_argument("--store", help="session store address")
    run.add_argument("--brain", help="brain address")
    _add_grant_flags(run)
    health = commands.add_parser(
        "health",
        help="check that a mesh server is serving (for container health checks): exit 0 serving, 1 not, 3 down",
    )
    health.add_argument("address", help="host:port of any mesh server")
    health.add_argument("--service", help="a service name, e.g. managed_agents.v1.SessionService (default: the server)")
    health.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the answer (default 5)")
    interrupt = commands.add_parser("interrupt", help="stop a session's running turn at the next safe point")
    interrupt.add_argument("session_id")
    interrupt.add_argument("--reason", help="why, recorded in the log")
    interrupt.add_argument("--brain", help="brain address")

    sessions = commands.add_parser("sessions", help="list, show, follow, create and write to sessions")
    sessions.add_argument("--store", help="session store address")
    sessions.add_argument("--brain", help="brain address (for send)")
    actions = sessions.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = actions.add_parser("list", help="sessions, newest first")
    listing.add_argument("--status", choices=sorted(_STATUSES), help="only sessions in this status")
    listing.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    show = actions.add_parser("show", help="a session and its whole log")
    show.add_argument("session_id")
    show.add_argument("--json", action="store_true", help="one JSON object per line: the session, then events")
    show.add_argument("--traces", action="store_true", help="also print the trace and span id of each event")
    tail = actions.add_parser("tail", help="follow a session's events as they are appended (Ctrl-C to stop)")
    tail.add_argument("session_id")
    tail.add_argument("--after", type=int, default=0, help="start after this sequence number (default: all)")
    tail.add_argument("--json", action="store_true", help="one JSON object per line")
    create = actions.add_parser("create", help="create an idle session and print its id")
    create.add_argument("--id", help="choose the id (1-64 of [A-Za-z0-9_-])")
    create.add_argument("--title", help="a title for humans")
    create.add_argument("--json", action="store_true", help="print the whole session as JSON")
    _add_grant_flags(create)
    send = actions.add_parser("send", help="append a user message and wake a brain to answer it")
    send.add_argument("session_id")
    send.add_argument("text")
    send.add_argument("--no-wake", action="store_true", help="only append; do not wake a brain")
    send.add_argument("--follow", action="store_true", help="stream the turn until it ends")
    send.add_argument("--json", action="store_true", help="print the stored event as JSON")
    cli_credentials.add_parser(commands)
    return parser


_ASYNC = {"run": _run, "interrupt": _interrupt, "health": _health}
_SESSION_ACTIONS = {
    "list": _sessions_list,
    "show": _sessions_show,
    "tail": _sessions_tail,
    "create": _sessions_create,
    "send": _sessions_send,
}


def _make_secret(args: argparse.Namespace) -> int:
    if args.out.exists() and not args.force:
        print(f"error: {args.out} exists; pass --force to replace it", file=sys.stderr)
        return EXIT_USAGE
    write_secret_file(args.out)
    print(f"wrote {args.out}; give every mesh process MANAGED_AGENTS_MESH_SECRET_FILE={args.out.resolve()}")
    return EXIT_OK


def _make_certs(args: argparse.Namespace) -> int:
    if args.days < 1:
        print("error: --days must be at least 1", file=sys.stderr)
        return EXIT_USAGE
    existing = [args.directory / n for n in (CA_FILE, CERT_FILE, KEY_FILE) if (args.directory / n).exists()]
    if existing and not args.force:
        print(f"error: {existing[0]} exists; pass --force to replace the mesh's certificates", file=sys.stderr)
        return EXIT_USAGE
    for path in write_dev_certs(args.directory, extra_names=args.name, days=args.days):
        print(f"wrote {path}")
    where = args.directory.resolve()
    print(
        f"give every mesh process and client MANAGED_AGENTS_TLS_DIR={where}; grpcurl then needs "
        f"-cacert {where}/{CA_FILE} -cert {where}/{CERT_FILE} -key {where}/{KEY_FILE} -servername {MESH_NAME}"
    )
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the `managed-agents` command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["store"], ["brain"], ["hands"], ["proxy"]):
        raise SystemExit(_service_main(argv[0], argv[1:]))
    args = _parser().parse_args(argv)
    try:
        if args.command == "up":
            code = _up(args)
        elif args.command == "demo":
            code = _demo(args)
        elif args.command == "secret":
            code = _make_secret(args)
        elif args.command == "certs":
            code = _make_certs(args)
        elif args.command == "credentials":
            code = asyncio.run(cli_credentials.run(args, _address(args, "proxy"), _secret(), _tls()))
        elif args.command == "sessions":
            code = asyncio.run(_SESSION_ACTIONS[args.action](args))
        else:
            code = asyncio.run(_ASYNC[args.command](args))
    except KeyboardInterrupt as interrupt:
        code = _exit_code(interrupt)
    except Unavailable as error:
        print(
            f"error: cannot reach the mesh: {visible(str(error))} (is it running? `managed-agents up` starts one)",
            file=sys.stderr,
        )
        code = EXIT_UNREACHABLE
    except MeshError as error:
        print(f"error: {visible(str(error))}", file=sys.stderr)
        code = EXIT_REFUSED
    except (MeshSecretError, MeshTlsError) as error:
        print(f"error: {visible(str(error))}", file=sys.stderr)
        code = EXIT_USAGE
    except (RuntimeError, TimeoutError) as error:
        print(f"error: {visible(str(error))}", file=sys.stderr)
        code = EXIT_REFUSED
    raise SystemExit(code)


if __name__ == "__main__":
    main()
