"""The README's configuration table against the code: every flag of every service is in it with the environment
variable its parser really reads, and every service variable the table names is one a parser reads."""

from __future__ import annotations

import argparse
import re

import pytest

from brain.config import BrainConfig
from hands.config import HandsConfig
from managed_agents.mesh.tls import TLS_DIR_ENV
from mcp_proxy.config import KEY_ENV, ProxyConfig
from session_store.config import StoreConfig
from tests.helpers import ROOT

PARSERS: dict[str, argparse.ArgumentParser] = {
    "SESSION_STORE": StoreConfig.parser({}),
    "HANDS": HandsConfig.parser({}),
    "BRAIN": BrainConfig.parser({}),
    "MCP_PROXY": ProxyConfig.parser({}),
}
# Variables read outside the parsers (`environ.get`), named in the table on purpose.
READ_DIRECTLY = {KEY_ENV, "MANAGED_AGENTS_MESH_SECRET_FILE", "MANAGED_AGENTS_MESH_SECRET", TLS_DIR_ENV}


def _table() -> str:
    readme = (ROOT / "README.md").read_text()
    return readme[readme.index("## Configuration") : readme.index("## What it guarantees")]


def _flags(parser: argparse.ArgumentParser) -> dict[str, str]:
    """flag -> the environment variable its help names (`add_flag` writes `[env: NAME; ...]`, switches
    `[env: NAME=1]`)."""
    found = {}
    for action in parser._actions:
        match = re.search(r"\[env: ([A-Z0-9_]+)[;=]", action.help or "")
        if match and action.option_strings:
            found[action.option_strings[-1]] = match.group(1)
    return found


def _documented(env: str, prefix: str, table: str) -> bool:
    """Named literally, as `<SERVICE>_REST` in an all-services row, or by a `PREFIX_*_REST` pattern."""
    rest = env.removeprefix(prefix + "_")
    patterns = re.findall(rf"`{prefix}_\*_([A-Z_]+)`", table)
    return (
        re.search(rf"`{env}[`=]", table) is not None
        or f"`<SERVICE>_{rest}`" in table
        or any(rest.endswith(p) for p in patterns)
    )


@pytest.mark.parametrize("prefix", sorted(PARSERS))
def test_every_flag_is_in_the_table_with_its_variable(prefix: str) -> None:
    table = _table()
    flags = _flags(PARSERS[prefix])
    assert flags, "the parser names no variables: has `add_flag` changed its help text?"
    for flag, env in flags.items():
        assert f"`{flag}`" in table, f"{flag} ({env}) is missing from the README's configuration table"
        assert env.startswith(prefix + "_"), f"{flag} reads {env}, which breaks the <SERVICE>_ naming"
        assert _documented(env, prefix, table), f"{flag} reads {env}, which the table does not name"


def test_every_service_variable_the_table_names_is_read() -> None:
    known = {env for parser in PARSERS.values() for env in _flags(parser).values()} | READ_DIRECTLY
    named = set(re.findall(r"`((?:SESSION_STORE|HANDS|BRAIN|MCP_PROXY)_[A-Z0-9_]+)", _table()))
    named = {n.rstrip("_") for n in named if "*" not in n}
    assert named - known == set(), "the README names variables no service reads"
