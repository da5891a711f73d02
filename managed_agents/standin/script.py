"""Scripts the stand-in model plays: one step per assistant turn, chosen by how many assistant messages the
request already holds, so the same request always gets the same kind of answer (a brain that crashes and asks
again is answered consistently)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_FINAL_TEXT = "(The stand-in model's script is finished.)"


@dataclass(frozen=True, slots=True)
class Step:
    """One scripted assistant turn.

    `content` holds Messages API blocks (`{"type": "text", "text": ...}`, `{"type": "tool_use", "name": ...,
    "input": {...}}`; tool_use ids are generated). In text, `{last_tool_result}` is replaced by the text of
    the
    newest tool result in the request and `{last_user_message}` by the newest user text; in tool inputs,
    `{tool_use_id}` is replaced by the id given to that call. `fail` lists HTTP
    statuses (429, 500, 529, or 0 for a garbled 200) returned, in order, before the step succeeds; `garbage`
    makes every answer to this step a garbled 200.
    """

    content: tuple[Mapping[str, Any], ...]
    fail: tuple[int, ...] = ()
    garbage: bool = False
    latency_s: float | None = None


@dataclass(frozen=True, slots=True)
class Script:
    """Steps in order; once they run out, every answer is `final_text`."""

    steps: tuple[Step, ...]
    final_text: str = DEFAULT_FINAL_TEXT
    latency_s: float = 0.0
    name: str = "custom"
    steps_by_prompt: Mapping[str, tuple[Step, ...]] = field(default_factory=dict)

    def steps_for(self, first_user_text: str) -> tuple[Step, ...]:
        """The steps for a conversation, by its first user message (else the default steps)."""
        for marker, steps in self.steps_by_prompt.items():
            if marker in first_user_text:
                return steps
        return self.steps


def text(value: str) -> dict[str, Any]:
    """A text block."""
    return {"type": "text", "text": value}


def tool(name: str, **tool_input: Any) -> dict[str, Any]:
    """A tool_use block (its id is generated when played)."""
    return {"type": "tool_use", "name": name, "input": tool_input}


def step(
    *content: Mapping[str, Any],
    fail: Sequence[int] = (),
    garbage: bool = False,
    latency_s: float | None = None,
) -> Step:
    """A step from blocks."""
    return Step(content=tuple(content), fail=tuple(fail), garbage=garbage, latency_s=latency_s)


def from_json(data: Mapping[str, Any]) -> Script:
    """A script from its JSON form: `{"steps": [{"content": [...], "fail": [529]}], "final_text": ...,
    "latency_ms": 0}`."""

    def steps(raw: Sequence[Mapping[str, Any]]) -> tuple[Step, ...]:
        return tuple(
            Step(
                content=tuple(s.get("content", ())),
                fail=tuple(s.get("fail", ())),
                garbage=bool(s.get("garbage", False)),
                latency_s=s["latency_ms"] / 1000 if "latency_ms" in s else None,
            )
            for s in raw
        )

    return Script(
        steps=steps(data.get("steps", ())),
        final_text=str(data.get("final_text", DEFAULT_FINAL_TEXT)),
        latency_s=float(data.get("latency_ms", 0)) / 1000,
        name=str(data.get("name", "custom")),
        steps_by_prompt={k: steps(v) for k, v in data.get("steps_by_prompt", {}).items()},
    )


def load(path: Path) -> Script:
    """A script from a JSON file."""
    return from_json(json.loads(path.read_text()))


DEMO_PROGRAM = '''"""Fibonacci numbers."""


def fib(n: int) -> int:
    """The n-th Fibonacci number, fib(0) == 0."""
    if n < 0:
        raise ValueError("n must not be negative")
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a
'''

DEMO_TESTS = """import unittest

from fib import fib


class FibTest(unittest.TestCase):
    def test_first_numbers(self) -> None:
        self.assertEqual([fib(n) for n in range(8)], [0, 1, 1, 2, 3, 5, 8, 13])

    def test_negative_is_refused(self) -> None:
        with self.assertRaises(ValueError):
            fib(-1)


if __name__ == "__main__":
    unittest.main()
"""


def demo() -> Script:
    """What `make run` plays: write a small program in the sandbox, test it there, report."""
    return Script(
        name="demo",
        latency_s=0.3,
        steps=(
            step(
                text("I'll write a small Fibonacci module with tests in the sandbox, then run the tests."),
                tool(
                    "str_replace_based_edit_tool",
                    command="create",
                    path="/workspace/fib.py",
                    file_text=DEMO_PROGRAM,
                ),
            ),
            step(
                tool(
                    "str_replace_based_edit_tool",
                    command="create",
                    path="/workspace/test_fib.py",
                    file_text=DEMO_TESTS,
                )
            ),
            step(
                text("Both files are written; running the tests now."),
                tool("bash", command="cd /workspace && python3 -m unittest -v test_fib 2>&1"),
            ),
            step(
                text(
                    "The tests ran in the sandbox. Their output ends with:\n\n{last_tool_result}\n\n"
                    "fib.py and test_fib.py are in the workspace."
                )
            ),
        ),
    )


BUILT_IN = {"demo": demo}
