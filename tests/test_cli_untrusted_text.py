"""The CLI shows what came from a session with its control characters made visible: a tool's output, the agent's
words and thinking or a title cannot retitle the window, write the clipboard, clear the screen, fake a green
"ALL TESTS PASSED" or reorder text. `--json` keeps the text exact (escaped as JSON).

One real mesh (`LocalMesh`, as `up` starts it) for the module; its stand-in model plays a script whose agent
messages and bash tool call carry every attack, so the tool output is real sandbox output. The commands run
in-process through the CLI's `main` (`sessions tail`, which never ends by itself, as a process).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from managed_agents.cli import main
from managed_agents.local_mesh import LocalMesh, local_mesh_secret
from managed_agents.terminal_text import json_text, visible
from managed_agents.v1 import events_pb2
from session_store.client import SessionStoreClient
from tests.helpers import ROOT

pytestmark = pytest.mark.slow

# Each attack the issue reported, and a few more: window title (OSC 0), clipboard write (OSC 52), clear screen
# (CSI 2J), a fake green line (SGR), a carriage return overwriting a line, a bidi override, a C1 CSI (U+009B)
# that some terminals honour, backspace and DEL.
ATTACKS = (
    "\x1b]0;pwned-title\x07"
    "\x1b]52;c;cm0gLXJmIH4=\x07"
    "\x1b[2J\x1b[H"
    "\x1b[32mALL TESTS PASSED\x1b[0m"
    " fine\rEVIL"
    " \u202eevil\u202c"
    " \u009b2J"
    " \x08\x7f"
)
# What must show instead (and what must not reach the terminal raw).
VISIBLE = (
    "\\x1b]0;pwned-title\\x07",
    "\\x1b]52;c;cm0gLXJmIH4=\\x07",
    "\\x1b[2J\\x1b[H",
    "\\x1b[32mALL TESTS PASSED\\x1b[0m",
    "\\u202eevil\\u202c",
    "\\x9b2J",
    "\\x08\\x7f",
)
RAW = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
# The store refuses C0 and C1 controls in titles; bidi overrides it takes, and older logs may hold anything.
TITLE = "title \u202eevil\u202c \u2066isolated\u2069"
THINKING = "thinking " + ATTACKS
PROMPT = "show me the build output"

SCRIPT = {
    "name": "untrusted-text",
    "steps": [
        {
            "content": [
                {"type": "text", "text": "running it " + ATTACKS},
                {"type": "tool_use", "name": "bash", "input": {"command": f"printf '%s\\n' '{ATTACKS}'"}},
            ]
        },
        {"content": [{"type": "text", "text": "the output: {last_tool_result}"}]},
    ],
    "final_text": "again " + ATTACKS,
}


def assert_no_raw_controls(text: str) -> None:
    raw = sorted({f"U+{ord(c):04X}" for c in RAW.findall(text)})
    assert not raw, f"raw control characters reached the terminal: {raw}\n{text!r}"


@dataclass
class Result:
    code: int
    out: str
    err: str


def invoke(*args: str) -> Result:
    """The CLI's `main`, in this process, with stdout and stderr captured."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exited:
        main(list(args))
    return Result(int(exited.value.code or 0), out.getvalue(), err.getvalue())


@dataclass
class Session:
    home: Path
    id: str
    run: Result  # `run --title TITLE PROMPT`, as printed


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Session]:
    """A mesh, and one session run through `managed-agents run`; its log also holds an agent.thinking event."""
    tmp = tmp_path_factory.mktemp("untrusted")
    script = tmp / "script.json"
    script.write_text(json.dumps(SCRIPT))
    home = tmp / "home"
    environ = {k: v for k, v in os.environ.items() if k != "ANTHROPIC_API_KEY"}
    mesh = LocalMesh(home, environ, say=lambda _: None)
    mesh.start(standin_script=str(script))
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.delenv("ANTHROPIC_API_KEY", raising=False)
            patch.delenv("FORCE_COLOR", raising=False)
            for service in ("STORE", "BRAIN", "HANDS", "PROXY"):
                patch.delenv(f"MANAGED_AGENTS_{service}", raising=False)
            patch.setenv("MANAGED_AGENTS_HOME", str(home))
            patch.setenv("NO_COLOR", "1")
            ran = invoke("run", "--title", TITLE, PROMPT)
            assert ran.code == 0, ran.err
            session_id = re.search(r"^session (\S+)$", ran.out, re.M)
            assert session_id, ran.out
            asyncio.run(_think(mesh, home, session_id[1]))
            yield Session(home, session_id[1], ran)
    finally:
        mesh.stop()


async def _think(mesh: LocalMesh, home: Path, session_id: str) -> None:
    """Appends an agent.thinking event (the stand-in model does not stream thinking blocks)."""
    assert mesh.addresses is not None
    async with SessionStoreClient.connect(mesh.addresses.store, mesh_secret=local_mesh_secret(home)) as store:
        await store.emit(
            session_id,
            events_pb2.Event(
                producer="test", agent_thinking=events_pb2.AgentThinking(message_id="msg_test", thinking=THINKING)
            ),
        )


def _line(output: str, event_type: str) -> str:
    lines = [line for line in output.splitlines() if f" {event_type} " in line]
    assert lines, f"no {event_type} line in:\n{output}"
    return "\n".join(lines)


def test_visible_writes_out_every_control_but_newline_and_tab() -> None:
    assert visible("a\tb\nc") == "a\tb\nc"
    assert visible("a\tb\nc", oneline=True) == "a\\tb\\nc"
    assert visible("\x1b[2J\r\x07\x08\x7f\x9b\x85\u202e\u2066\x00") == (
        "\\x1b[2J\\r\\x07\\x08\\x7f\\x9b\\x85\\u202e\\u2066\\x00"
    )
    assert visible("héllo wörld ✓ 日本 עברית") == "héllo wörld ✓ 日本 עברית"
    encoded = json_text(json.dumps({"t": ATTACKS}, ensure_ascii=False))
    assert_no_raw_controls(encoded)
    assert json.loads(encoded) == {"t": ATTACKS}


def test_run_shows_the_turn_with_controls_visible(session: Session) -> None:
    out = session.run.out
    assert_no_raw_controls(out + session.run.err)
    message = _line(out, "agent.message")
    for shown in VISIBLE:
        assert shown in message, (shown, message)
    assert " fine\\rEVIL" in message
    assert "\\x1b]0;pwned-title\\x07" in _line(out, "agent.tool_result"), "the sandbox's real output"
    assert "turn ended: end_turn" in out


def test_sessions_show_and_list_keep_controls_visible(session: Session) -> None:
    shown = invoke("sessions", "show", session.id)
    assert shown.code == 0, shown.err
    assert_no_raw_controls(shown.out)
    assert f"title: {visible(TITLE, oneline=True)}" in shown.out
    assert "\\x1b[32mALL TESTS PASSED" in _line(shown.out, "agent.thinking")
    for shown_text in VISIBLE:
        assert shown_text in _line(shown.out, "agent.message")
    assert "\\u202eevil" in _line(shown.out, "agent.tool_use")
    listed = invoke("sessions", "list")
    assert listed.code == 0, listed.err
    assert_no_raw_controls(listed.out)
    assert visible(TITLE, oneline=True) in listed.out


def test_json_output_parses_to_the_exact_text(session: Session) -> None:
    shown = invoke("sessions", "show", session.id, "--json")
    assert shown.code == 0, shown.err
    assert_no_raw_controls(shown.out)
    lines = [json.loads(line) for line in shown.out.splitlines()]
    assert lines[0]["title"] == TITLE
    by_type: dict[str, list[dict[str, Any]]] = {}
    for event in lines[1:]:
        by_type.setdefault(event["type"], []).append(event)
    assert by_type["agent.thinking"][0]["agent_thinking"]["thinking"] == THINKING
    texts = [block["text"]["text"] for e in by_type["agent.message"] for block in e["agent_message"]["content"]]
    assert "running it " + ATTACKS in texts
    result = by_type["agent.tool_result"][0]["agent_tool_result"]["content"][0]["text"]["text"]
    assert ATTACKS in result
    listed = invoke("sessions", "list", "--json")
    assert_no_raw_controls(listed.out)
    assert TITLE in [json.loads(line)["title"] for line in listed.out.splitlines()]


def test_sessions_send_follow_shows_the_new_turn_visibly(session: Session) -> None:
    sent = invoke("sessions", "send", session.id, "once more", "--follow")
    assert sent.code == 0, sent.err
    assert_no_raw_controls(sent.out)
    assert "again \\x1b]0;pwned-title\\x07" in _line(sent.out, "agent.message")
    as_json = invoke("sessions", "send", session.id, "and again", "--follow", "--json")
    assert as_json.code == 0, as_json.err
    assert_no_raw_controls(as_json.out)
    events = [json.loads(line) for line in as_json.out.splitlines()]
    texts = [b["text"]["text"] for e in events if "agentMessage" in e for b in e["agentMessage"]["content"]]
    assert "again " + ATTACKS in texts


def test_colours_stay_and_only_they_are_escapes(session: Session, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_COLOR")
    monkeypatch.setenv("FORCE_COLOR", "1")
    shown = invoke("sessions", "show", session.id)
    assert shown.code == 0, shown.err
    assert "\x1b[32m" in shown.out, "the CLI's own colours"
    assert_no_raw_controls(re.sub(r"\x1b\[[0-9;]*m", "", shown.out))
    assert "\\x1b[32mALL TESTS PASSED" in shown.out


def test_errors_from_services_are_shown_visibly(session: Session) -> None:
    missing = invoke("sessions", "show", "nope\x1b]0;pwned\x07")
    assert missing.code in (1, 2), missing
    assert_no_raw_controls(missing.err)


def test_sessions_tail_shows_controls_visibly(session: Session) -> None:
    env = {
        **{k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "MANAGED_AGENTS_STORE")},
        "MANAGED_AGENTS_HOME": str(session.home),
        "NO_COLOR": "1",
    }
    tails = {
        mode: subprocess.Popen(
            [sys.executable, "-m", "managed_agents.cli", "sessions", "tail", session.id, *flags],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for mode, flags in (("text", []), ("json", ["--json"]))
    }
    outputs = {}
    try:
        for mode, tail in tails.items():
            assert tail.stdout is not None
            seen = b""
            deadline = time.monotonic() + 30
            while b"agent.thinking" not in seen and b"agentThinking" not in seen and b"agent_thinking" not in seen:
                assert time.monotonic() < deadline, seen
                line = tail.stdout.readline()
                assert line, tail.stderr.read() if tail.stderr else ""
                seen += line
            outputs[mode] = seen.decode()
    finally:
        for tail in tails.values():
            tail.send_signal(signal.SIGINT)
            tail.communicate(timeout=30)
    assert_no_raw_controls(outputs["text"])
    for shown in VISIBLE:
        assert shown in _line(outputs["text"], "agent.message")
    assert_no_raw_controls(outputs["json"])
    events = [json.loads(line) for line in outputs["json"].splitlines()]
    assert any(e.get("agent_thinking", {}).get("thinking") == THINKING for e in events)
