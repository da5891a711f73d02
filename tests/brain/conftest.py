"""Brain tests use the stand-in and brain fixtures of tests/conftest.py; these names type them."""

from __future__ import annotations

from tests.conftest import StartBrain, StartStandin

__all__ = ["StartBrain", "StartStandin"]
