"""Requests a hostile or confused client sends to hands: a reused execution id, forged page tokens."""

from __future__ import annotations

import base64
import hashlib
import json

import pytest

from hands.client import HandsClient
from managed_agents.mesh.errors import IdempotencyKeyReused, InvalidArgument
from managed_agents.v1 import sandbox_pb2


async def test_an_execution_id_reused_for_another_call_is_refused_and_nothing_runs(hands: HandsClient) -> None:
    sandbox = (await hands.provision()).id
    first = await hands.execute(sandbox, execution_id="toolu_same", name="bash", input={"command": "echo one"})
    assert first.output == "one\n"
    for other in (
        {"name": "bash", "input": {"command": "touch /workspace/ran"}},
        {"name": "bash", "input": {"command": "echo one", "restart": False}},
        {"name": "str_replace_based_edit_tool", "input": {"command": "create", "path": "ran", "file_text": "x"}},
    ):
        with pytest.raises(IdempotencyKeyReused, match="different call"):
            await hands.execute(sandbox, execution_id="toolu_same", **other)  # type: ignore[arg-type]
    check = await hands.execute(sandbox, execution_id="toolu_check", name="bash", input={"command": "ls /workspace"})
    assert "ran" not in check.output
    # The same call again is a retry: the first result, not a second run.
    again = await hands.execute(sandbox, execution_id="toolu_same", name="bash", input={"command": "echo one"})
    assert again.replayed and again.output == "one\n"


def _token(position: object) -> str:
    # Tokens are not secret: their fingerprint of the request can be computed, so only the position is forged.
    fingerprint = hashlib.sha256(json.dumps({"s": 0}, sort_keys=True).encode()).hexdigest()[:16]
    raw = json.dumps({"p": position, "f": fingerprint}).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


@pytest.mark.parametrize(
    "token",
    [
        "not a token",
        "AAAA",
        _token({"o": "x"}),
        _token({"o": -5}),
        _token({"o": 10**30}),
        _token({"o": 1.5}),
        _token({"o": None}),
        _token([1, 2]),
        _token({}),
    ],
)
async def test_forged_page_tokens_are_refused(hands: HandsClient, token: str) -> None:
    with pytest.raises(InvalidArgument, match="page_token"):
        await hands.list_sandboxes(page_token=token)


@pytest.mark.parametrize("url", ["https://[::1/x.git", "https://[zz]/x.git", "http://user@host/x.git", "ftp://h/x"])
async def test_malformed_repository_urls_are_refused(hands: HandsClient, url: str) -> None:
    resources = sandbox_pb2.Resources(repositories=[sandbox_pb2.Repository(url=url, credential="github")])
    with pytest.raises(InvalidArgument, match="url"):
        await hands.provision(resources=resources, credential_token="t" * 40)
