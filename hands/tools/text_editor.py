"""`str_replace_based_edit_tool`: Anthropic's text editor tool (view, create, str_replace, insert) over the
sandbox's workspace, operated from the host side of the workspace directory.

Every path is confined to the workspace: `/workspace/x` and `x` both mean the file `x` in it; a path that leaves
it (`..`, an absolute path elsewhere) is an error, never a read or write outside. The sandbox's code may change
the workspace while hands works in it, so every file is reached through `hands.tools.files`: by handle beneath
the workspace's fd, never following a symlink, opening only regular files and directories.

Given the sandbox's host identity (uid, gid), each operation runs on a fresh thread of its own that takes that
identity for file access: the sandbox's permissions apply and what it creates belongs to it. `run_async` also
bounds the operation's time, on a thread of its own rather than asyncio's default pool.
"""

from __future__ import annotations

import asyncio
import posixpath
import threading
from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hands.backend import WORKSPACE_MOUNT
from hands.tools import files
from hands.tools.files import Parts, Resolution

NAME = "str_replace_based_edit_tool"
ANTHROPIC_TYPE = "text_editor_20250728"
MAX_VIEW_CHARS = 60_000
"""A file view or snippet is cut after this many characters; a directory view lists at most this many."""
MAX_FILE_BYTES = 10 * 1024 * 1024
MAX_LIST_ENTRIES = 1_000
"""A directory view shows at most this many entries..."""
MAX_LIST_SCAN = 1_000_000
"""...and reads at most this many directory entries, so a directory of millions can't hold the thread long."""
MAX_PATH_BYTES = 4096
MAX_RESULT_BYTES = 256 * 1024
"""No answer is longer than this in UTF-8 (60,000 characters of up to 4 bytes, plus a heading): far below the 4 MiB
of an event the brain logs. The caps above keep every answer under it; `_bounded` enforces it regardless."""
SNIPPET_LINES = 4
_INT_LIMIT = 1 << 62
_VIEW_CUT = "\n[... file cut here; view a smaller view_range to see the rest ...]"
_SNIPPET_CUT = "\n[... snippet cut here; view the file with a view_range to see the rest ...]"
_CHUNK = 1 << 16

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "command": {"type": "string", "enum": ["view", "create", "str_replace", "insert"]},
        "path": {"type": "string", "description": "absolute path under /workspace, or relative to it"},
        "file_text": {"type": "string", "description": "create: the file's content"},
        "view_range": {
            "type": "array",
            "items": {"type": "integer"},
            "minItems": 2,
            "maxItems": 2,
            "description": "view: [first line, last line], 1-based; -1 as last means the end",
        },
        "old_str": {"type": "string", "description": "str_replace: text that must occur exactly once"},
        "new_str": {"type": "string", "description": "str_replace: the replacement (empty deletes)"},
        "insert_line": {"type": "integer", "description": "insert: line after which to insert (0: top)"},
        "insert_text": {"type": "string", "description": "insert: the text to insert"},
    },
    "required": ["command", "path"],
}
DESCRIPTION = "View, create and edit text files in the sandbox workspace (/workspace)."


class EditorError(Exception):
    """A tool error: the sentence the model sees."""


@dataclass(frozen=True, slots=True)
class EditorResult:
    """What the tool returns."""

    output: str
    is_error: bool = False


def parse_path(raw: str) -> Parts:
    """The components of `raw` beneath the workspace, refusing a path that leaves it.

    `..` is resolved by name here, before any file is touched: the editor follows no symlink, so a name's `..`
    is the directory above it, and what is left never climbs out.
    """
    if not raw or "\x00" in raw:
        raise EditorError("path must be a non-empty path")
    try:
        size = len(raw.encode("utf-8", "surrogateescape"))
    except UnicodeEncodeError:
        raise EditorError(f"{files.printable(raw)} has characters no file name can have") from None
    if size > MAX_PATH_BYTES:
        raise EditorError(f"path is longer than {MAX_PATH_BYTES} bytes")
    under_mount = raw == WORKSPACE_MOUNT or raw.startswith(WORKSPACE_MOUNT + "/")
    if raw.startswith("/") and not under_mount:
        raise EditorError(f"{files.printable(raw)} is outside the workspace; paths must be under {WORKSPACE_MOUNT}")
    inside = raw[len(WORKSPACE_MOUNT) :] if under_mount else raw
    parts = tuple(name for name in posixpath.normpath(inside.lstrip("/") or ".").split("/") if name != ".")
    if parts and parts[0] == "..":
        raise EditorError(
            f"{files.printable(raw)} resolves outside the workspace {WORKSPACE_MOUNT}; that is not allowed"
        )
    return parts


# Text, by offsets: a 10 MiB file of empty lines must not become ten million strings. -------------------------


def _line_count(text: str) -> int:
    return text.count("\n") + 1


def _line_start(text: str, line: int) -> int:
    """The offset where 1-based `line` (at most the file's line count) starts."""
    position, remaining = 0, line - 1
    while remaining:
        stop = min(len(text), position + _CHUNK)
        found = text.count("\n", position, stop)
        if found < remaining:
            remaining, position = remaining - found, stop
            continue
        for _ in range(remaining):
            position = text.index("\n", position) + 1
        break
    return position


def _line_end(text: str, line: int) -> int:
    """The offset just past 1-based `line`'s last character (before its newline)."""
    return len(text) if line >= _line_count(text) else _line_start(text, line + 1) - 1


def _numbered(text: str, first: int, cut: str) -> str:
    """`cat -n` of `text` from line number `first`, cut after MAX_VIEW_CHARS characters with the `cut` note."""
    out: list[str] = []
    size, start, number = 0, 0, first
    while True:
        end = text.find("\n", start)
        entry = f"{number:6}\t{text[start:] if end < 0 else text[start:end]}"
        size += len(entry) + (1 if out else 0)
        out.append(entry)
        if size > MAX_VIEW_CHARS:
            return "\n".join(out)[:MAX_VIEW_CHARS] + cut
        if end < 0:
            return "\n".join(out)
        start, number = end + 1, number + 1


def _snippet(text: str, around_line: int, lines_changed: int) -> str:
    first = max(0, around_line - SNIPPET_LINES)
    last = min(_line_count(text), around_line + lines_changed + SNIPPET_LINES)
    return _numbered(text[_line_start(text, first + 1) : _line_end(text, last)], first + 1, _SNIPPET_CUT)


def _occurrence_lines(text: str, old: str, limit: int) -> list[int]:
    lines: list[int] = []
    position = text.find(old)
    while position >= 0 and len(lines) < limit:
        lines.append(text.count("\n", 0, position) + 1)
        position = text.find(old, position + len(old))
    return lines


# Input ---------------------------------------------------------------------------------------------------------


def _string(tool_input: Mapping[str, Any], key: str, *, required: bool = True) -> str:
    value = tool_input.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise EditorError(f"{key} is required and must be a string")
    return value


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and -_INT_LIMIT < value < _INT_LIMIT


def _encoded(text: str, what: str) -> bytes:
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError:
        raise EditorError(f"{what} is not valid UTF-8 text (it has lone surrogates)") from None
    if len(data) > MAX_FILE_BYTES:
        raise EditorError(f"{what} would be larger than {MAX_FILE_BYTES >> 20} MiB; write large files with bash")
    return data


# Commands ------------------------------------------------------------------------------------------------------


def _read(tree: files.Tree, parts: Parts, label: str) -> str:
    data = tree.read_file(parts, MAX_FILE_BYTES)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise EditorError(f"{label} is not a UTF-8 text file") from None
    # Universal newlines, as the editor has always read files (Path.read_text).
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _view(tree: files.Tree, parts: Parts, label: str, view_range: Any) -> str:
    if tree.kind(parts) == "directory":
        if view_range is not None:
            raise EditorError("view_range applies to files, not directories")
        listing = tree.list_dir(
            parts, depth=2, max_entries=MAX_LIST_ENTRIES, max_chars=MAX_VIEW_CHARS, max_scan=MAX_LIST_SCAN
        )
        body = "\n".join(listing.lines) or "(empty)"
        note = listing.note()
        return f"Files and directories up to 2 levels deep in {label}, excluding hidden items:\n{body}" + (
            f"\n{note}" if note else ""
        )
    text = _read(tree, parts, label)
    first = 1
    if view_range is not None:
        if not isinstance(view_range, list) or len(view_range) != 2 or not all(map(_is_int, view_range)):
            raise EditorError("view_range must be two integers [first, last]")
        count = _line_count(text)
        start, end = view_range
        if not 1 <= start <= count:
            raise EditorError(f"view_range start {start} is outside the file's lines 1 to {count}")
        if end != -1 and not start <= end <= count:
            raise EditorError(f"view_range end {end} must be -1 or between {start} and {count}")
        text = text[_line_start(text, start) : len(text) if end == -1 else _line_end(text, end)]
        first = start
    return f"Here's the result of running `cat -n` on {label}:\n{_numbered(text, first, _VIEW_CUT)}"


def _create(tree: files.Tree, parts: Parts, label: str, tool_input: Mapping[str, Any]) -> str:
    data = _encoded(_string(tool_input, "file_text"), "file_text")
    tree.write_file(parts, data, make_parents=True)
    return f"File created successfully at: {label}"


def _str_replace(tree: files.Tree, parts: Parts, label: str, tool_input: Mapping[str, Any]) -> str:
    old, new = _string(tool_input, "old_str"), _string(tool_input, "new_str", required=False)
    if not old:
        raise EditorError("old_str must not be empty")
    text = _read(tree, parts, label)
    count = text.count(old)
    if count == 0:
        raise EditorError(f"No replacement was performed: old_str did not appear verbatim in {label}.")
    if count > 1:
        where = _occurrence_lines(text, old, 10)
        raise EditorError(
            f"No replacement was performed: old_str occurs {count} times in {label} (lines "
            f"{', '.join(map(str, where))}); make it unique."
        )
    at = text.count("\n", 0, text.index(old))
    text = text.replace(old, new)
    tree.write_file(parts, _encoded(text, "the edited file"), make_parents=False)
    return (
        f"The file {label} has been edited. Here's the result of running `cat -n` on a "
        f"snippet of {label}:\n{_snippet(text, at, new.count(chr(10)) + 1)}\n"
        "Review the changes and make sure they are as expected."
    )


def _insert(tree: files.Tree, parts: Parts, label: str, tool_input: Mapping[str, Any]) -> str:
    line = tool_input.get("insert_line")
    inserted = tool_input.get("insert_text", tool_input.get("new_str"))
    if not _is_int(line):
        raise EditorError("insert_line is required and must be an integer (a line number, 0 for the top)")
    assert isinstance(line, int)
    if not isinstance(inserted, str):
        raise EditorError("insert_text is required and must be a string")
    text = _read(tree, parts, label)
    count = _line_count(text)
    if not 0 <= line <= count:
        raise EditorError(f"insert_line {line} must be between 0 and {count}")
    if line == 0:
        text = f"{inserted}\n{text}"
    else:
        cut = _line_end(text, line)
        text = f"{text[:cut]}\n{inserted}{text[cut:]}"
    tree.write_file(parts, _encoded(text, "the edited file"), make_parents=False)
    return (
        f"The file {label} has been edited. Here's the result of running `cat -n` on a "
        f"snippet of the edited file:\n{_snippet(text, line, inserted.count(chr(10)) + 1)}"
    )


def _command(tree: files.Tree, parts: Parts, label: str, tool_input: Mapping[str, Any]) -> str:
    command = tool_input.get("command")
    if command == "view":
        return _view(tree, parts, label, tool_input.get("view_range"))
    if command == "create":
        return _create(tree, parts, label, tool_input)
    if command == "str_replace":
        return _str_replace(tree, parts, label, tool_input)
    return _insert(tree, parts, label, tool_input)


def _bounded(result: EditorResult) -> EditorResult:
    """`result` as UTF-8 that fits in MAX_RESULT_BYTES (lone surrogates from a path become `?`)."""
    data = result.output.encode("utf-8", "replace")
    if len(data) > MAX_RESULT_BYTES:
        note = "\n[... answer cut here: it was too long ...]"
        data = data[: MAX_RESULT_BYTES - len(note)] + note.encode()
    return EditorResult(data.decode("utf-8", "ignore"), result.is_error)


def _execute(
    tool_input: Mapping[str, Any], workspace: Path, identity: tuple[int, int] | None, resolution: Resolution
) -> EditorResult:
    """Runs one command on the calling thread, which takes `identity` for good if given (see `run`)."""
    label = files.printable(str(tool_input.get("path")))
    try:
        parts = parse_path(_string(tool_input, "path"))
        command = tool_input.get("command")
        if command not in ("view", "create", "str_replace", "insert"):
            raise EditorError(f"unknown command {command!r}; use view, create, str_replace or insert")
        with files.open_tree(workspace, shown_root=WORKSPACE_MOUNT, resolution=resolution) as tree:
            if identity is not None:
                files.become(*identity)
            return _bounded(EditorResult(_command(tree, parts, label, tool_input)))
    except (EditorError, files.Refused) as error:
        return _bounded(EditorResult(str(error), is_error=True))
    except OSError as error:
        return _bounded(EditorResult(f"{error.strerror or error}: {label}", is_error=True))


def _identity(uid: int | None, gid: int | None) -> tuple[int, int] | None:
    if uid is None and gid is None:
        return None
    if uid is None or gid is None:
        raise ValueError("uid and gid are given together, or neither")
    return uid, gid


def _on_fresh_thread(
    tool_input: Mapping[str, Any], workspace: Path, identity: tuple[int, int] | None, resolution: Resolution
) -> Future[EditorResult]:
    """Starts the command on a new thread that ends with it, never a pooled one: the thread's file identity
    changes for good, and a stuck operation must hold nothing anyone else waits for."""
    future: Future[EditorResult] = Future()
    tool_input = dict(tool_input)  # the thread may outlive the caller's mapping

    def work() -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(_execute(tool_input, workspace, identity, resolution))
        except BaseException as error:
            future.set_exception(error)

    threading.Thread(target=work, name="text-editor", daemon=True).start()
    return future


def run(
    tool_input: Mapping[str, Any],
    workspace: Path,
    *,
    uid: int | None = None,
    gid: int | None = None,
    resolution: Resolution = "auto",
) -> EditorResult:
    """Runs one editor command and waits for it; errors are results the model sees.

    With `uid` and `gid` (the sandbox's host identity, both or neither) the command runs on a fresh thread acting
    as that user for file access, so the caller's thread keeps its own identity. `resolution` picks how paths
    are resolved (tests force the fallback walk; see `files.Resolution`).
    """
    identity = _identity(uid, gid)
    if identity is None:
        return _execute(tool_input, workspace, None, resolution)
    return _on_fresh_thread(tool_input, workspace, identity, resolution).result()


async def run_async(
    tool_input: Mapping[str, Any],
    workspace: Path,
    *,
    uid: int | None,
    gid: int | None,
    timeout: float,
    resolution: Resolution = "auto",
) -> EditorResult:
    """Runs one editor command on a fresh thread (acting as uid:gid if given), waiting at most `timeout` seconds.

    Past the timeout the caller gets an error result and the thread is abandoned: a thread can't be killed, so
    it finishes on its own (every operation is bounded: reads at MAX_FILE_BYTES, listings at MAX_LIST_SCAN
    entries), and its changed identity ends with it.
    """
    future = asyncio.wrap_future(_on_fresh_thread(tool_input, workspace, _identity(uid, gid), resolution))
    try:
        return await asyncio.wait_for(future, timeout)
    except TimeoutError:
        return EditorResult(
            f"The file operation did not finish within {timeout:g} s and was abandoned; it may still complete, "
            "so check the file with bash before trying again.",
            is_error=True,
        )
