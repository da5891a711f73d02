"""Untrusted text made safe to print on a terminal.

Everything a session holds (tool output, tool inputs, the agent's messages and thinking, titles, error messages
from services, MCP server names...) is written by a model, a program in a sandbox or a remote server. Printed
as it is, its control characters would drive the terminal: retitle the window (OSC 0), write the clipboard
(OSC 52), clear the screen (CSI 2J), paint a fake green "ALL TESTS PASSED", overwrite a line with `\\r`, or
reorder what is shown with bidi overrides. The CLI passes every such text through `visible` before printing
it; `--json` output goes through `json_text` instead, which keeps the text exact.
"""

from __future__ import annotations

import re

from managed_agents.render import Renderer
from managed_agents.v1 import events_pb2

# C0 controls but \t and \n, DEL, C1 controls, and the bidi embeddings, overrides and isolates.
_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
_UNSAFE_ONELINE = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
# What JSON does not escape by itself (it escapes C0): DEL, C1 and bidi controls.
_UNSAFE_IN_JSON = re.compile("[\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
_NAMED = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    code = ord(char)
    return _NAMED.get(char) or (f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}")


def visible(text: str, *, oneline: bool = False) -> str:
    """`text` with every character that could drive a terminal written out as Python writes it in a string
    literal: `\\r`, `\\x1b` (ESC), `\\x07` (BEL), `\\x08`, `\\x7f` (DEL), `\\x9b` (a C1 control, U+0080-U+009F),
    `\\u202e` (a bidi override; U+202A-U+202E and U+2066-U+2069).

    Newlines and tabs are kept (tool output is multi-line), unless `oneline`: then they are written `\\n` and
    `\\t` too, for fields shown on one line (titles, names, ids). Every other character is kept as it is.
    """
    return (_UNSAFE_ONELINE if oneline else _UNSAFE).sub(_escape, text)


def json_text(encoded: str) -> str:
    """A JSON document (`json.dumps(..., ensure_ascii=False)`) with the DEL, C1 and bidi control characters
    inside its strings written as `\\uXXXX` escapes, which JSON's encoder leaves raw (it escapes only C0): the
    document decodes to exactly the same value, and printing it cannot drive a terminal."""
    return _UNSAFE_IN_JSON.sub(lambda m: f"\\u{ord(m.group()):04x}", encoded)


def event_line(renderer: Renderer, event: events_pb2.Event) -> str:
    """`Renderer.line` with the event's text made `visible` (the renderer's own colours are kept)."""
    text, styles = renderer.summary(event)
    seq = renderer.paint(f"{event.seq:>5}", "dim")
    kind = renderer.paint(f"{visible(event.type, oneline=True):<26}", *styles)
    return f"{seq}  {kind} {visible(text)}"
