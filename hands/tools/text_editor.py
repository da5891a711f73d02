"""`str_replace_based_edit_tool`: Anthropic's text editor tool (view, create, str_replace, insert) over the
sandbox's workspace, operated from the host side of the workspace directory.

Every path is confined to the workspace: `/workspace/x` and `x` both mean the file `x` in it; a path that
leaves
it (`..`, an absolute path elsewhere, a symlink pointing out) is an error, never a read or write outside.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hands.backend import WORKSPACE_MOUNT

NAME = "str_replace_based_edit_tool"
ANTHROPIC_TYPE = "text_editor_20250728"
MAX_VIEW_CHARS = 60_000
MAX_FILE_BYTES = 10 * 1024 * 1024
SNIPPET_LINES = 4

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


def _shown(path: Path, workspace: Path) -> str:
    relative = path.relative_to(workspace)
    return WORKSPACE_MOUNT if str(relative) == "." else f"{WORKSPACE_MOUNT}/{relative}"


def resolve(raw: str, workspace: Path) -> Path:
    """The host path of `raw`, refusing anything outside the workspace (symlinks resolved)."""
    if not raw or "\x00" in raw:
        raise EditorError("path must be a non-empty path")
    inside = raw[len(WORKSPACE_MOUNT) :] if raw == WORKSPACE_MOUNT or raw.startswith(WORKSPACE_MOUNT + "/") else raw
    if raw.startswith("/") and inside is raw:
        raise EditorError(f"{raw} is outside the workspace; paths must be under {WORKSPACE_MOUNT}")
    root = Path(os.path.realpath(workspace))
    candidate = Path(os.path.normpath(os.path.join(root, inside.lstrip("/"))))
    # Resolve symlinks of the longest existing prefix: a link inside must not lead outside.
    real = Path(os.path.realpath(candidate))
    if real != root and root not in real.parents:
        raise EditorError(f"{raw} resolves outside the workspace {WORKSPACE_MOUNT}; that is not allowed")
    return real


def _numbered(text: str, first: int) -> str:
    return "\n".join(f"{n:6}\t{line}" for n, line in enumerate(text.split("\n"), start=first))


def _read(path: Path, raw: str) -> str:
    if not path.exists():
        raise EditorError(f"{raw} does not exist")
    if path.stat().st_size > MAX_FILE_BYTES:
        raise EditorError(f"{raw} is larger than {MAX_FILE_BYTES // (1 << 20)} MiB; use bash to inspect it")
    try:
        return path.read_text()
    except UnicodeDecodeError:
        raise EditorError(f"{raw} is not a UTF-8 text file") from None


def _view(path: Path, raw: str, workspace: Path, view_range: Any) -> str:
    if path.is_dir():
        if view_range is not None:
            raise EditorError("view_range applies to files, not directories")
        lines = []
        for dirpath, dirnames, filenames in os.walk(path):
            depth = len(Path(dirpath).relative_to(path).parts)
            dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and depth < 2)
            for name in sorted([*dirnames, *(f for f in filenames if not f.startswith("."))]):
                lines.append(_shown(Path(dirpath) / name, Path(os.path.realpath(workspace))))
        listing = "\n".join(lines) if lines else "(empty)"
        return f"Files and directories up to 2 levels deep in {raw}, excluding hidden items:\n{listing}"
    text = _read(path, raw)
    first = 1
    if view_range is not None:
        if (
            not isinstance(view_range, list)
            or len(view_range) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in view_range)
        ):
            raise EditorError("view_range must be two integers [first, last]")
        lines = text.split("\n")
        start, end = view_range
        if not 1 <= start <= len(lines):
            raise EditorError(f"view_range start {start} is outside the file's lines 1 to {len(lines)}")
        if end != -1 and not start <= end <= len(lines):
            raise EditorError(f"view_range end {end} must be -1 or between {start} and {len(lines)}")
        text = "\n".join(lines[start - 1 : None if end == -1 else end])
        first = start
    shown = _numbered(text, first)
    if len(shown) > MAX_VIEW_CHARS:
        shown = shown[:MAX_VIEW_CHARS] + "\n[... file cut here; view a smaller view_range to see the rest ...]"
    return f"Here's the result of running `cat -n` on {raw}:\n{shown}"


def _snippet(text: str, around_line: int, lines_changed: int) -> str:
    lines = text.split("\n")
    start = max(0, around_line - SNIPPET_LINES)
    end = min(len(lines), around_line + lines_changed + SNIPPET_LINES)
    return _numbered("\n".join(lines[start:end]), start + 1)


def _string(tool_input: Mapping[str, Any], key: str, *, required: bool = True) -> str:
    value = tool_input.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise EditorError(f"{key} is required and must be a string")
    return value


def run(tool_input: Mapping[str, Any], workspace: Path) -> EditorResult:
    """Runs one editor command; errors are results the model sees."""
    try:
        command = tool_input.get("command")
        raw = _string(tool_input, "path")
        path = resolve(raw, workspace)
        if command == "view":
            return EditorResult(_view(path, raw, workspace, tool_input.get("view_range")))
        if command == "create":
            text = _string(tool_input, "file_text")
            if path.is_dir():
                raise EditorError(f"{raw} is a directory")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            return EditorResult(f"File created successfully at: {raw}")
        if command == "str_replace":
            old, new = _string(tool_input, "old_str"), _string(tool_input, "new_str", required=False)
            if not old:
                raise EditorError("old_str must not be empty")
            text = _read(path, raw)
            count = text.count(old)
            if count == 0:
                raise EditorError(f"No replacement was performed: old_str did not appear verbatim in {raw}.")
            if count > 1:
                where = [n for n, line in enumerate(text.split("\n"), start=1) if old.split("\n")[0] in line]
                raise EditorError(
                    f"No replacement was performed: old_str occurs {count} times in {raw} (lines "
                    f"{', '.join(map(str, where[:10]))}); make it unique."
                )
            at = text[: text.index(old)].count("\n")
            text = text.replace(old, new)
            path.write_text(text)
            return EditorResult(
                f"The file {raw} has been edited. Here's the result of running `cat -n` on a "
                f"snippet of {raw}:\n{_snippet(text, at, new.count(chr(10)) + 1)}\n"
                "Review the changes and make sure they are as expected."
            )
        if command == "insert":
            line = tool_input.get("insert_line")
            inserted = tool_input.get("insert_text", tool_input.get("new_str"))
            if not isinstance(line, int) or isinstance(line, bool):
                raise EditorError("insert_line is required and must be an integer")
            if not isinstance(inserted, str):
                raise EditorError("insert_text is required and must be a string")
            lines = _read(path, raw).split("\n")
            if not 0 <= line <= len(lines):
                raise EditorError(f"insert_line {line} must be between 0 and {len(lines)}")
            new_lines = inserted.split("\n")
            lines[line:line] = new_lines
            text = "\n".join(lines)
            path.write_text(text)
            return EditorResult(
                f"The file {raw} has been edited. Here's the result of running `cat -n` on a "
                f"snippet of the edited file:\n{_snippet(text, line, len(new_lines))}"
            )
        raise EditorError(f"unknown command {command!r}; use view, create, str_replace or insert")
    except EditorError as error:
        return EditorResult(str(error), is_error=True)
    except OSError as error:
        return EditorResult(f"{error.strerror or error}: {tool_input.get('path')}", is_error=True)
