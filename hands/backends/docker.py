"""The container backend: one container per sandbox through a Docker Engine API (Docker, or Podman's
compatible service), driven with the `docker` SDK.

The container's main process is the sandbox's shell, attached over the API (stdin in, stdout and stderr out as
multiplexed frames). Containers run with no network, every capability dropped, `no-new-privileges`, and the
sandbox's memory, process and CPU limits; /workspace and the control directory are bind mounts of the
sandbox's host directories, so the text editor and the execution records work as with bwrap. A shell that
exits leaves a stopped container, which the next call starts again (its filesystem intact); a container that
is killed or removed behind our back makes the sandbox lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
import threading
from typing import Any

import docker
import docker.errors

from hands.backend import CONTROL_MOUNT, WORKSPACE_MOUNT, Enforcement, LimitEvents, Limits, SandboxPaths
from managed_agents.mesh.errors import SandboxUnavailable

log = logging.getLogger(__name__)

LABEL = "managed-agents.sandbox"
# Any image works: bash when it has one, else its POSIX sh.
SHELL = ["/bin/sh", "-c", "command -v bash >/dev/null 2>&1 && exec bash --noprofile --norc; exec sh"]
ENVIRONMENT = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": WORKSPACE_MOUNT,
    "LANG": "C.UTF-8",
    "TERM": "dumb",
    "PAGER": "cat",
    "GIT_PAGER": "cat",
}
_HEADER = struct.Struct(">BxxxI")  # stream type, 3 bytes padding, payload length


class DockerShell:
    """`ShellProcess` over a container's attached main process."""

    def __init__(self, container: Any, attached: Any) -> None:
        self._container = container
        self._attached = attached  # the SDK's wrapper: it must be closed too, or it leaks its socket
        self._sock: socket.socket = getattr(attached, "_sock", attached)
        self._closed = False
        # Set by the reader once the attach stream ends: the shell (the container's main process) has stopped.
        self._stream_ended = threading.Event()
        self._exit: str | None = None
        # A reader thread of its own owns the socket's reads: a blocking recv cannot be cancelled, so a reader
        # that gave up (a timeout) would leave a recv behind that swallows the next output; and a shared pool
        # would be exhausted by one blocked recv per live sandbox.
        self._loop = asyncio.get_running_loop()
        self._output: asyncio.Queue[bytes] = asyncio.Queue()
        self._reader = threading.Thread(target=self._read_frames, name=f"docker-shell-{container.name}", daemon=True)
        self._reader.start()

    def _read_frames(self) -> None:
        buffer = b""
        try:
            while True:
                try:
                    chunk = self._sock.recv(65536)
                except OSError:
                    chunk = b""
                if not chunk:
                    return
                buffer += chunk
                while len(buffer) >= _HEADER.size:
                    _, length = _HEADER.unpack_from(buffer)
                    if len(buffer) < _HEADER.size + length:
                        break
                    payload = buffer[_HEADER.size : _HEADER.size + length]
                    buffer = buffer[_HEADER.size + length :]
                    if payload:
                        self._loop.call_soon_threadsafe(self._output.put_nowait, payload)
        finally:
            self._stream_ended.set()
            with contextlib.suppress(RuntimeError):  # the loop may be gone at interpreter exit
                self._loop.call_soon_threadsafe(self._output.put_nowait, b"")

    async def write(self, data: bytes) -> None:
        await asyncio.to_thread(self._sock.sendall, data)

    async def read(self) -> bytes:
        """The next output (stdout or stderr alike), or b'' once the stream has ended."""
        chunk = await self._output.get()
        if not chunk:
            self._output.put_nowait(b"")  # the end stays the end for every later reader
        return chunk

    async def _exec(self, script: str) -> None:
        with contextlib.suppress(docker.errors.APIError):
            await asyncio.to_thread(self._container.exec_run, ["/bin/sh", "-c", script])

    async def kill_children(self) -> None:
        # The shell is PID 1 of the container and traps INT; `kill -1` spares PID 1 and the killer itself.
        # Stop everything first, so that a fork bomb cannot refill what the kill frees.
        await self._exec("kill -INT 1; kill -STOP -1; kill -KILL -1; true")

    async def terminate(self) -> None:
        if not self._closed:
            self._closed = True
            with contextlib.suppress(docker.errors.APIError):
                await asyncio.to_thread(self._container.kill)
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)  # wakes the reader thread's blocked recv
            await asyncio.to_thread(self._reader.join, 5)
            with contextlib.suppress(OSError):
                self._attached.close()
                self._sock.close()

    def _state(self) -> dict[str, Any] | None:
        try:
            self._container.reload()
        except docker.errors.NotFound:
            return None
        state: dict[str, Any] = self._container.attrs.get("State", {})
        return state

    async def namespace_pid(self) -> int | None:
        state = await asyncio.to_thread(self._state)
        pid = int((state or {}).get("Pid") or 0)
        # A remote engine's pids are not this host's.
        return pid if pid and await asyncio.to_thread(os.path.exists, f"/proc/{pid}/ns/net") else None

    def exit_description(self) -> str | None:
        # Called on the event loop before every call: while the attach stream is open the shell runs, and that
        # is known without a round trip to the engine. Only a stream that ended is worth asking about.
        if self._exit is not None:
            return self._exit
        if not (self._stream_ended.is_set() or self._closed):
            return None
        self._exit = self._describe_exit()
        return self._exit

    def _describe_exit(self) -> str | None:
        state = self._state()
        if state is None:
            return "removed (its container no longer exists)"
        if state.get("Running"):
            return None
        if state.get("OOMKilled"):
            return "killed by signal SIGKILL (out of memory)"
        code = int(state.get("ExitCode", 0))
        return f"killed by signal {code - 128}" if code > 128 else f"exited with code {code}"

    async def wait_exit(self, timeout: float) -> str | None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            description = await asyncio.to_thread(self.exit_description)
            if description is not None or loop.time() > deadline:
                return description
            await asyncio.sleep(0.05)


class DockerBackend:
    """`SandboxBackend` on a Docker Engine API."""

    name = "docker"

    def __init__(self, client: Any, *, default_image: str) -> None:
        self._client = client
        self._default_image = default_image

    @classmethod
    def connect(cls, url: str, *, default_image: str) -> DockerBackend:
        """Connects to the engine at `url` (or DOCKER_HOST); refuses with a sentence if it cannot be reached."""
        try:
            client = docker.DockerClient(base_url=url) if url else docker.from_env()
            client.ping()
        except (docker.errors.DockerException, OSError) as error:
            raise RuntimeError(
                f"cannot reach a Docker Engine API at {url or 'DOCKER_HOST / the default socket'} ({error}); "
                "start Docker or `podman system service`, or use --backend bwrap"
            ) from None
        return cls(client, default_image=default_image)

    @property
    def enforcement(self) -> Enforcement:
        return Enforcement.CONTAINER

    def _find(self, sandbox_id: str) -> Any | None:
        try:
            return self._client.containers.get(sandbox_id)
        except docker.errors.NotFound:
            return None
        except docker.errors.APIError as error:
            if _no_such_container(error):
                return None
            raise

    async def create(self, sandbox_id: str, paths: SandboxPaths, limits: Limits) -> None:
        if await asyncio.to_thread(self._find, sandbox_id) is not None:
            return  # adopted after a restart of hands: the container is still there
        image = limits.image or self._default_image
        try:
            await asyncio.to_thread(
                self._client.containers.create,
                image,
                SHELL,
                name=sandbox_id,
                labels={LABEL: sandbox_id},
                stdin_open=True,
                tty=False,
                network_mode="none",
                cap_drop=["ALL"],
                security_opt=["no-new-privileges"],
                mem_limit=limits.memory_bytes,
                memswap_limit=limits.memory_bytes,
                pids_limit=limits.max_processes,
                nano_cpus=limits.cpu_millis * 1_000_000,
                working_dir=WORKSPACE_MOUNT,
                environment=ENVIRONMENT,
                hostname="sandbox",
                volumes={
                    str(paths.workspace): {"bind": WORKSPACE_MOUNT, "mode": "rw"},
                    str(paths.control): {"bind": CONTROL_MOUNT, "mode": "ro"},
                },
            )
        except docker.errors.ImageNotFound:
            raise SandboxUnavailable(f"the image {image!r} is not present on the container engine") from None
        except docker.errors.APIError as error:
            raise SandboxUnavailable(f"the container engine refused the sandbox: {error.explanation}") from None

    async def start_shell(self, sandbox_id: str, paths: SandboxPaths, limits: Limits) -> DockerShell:
        container = await asyncio.to_thread(self._find, sandbox_id)
        if container is None:
            raise SandboxUnavailable(f"the container of sandbox {sandbox_id} no longer exists")

        def attach_and_start() -> Any:
            # Attach before starting, so no output of the shell is missed.
            attached = container.attach_socket(params={"stdin": 1, "stdout": 1, "stderr": 1, "stream": 1})
            container.start()
            return attached

        try:
            attached = await asyncio.to_thread(attach_and_start)
        except docker.errors.APIError as error:
            raise SandboxUnavailable(f"the container engine could not start the sandbox: {error.explanation}") from None
        return DockerShell(container, attached)

    async def lost_reason(self, sandbox_id: str) -> str | None:
        container = await asyncio.to_thread(self._find, sandbox_id)
        if container is None:
            return "its container was removed from the container engine"
        if container.attrs.get("State", {}).get("OOMKilled"):
            return "it ran out of memory (the engine killed its shell at the sandbox's memory limit)"
        return None

    async def limit_events(self, sandbox_id: str) -> LimitEvents:
        return LimitEvents()

    async def destroy(self, sandbox_id: str, paths: SandboxPaths) -> None:
        container = await asyncio.to_thread(self._find, sandbox_id)
        if container is not None:
            try:
                await asyncio.to_thread(container.remove, force=True)
            except docker.errors.APIError as error:
                if not _no_such_container(error):
                    raise

    async def aclose(self) -> None:
        await asyncio.to_thread(self._client.close)


def _no_such_container(error: docker.errors.APIError) -> bool:
    """True if the engine says the container is gone. Docker answers 404; Podman, asked about a container it is
    removing at that moment, answers 500 "... does not exist in database: no such container"."""
    return isinstance(error, docker.errors.NotFound) or "no such container" in str(error.explanation or "").lower()
