"""The contracts pass buf lint, stay compatible with the released v1 baseline, and the check has teeth."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.helpers import ROOT

BUF = Path(sys.executable).parent / "buf"
BASELINE = ROOT / "protos" / "baseline" / "managed_agents_v1.binpb"


def _buf(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    assert BUF.exists(), f"{BUF} is missing: `make test` installs it (the buf-bin package)"
    env = {**os.environ, "BUF_CACHE_DIR": str(ROOT / ".venv" / "buf-cache")}
    return subprocess.run([str(BUF), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_contracts_pass_buf_lint() -> None:
    result = _buf("lint")
    assert result.returncode == 0, result.stdout + result.stderr


def test_contracts_are_compatible_with_the_v1_baseline() -> None:
    result = _buf("breaking", "--against", str(BASELINE))
    assert result.returncode == 0, result.stdout + result.stderr


def test_renumbering_a_field_fails_the_breaking_check(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "protos", tmp_path / "protos", ignore=shutil.ignore_patterns("baseline"))
    shutil.copy(ROOT / "buf.yaml", tmp_path / "buf.yaml")
    events = tmp_path / "protos" / "managed_agents" / "v1" / "events.proto"
    text = events.read_text()
    assert "int64 seq = 3;" in text
    events.write_text(text.replace("int64 seq = 3;", "int64 seq = 9;"))
    result = _buf("breaking", "--against", str(BASELINE), cwd=tmp_path)
    assert result.returncode != 0
    assert '"seq"' in result.stdout + result.stderr, result.stdout + result.stderr
