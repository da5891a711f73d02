"""`bash`: Anthropic's bash tool over the sandbox's persistent shell (`command`, or `restart: true`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

NAME = "bash"
ANTHROPIC_TYPE = "bash_20250124"
DESCRIPTION = (
    "Run a command in a persistent bash shell in the sandbox: the working directory, environment variables "
    "and background jobs carry over between calls. stdout and stderr are returned interleaved; output past 30,000 "
    "characters is cut in the middle. restart: true starts a fresh shell. There is no network."
)
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "command": {"type": "string", "description": "the command to run"},
        "restart": {"type": "boolean", "description": "start a fresh shell instead of running a command"},
    },
}


def parse(tool_input: Mapping[str, Any]) -> tuple[str, bool]:
    """(command, restart) from the tool input; raises ValueError with a sentence the model sees."""
    restart = tool_input.get("restart", False)
    if not isinstance(restart, bool):
        raise ValueError("restart must be true or false")
    command = tool_input.get("command")
    if restart:
        return "", True
    if not isinstance(command, str) or not command.strip():
        raise ValueError("command is required (a non-empty string), or restart: true")
    return command, False
