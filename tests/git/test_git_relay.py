"""Git without the token in the sandbox: repositories named at Provision are cloned through the relay (hands ->
mcp_proxy -> a real git smart-HTTP server requiring the token); push and pull work from inside the sandbox;
the token is nowhere the sandbox can look; anything not granted is refused."""

from __future__ import annotations

import itertools
import os
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from brain.client import BrainClient
from hands import app as hands_app
from hands.client import HandsClient
from hands.config import HandsConfig
from managed_agents import events
from managed_agents.mesh.errors import FailedPrecondition, InvalidArgument
from managed_agents.standin.script import Script, step, text, tool
from managed_agents.v1 import hands_pb2, mcp_proxy_pb2, sandbox_pb2, session_pb2
from mcp_proxy import app as proxy_app
from mcp_proxy.client import McpProxyClient
from mcp_proxy.config import ProxyConfig
from mcp_proxy.vault import VaultKey
from session_store.client import SessionStoreClient
from tests.conftest import StartBrain, StartStandin
from tests.git.git_server import GitServer

SESSION = "git-session-1"


@dataclass
class GitMesh:
    git: GitServer
    proxy: McpProxyClient
    proxy_address: str
    hands: HandsClient
    hands_address: str
    token: str
    hands_config: HandsConfig
    hands_server: hands_app.HandsServer
    calls: itertools.count[int] = field(default_factory=itertools.count)

    def repository(self, name: str, **kwargs: str) -> sandbox_pb2.Resources:
        return sandbox_pb2.Resources(
            repositories=[sandbox_pb2.Repository(url=self.git.url(name), credential="repo-token", **kwargs)]
        )

    async def run(self, sandbox_id: str, command: str) -> hands_pb2.ExecuteResponse:
        return await self.hands.execute(
            sandbox_id, execution_id=f"x{next(self.calls)}", name="bash", input={"command": command}
        )


def _credential(name: str, port: int) -> mcp_proxy_pb2.Credential:
    return mcp_proxy_pb2.Credential(
        name=name, kind=mcp_proxy_pb2.CREDENTIAL_KIND_GIT_TOKEN, allowed_hosts=[f"127.0.0.1:{port}"]
    )


@pytest.fixture
async def mesh(tmp_path: Path) -> AsyncIterator[GitMesh]:
    git = await GitServer(tmp_path / "git").start()
    (tmp_path / "git").mkdir(exist_ok=True)
    git.create("app", files={"README.md": "hello from upstream\n"})
    proxy = await proxy_app.start(
        ProxyConfig(listen="127.0.0.1:0", data_dir=tmp_path / "proxy", git_allow_http=True), VaultKey.generate(), None
    )
    hands_config = HandsConfig(listen="127.0.0.1:0", work_root=tmp_path / "git-sandboxes", proxy=proxy.address)
    hands = await hands_app.start(hands_config, None)
    async with McpProxyClient.connect(proxy.address) as vault, HandsClient.connect(hands.address) as client:
        await vault.put_credential(_credential("repo-token", git.port), mcp_proxy_pb2.CredentialSecret(token=git.token))
        token = (await vault.mint_session_token(SESSION, ["repo-token"])).token
        yield GitMesh(git, vault, proxy.address, client, hands.address, token, hands_config, hands)
    await hands.aclose(grace=1.0)
    await proxy.aclose(grace=1.0)
    await git.stop()


async def test_clone_commit_push_and_pull_from_inside_the_sandbox(mesh: GitMesh, tmp_path: Path) -> None:
    sandbox = await mesh.hands.provision(
        resources=mesh.repository("app"), session_id=SESSION, credential_token=mesh.token
    )
    cloned = await mesh.run(sandbox.id, "cat app/README.md; git -C app remote get-url origin")
    assert cloned.output == "hello from upstream\nhttp://127.0.0.1:7480/0/app.git\n", cloned.output
    pushed = await mesh.run(
        sandbox.id,
        "cd /workspace/app && git config user.name agent && git config user.email agent@example.com && "
        "echo more >> README.md && git commit -qam from-sandbox && git push -q origin HEAD:main 2>&1 && echo pushed",
    )
    assert pushed.output.strip() == "pushed", pushed.output
    assert mesh.git.log("app")[0] == "from-sandbox", "the push reached the private server"
    # Someone else pushes upstream; the sandbox pulls it.
    outside = tmp_path / "outside"
    env = {**os.environ, "GIT_AUTHOR_NAME": "o", "GIT_AUTHOR_EMAIL": "o@x", "GIT_COMMITTER_NAME": "o"}
    env["GIT_COMMITTER_EMAIL"] = "o@x"
    subprocess.run(["git", "clone", "-q", str(mesh.git.root / "app.git"), str(outside)], check=True)
    subprocess.run(
        ["git", "-C", str(outside), "commit", "-q", "--allow-empty", "-m", "upstream-change"], env=env, check=True
    )
    subprocess.run(["git", "-C", str(outside), "push", "-q", "origin", "HEAD:main"], check=True)
    pulled = await mesh.run(sandbox.id, "cd /workspace/app && git pull -q --rebase 2>&1 && git log --format=%s -3")
    assert pulled.output.split() == ["upstream-change", "from-sandbox", "seed"], pulled.output
    statuses = {status for _, _, status in mesh.git.requests}
    assert statuses == {200}, "every request reached the server with the token"


async def test_the_token_is_nowhere_in_the_sandbox(mesh: GitMesh) -> None:
    sandbox = await mesh.hands.provision(
        resources=mesh.repository("app"), session_id=SESSION, credential_token=mesh.token
    )
    await mesh.run(sandbox.id, "git -C app fetch -q")  # a relayed request in flight does not leave one behind
    half, session_half = len(mesh.git.token) // 2, len(mesh.token) // 2
    search = (
        f'grep -rsl -F -e "$(printf %s {mesh.git.token[:half]} {mesh.git.token[half:]})" '
        f'-e "$(printf %s {mesh.token[:session_half]} {mesh.token[session_half:]})" / '
        "--exclude-dir=proc --exclude-dir=sys; echo searched"
    )
    found = await mesh.run(sandbox.id, search)
    assert found.output.strip() == "searched", found.output
    looked = await mesh.run(
        sandbox.id,
        "cat app/.git/config; env; for p in /proc/[0-9]*; do tr '\\0' ' ' < $p/cmdline; echo; "
        "tr '\\0' '\\n' < $p/environ; done 2>/dev/null",
    )
    for secret in (mesh.git.token, mesh.token, "x-access-token", "mst1."):
        assert secret not in looked.output
    assert "hands.forwarder" not in looked.output, "the forwarder is outside the sandbox's process namespace"


async def test_what_was_not_granted_is_refused(mesh: GitMesh, tmp_path: Path) -> None:
    sandbox = await mesh.hands.provision(
        resources=mesh.repository("app"), session_id=SESSION, credential_token=mesh.token
    )
    other_path = await mesh.run(sandbox.id, "git ls-remote http://127.0.0.1:7480/0/other.git 2>&1")
    assert other_path.is_error and "no such repository in this sandbox" in other_path.output
    other_index = await mesh.run(sandbox.id, "git ls-remote http://127.0.0.1:7480/3/app.git 2>&1")
    assert other_index.is_error and "no such repository in this sandbox" in other_index.output
    # A repository on a host the credential may not be sent to: the proxy refuses, the clone fails, no sandbox.
    elsewhere = await GitServer(tmp_path / "elsewhere").start()
    (tmp_path / "elsewhere").mkdir(exist_ok=True)
    try:
        elsewhere.create("secret", files={"x": "y"})
        resources = sandbox_pb2.Resources(
            repositories=[sandbox_pb2.Repository(url=elsewhere.url("secret"), credential="repo-token")]
        )
        with pytest.raises(FailedPrecondition, match=r"may not be sent to 127\.0\.0\.1"):
            await mesh.hands.provision(resources=resources, credential_token=mesh.token)
        assert elsewhere.requests == [], "nothing, not even a refused request, reached the other host"
    finally:
        await elsewhere.stop()
    # A token that does not grant the credential.
    await mesh.proxy.put_credential(_credential("other", mesh.git.port), mcp_proxy_pb2.CredentialSecret(token="t"))
    narrow = (await mesh.proxy.mint_session_token("git-session-2", ["other"])).token
    with pytest.raises(FailedPrecondition, match="does not grant credential 'repo-token'"):
        await mesh.hands.provision(resources=mesh.repository("app"), credential_token=narrow)
    # A revoked token: the sandbox's next fetch is refused with the reason.
    await mesh.proxy.revoke_session_token(SESSION)
    fetch = await mesh.run(sandbox.id, "git -C app fetch 2>&1")
    assert fetch.is_error and "revoked" in fetch.output, fetch.output


async def test_bad_repository_requests_are_invalid_and_make_nothing(mesh: GitMesh, hands: HandsClient) -> None:
    cases = [
        (mesh.repository("app"), "", "credential_token"),
        (sandbox_pb2.Resources(repositories=[sandbox_pb2.Repository(url="ftp://x/y.git", credential="c")]), "t", "url"),
        (mesh.repository("app", path="../outside"), "t", "path"),
        (mesh.repository("app", branch="a..b"), "t", "branch"),
    ]
    for resources, token, name in cases:
        with pytest.raises(InvalidArgument, match=name):
            await mesh.hands.provision(resources=resources, credential_token=token)
    assert (await mesh.hands.list_sandboxes()).sandboxes == []
    with pytest.raises(FailedPrecondition, match="no mcp_proxy"):
        await hands.provision(resources=mesh.repository("app"), credential_token=mesh.token)


async def test_a_session_pushes_to_its_private_repository_through_the_brain(
    mesh: GitMesh, store: SessionStoreClient, start_standin: StartStandin, start_brain: StartBrain
) -> None:
    command = (
        "cd /workspace/app && echo fix >> README.md && git -c user.name=claude -c user.email=c@example.com commit -qam "
        "from-claude && git push -q origin HEAD:main 2>&1 && echo pushed"
    )
    standin = await start_standin(Script(steps=(step(tool("bash", command=command)), step(text("pushed it")))))
    brain = await start_brain(standin, hands=mesh.hands_address, proxy=mesh.proxy_address)
    agent = session_pb2.AgentConfig(resources=mesh.repository("app"))
    session = await store.create_session(agent=agent)
    await store.emit(session.id, events.user_message("fix the readme and push"))
    async with BrainClient.connect(brain.address) as client:
        await client.wake(session.id)
    async for event in store.watch(session.id):
        if event.HasField("session_status_idle"):
            break
    _, log = await store.read_session(session.id)
    results = [e.agent_tool_result for e in log if e.HasField("agent_tool_result")]
    assert [events.plain_text(r.content).strip() for r in results] == ["pushed"]
    assert mesh.git.log("app")[0] == "from-claude"
    everything = b"".join(e.SerializeToString() for e in log)
    assert mesh.git.token.encode() not in everything and b"mst1." not in everything


async def test_git_survives_a_timeout_a_shell_restart_and_a_hands_restart(mesh: GitMesh) -> None:
    sandbox = await mesh.hands.provision(
        resources=mesh.repository("app"), session_id=SESSION, credential_token=mesh.token
    )
    fetch = "git -C /workspace/app fetch -q 2>&1 && echo fetched"
    timed_out = await mesh.hands.execute(
        sandbox.id, execution_id="slow", name="bash", input={"command": "sleep 30"}, timeout=1
    )
    assert timed_out.status == hands_pb2.EXECUTION_STATUS_TIMED_OUT
    assert (await mesh.run(sandbox.id, fetch)).output.strip() == "fetched", "the timeout spared the relay"
    await mesh.hands.execute(sandbox.id, execution_id="restart", name="bash", input={"restart": True})
    assert (await mesh.run(sandbox.id, fetch)).output.strip() == "fetched", "the new shell's network has it too"
    # A new hands server adopts the sandbox; its relay waits for the token the next tool call brings.
    await mesh.hands_server.aclose(grace=1)
    restarted = await hands_app.start(mesh.hands_config, None)
    try:
        async with HandsClient.connect(restarted.address) as hands:
            tokenless = await hands.execute(sandbox.id, execution_id="a1", name="bash", input={"command": fetch})
            assert tokenless.is_error and "no session token yet" in tokenless.output
            with_token = await hands.execute(
                sandbox.id, execution_id="a2", name="bash", input={"command": fetch}, credential_token=mesh.token
            )
            assert with_token.output.strip() == "fetched", with_token.output
    finally:
        await restarted.aclose(grace=1)
