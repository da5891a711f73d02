"""Failpoints: named places where a process can be told to crash, for crash tests that must hit a window too
narrow to aim at from outside (between two appends, say).

`MANAGED_AGENTS_FAILPOINTS="brain.after_tool_use_logged=crash"` makes the process SIGKILL itself the first
time it reaches that point: a real crash, exactly there. With the variable unset (always, in production),
every `hit` is a lookup in an empty dict.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Mapping

log = logging.getLogger(__name__)

ENV = "MANAGED_AGENTS_FAILPOINTS"
_ACTIONS = frozenset({"crash"})


class Failpoints:
    """The failpoints armed in this process."""

    def __init__(self, armed: Mapping[str, str] | None = None) -> None:
        self._armed = dict(armed or {})
        for name, action in self._armed.items():
            if action not in _ACTIONS:
                raise ValueError(f"{ENV}: unknown action {action!r} for {name!r} (known: {', '.join(_ACTIONS)})")

    @classmethod
    def parse(cls, spec: str) -> Failpoints:
        """Parses `name=action,name=action` (the value of `MANAGED_AGENTS_FAILPOINTS`)."""
        armed = {}
        for item in filter(None, (part.strip() for part in spec.split(","))):
            name, sep, action = item.partition("=")
            if not sep:
                raise ValueError(f"{ENV}: {item!r} is not name=action")
            armed[name.strip()] = action.strip()
        return cls(armed)

    def hit(self, name: str) -> None:
        """Crashes the process here if `name` is armed."""
        if self._armed.get(name) == "crash":
            log.warning("failpoint %s: crashing the process (SIGKILL)", name)
            os.kill(os.getpid(), signal.SIGKILL)
