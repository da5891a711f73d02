"""Git for sandboxes without a token in them: each sandbox with repositories gets a relay.

Inside the sandbox, `git` talks plain HTTP to `http://127.0.0.1:7480/<n>/<name>.git`, on the sandbox's own
loopback (it has no other network). A forwarder (`hands.forwarder`), started by hands in the sandbox's
network namespace only, pipes that port to a Unix socket of this server, outside the sandbox. Here each
request is mapped to the n-th repository granted at `Provision` and sent through the mcp_proxy's `RelayGit`
with the session's token; the proxy adds the git credential from its vault. So the sandbox holds neither the
git token nor the session token, in files, environment or processes, and can reach only its own
repositories: any other path is refused here, any other host by the proxy.
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

from aiohttp import web

from hands.doors import GIT_PORT
from managed_agents.mesh.errors import FailedPrecondition, InvalidArgument, MeshError
from managed_agents.v1 import mcp_proxy_pb2, sandbox_pb2
from mcp_proxy.client import McpProxyClient

log = logging.getLogger(__name__)

MAX_REPOSITORIES = 16
MAX_TOKEN_CHARS = 4096
_NAME = re.compile(r"[a-z0-9_-]{1,64}")
_BRANCH = re.compile(r"[A-Za-z0-9._/-]{1,200}")
_SUFFIX = re.compile(r"(info/refs|git-upload-pack|git-receive-pack)")
_PASSED_HEADERS = ("Content-Type", "Accept", "Accept-Encoding", "Content-Encoding", "Git-Protocol", "User-Agent")


@dataclass(frozen=True, slots=True)
class Repository:
    """A repository granted to a sandbox (no secret: the credential is a vault name)."""

    url: str
    credential: str
    path: str
    branch: str = ""

    def remote(self, index: int) -> str:
        """The URL the sandbox's git uses: the relay's port on the sandbox's loopback."""
        return f"http://127.0.0.1:{GIT_PORT}/{index}/{PurePosixPath(self.path).name}.git"


def repositories_from(resources: sandbox_pb2.Resources) -> list[Repository]:
    """The checked repositories of a `Provision`; raises `InvalidArgument` naming the field."""
    if len(resources.repositories) > MAX_REPOSITORIES:
        raise InvalidArgument.field("resources.repositories", f"at most {MAX_REPOSITORIES} repositories")
    repositories, paths = [], set()
    for index, given in enumerate(resources.repositories):
        field = f"resources.repositories[{index}]"
        try:
            parts = urlsplit(given.url)
            hostname, username, password = parts.hostname, parts.username, parts.password
        except ValueError:  # a malformed authority (`https://[::1/x`) is the caller's, not a server fault
            hostname = username = password = None
            parts = urlsplit("")
        if parts.scheme not in ("https", "http") or not hostname or username or password or len(given.url) > 2048:
            raise InvalidArgument.field(f"{field}.url", "must be an https:// URL of at most 2048 characters, no user")
        if not _NAME.fullmatch(given.credential):
            raise InvalidArgument.field(f"{field}.credential", "must name a git credential of the vault ([a-z0-9_-])")
        if given.branch and (not _BRANCH.fullmatch(given.branch) or ".." in given.branch):
            raise InvalidArgument.field(f"{field}.branch", "must be a branch or tag name")
        name = PurePosixPath(parts.path).name.removesuffix(".git")
        path = PurePosixPath(given.path or name)
        if not name or path.is_absolute() or ".." in path.parts or str(path) in ("", ".") or len(str(path)) > 255:
            raise InvalidArgument.field(f"{field}.path", "must be a relative directory inside the workspace")
        if str(path) in paths:
            raise InvalidArgument.field(f"{field}.path", f"{path} is used by two repositories")
        paths.add(str(path))
        repositories.append(Repository(given.url.rstrip("/"), given.credential, str(path), given.branch))
    return repositories


def check_token(token: str) -> str:
    """A session token as given in a request (opaque here; the proxy verifies it)."""
    if len(token) > MAX_TOKEN_CHARS or not token.isprintable():
        raise InvalidArgument.field("credential_token", f"must be at most {MAX_TOKEN_CHARS} printable characters")
    return token


class SandboxRelay:
    """The git relay of one sandbox: a Unix socket server here, which the sandbox's door on `GIT_PORT` leads to."""

    def __init__(self, proxy: McpProxyClient, repositories: Sequence[Repository], socket_path: Path) -> None:
        self.repositories = list(repositories)
        self.socket = socket_path
        self._proxy = proxy
        self._token = ""
        self._runner: web.AppRunner | None = None

    def update_token(self, token: str) -> None:
        """Uses `token` for the sandbox's requests from now on (a refreshed one, or after a restart)."""
        if token:
            self._token = token

    async def start(self) -> None:
        """Serves the Unix socket."""
        app = web.Application(client_max_size=0)
        app.router.add_route("*", "/{index:[0-9]+}/{repo}/{suffix:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        self.socket.unlink(missing_ok=True)
        await web.UnixSite(self._runner, str(self.socket)).start()

    async def aclose(self) -> None:
        """Stops the socket server."""
        if self._runner is not None:
            await self._runner.cleanup()
        self.socket.unlink(missing_ok=True)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        index = int(request.match_info["index"])
        suffix = request.match_info["suffix"]
        if index >= len(self.repositories) or not _SUFFIX.fullmatch(suffix):
            return web.Response(status=404, text="no such repository in this sandbox\n")
        repository = self.repositories[index]
        if request.match_info["repo"] != f"{PurePosixPath(repository.path).name}.git":
            return web.Response(status=404, text="no such repository in this sandbox\n")
        if not self._token:
            return web.Response(
                status=503,
                text="the git relay has no session token yet (the hands server restarted); retry after the next "
                "tool call\n",
            )
        url = f"{repository.url}/{suffix}" + (f"?{request.query_string}" if request.query_string else "")
        head = mcp_proxy_pb2.RelayGitRequestHead(
            session_token=self._token,
            credential=repository.credential,
            url=url,
            method=request.method,
            headers=[
                mcp_proxy_pb2.HttpHeader(name=k, value=request.headers[k])
                for k in _PASSED_HEADERS
                if k in request.headers
            ],
        )

        async def body() -> AsyncIterator[bytes]:
            async for chunk in request.content.iter_chunked(256 * 1024):
                yield chunk

        try:
            answer, chunks = await self._proxy.relay_git(head, body())
        except MeshError as error:
            # git prints the body of a refused request: the reason reaches the model's terminal.
            status = 403 if error.code.name in ("PERMISSION_DENIED", "UNAUTHENTICATED") else 502
            log.warning("git relay refused %s %s: %s", request.method, url, error)
            return web.Response(status=status, text=f"refused by the git relay: {error}\n")
        response = web.StreamResponse(status=answer.status)
        for header in answer.headers:
            response.headers[header.name] = header.value
        await response.prepare(request)
        async for chunk in chunks:
            await response.write(chunk)
        await response.write_eof()
        return response


class GitRelays:
    """Makes the relays of this server's sandboxes; all of them reach one mcp_proxy."""

    def __init__(self, proxy: McpProxyClient | None) -> None:
        self._proxy = proxy

    async def open(self, repositories: Sequence[Repository], socket_path: Path) -> SandboxRelay:
        """A started relay for a sandbox's repositories; refuses if this server reaches no proxy."""
        if self._proxy is None:
            raise FailedPrecondition(
                "this hands server has no mcp_proxy (--proxy is empty), so it cannot clone repositories"
            )
        relay = SandboxRelay(self._proxy, repositories, socket_path)
        await relay.start()
        return relay
