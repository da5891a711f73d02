"""A private git server for the tests: `git http-backend` (git's own smart-HTTP CGI) behind a check of HTTP
Basic auth, on a loopback port. Only requests carrying the token get through; every request is recorded."""

from __future__ import annotations

import asyncio
import base64
import os
import secrets
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

HTTP_BACKEND = "/usr/lib/git-core/git-http-backend"


@dataclass
class GitServer:
    """Bare repositories under `root`, served at `http://127.0.0.1:<port>/<name>.git`."""

    root: Path
    token: str = field(default_factory=lambda: "ghp_" + secrets.token_urlsafe(24))
    port: int = 0
    requests: list[tuple[str, str, int]] = field(default_factory=list)  # (method, path, status)
    _runner: web.AppRunner | None = None

    def create(self, name: str, *, files: dict[str, str]) -> str:
        """A bare repository with one commit holding `files`; returns its URL."""
        work = self.root / f"{name}-seed"
        subprocess.run(["git", "init", "-q", "-b", "main", str(work)], check=True)
        for path, content in files.items():
            (work / path).write_text(content)
        env = {**os.environ, "GIT_AUTHOR_NAME": "seed", "GIT_AUTHOR_EMAIL": "seed@example.com"}
        env |= {"GIT_COMMITTER_NAME": "seed", "GIT_COMMITTER_EMAIL": "seed@example.com"}
        subprocess.run(["git", "-C", str(work), "add", "."], check=True)
        subprocess.run(["git", "-C", str(work), "commit", "-q", "-m", "seed"], check=True, env=env)
        bare = self.root / f"{name}.git"
        subprocess.run(["git", "clone", "-q", "--bare", str(work), str(bare)], check=True)
        subprocess.run(["git", "-C", str(bare), "config", "http.receivepack", "true"], check=True)
        return self.url(name)

    def url(self, name: str) -> str:
        """The URL of repository `name`."""
        return f"http://127.0.0.1:{self.port}/{name}.git"

    def log(self, name: str) -> list[str]:
        """Commit subjects of the bare repository's main branch, newest first."""
        result = subprocess.run(
            ["git", "-C", str(self.root / f"{name}.git"), "log", "--format=%s", "main"],
            capture_output=True,
            text=True,
            check=True,
        )
        return result.stdout.split()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        sent = request.headers.get("Authorization", "")
        expected = "Basic " + base64.b64encode(f"x-access-token:{self.token}".encode()).decode()
        if sent != expected:
            self.requests.append((request.method, request.path, 401))
            return web.Response(status=401, headers={"WWW-Authenticate": 'Basic realm="git"'}, text="no\n")
        body = await request.read()
        env = {
            "GIT_PROJECT_ROOT": str(self.root),
            "GIT_HTTP_EXPORT_ALL": "1",
            "PATH_INFO": request.path,
            "REQUEST_METHOD": request.method,
            "QUERY_STRING": request.query_string,
            "CONTENT_TYPE": request.headers.get("Content-Type", ""),
            "CONTENT_LENGTH": str(len(body)),
            "REMOTE_USER": "x-access-token",
            "REMOTE_ADDR": "127.0.0.1",
            "PATH": os.environ["PATH"],
        }
        if "Content-Encoding" in request.headers:
            env["HTTP_CONTENT_ENCODING"] = request.headers["Content-Encoding"]
        if "Git-Protocol" in request.headers:
            env["GIT_PROTOCOL"] = request.headers["Git-Protocol"]
        process = await asyncio.create_subprocess_exec(
            HTTP_BACKEND,
            env=env,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, _ = await process.communicate(body)
        head, _, payload = out.partition(b"\r\n\r\n")
        status, headers = 200, {}
        for line in head.decode().split("\r\n"):
            name, _, value = line.partition(":")
            if name.lower() == "status":
                status = int(value.split()[0])
            elif name:
                headers[name] = value.strip()
        self.requests.append((request.method, request.path, status))
        return web.Response(status=status, headers=headers, body=payload)

    async def start(self) -> GitServer:
        """Serves on a free loopback port."""
        app = web.Application(client_max_size=256 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        """Stops serving."""
        if self._runner is not None:
            await self._runner.cleanup()
