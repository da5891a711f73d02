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
import io
import json
import logging
import os
import posixpath
import socket
import struct
import tarfile
import threading
from pathlib import Path
from typing import Any

import docker
import docker.errors

from hands import seccomp
from hands.backend import (
    CONTROL_MOUNT,
    SHELL_BINARY,
    WORKSPACE_MOUNT,
    Enforcement,
    LimitEvents,
    Limits,
    Posture,
    SandboxPaths,
)
from hands.identities import Identity
from hands.shell import DRIVER, STATE_MOUNT
from managed_agents.mesh.errors import SandboxUnavailable

log = logging.getLogger(__name__)

LABEL = "managed-agents.sandbox"
# Any image works: bash when it has one, else its POSIX sh.
ENVIRONMENT = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": WORKSPACE_MOUNT,
    "LANG": "C.UTF-8",
    "TERM": "dumb",
    "PAGER": "cat",
    "GIT_PAGER": "cat",
}
_HEADER = struct.Struct(">BxxxI")  # stream type, 3 bytes padding, payload length
_MAX_FRAME = 16 << 20  # engines frame a container's output in small pieces; anything this large is not one
_OUTSTANDING_BYTES = 1 << 20
_MAX_INTERPRETER = 64 << 20  # output read from the engine that hands has not consumed yet
_STATE_TMPFS = "size=16m,mode=1777"
_SHELLS = ("/bin/bash", "/usr/bin/bash", "/bin/sh", "/usr/bin/sh")


class _Budget:
    """Bytes read from the engine but not yet taken by hands: the reader thread waits while `limit` are
    outstanding, so a flooding sandbox is held back by its own pipe instead of filling hands' memory."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._outstanding = 0
        self._changed = threading.Condition()
        self._closed = False

    def take(self, size: int) -> bool:
        """Waits for room for `size` more bytes; False once closed."""
        with self._changed:
            while self._outstanding >= self._limit and not self._closed:
                self._changed.wait()
            self._outstanding += size
            return not self._closed

    def give_back(self, size: int) -> None:
        with self._changed:
            self._outstanding -= size
            self._changed.notify_all()

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify_all()


class DockerShell:
    """`ShellProcess` over a container's attached main process (the shell's driver): its stdout is the sandbox's
    output, its stderr the driver's status channel (`hands.shell`)."""

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
        self._status: asyncio.Queue[bytes] = asyncio.Queue()
        self._budget = _Budget(_OUTSTANDING_BYTES)
        self._reader = threading.Thread(target=self._read_frames, name=f"docker-shell-{container.name}", daemon=True)
        self._reader.start()

    def _read_frames(self) -> None:
        buffer = bytearray()
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
                    stream, length = _HEADER.unpack_from(buffer)
                    if length > _MAX_FRAME:
                        log.warning(
                            "%s: the engine sent a frame of %d bytes; closing the shell", self._container.name, length
                        )
                        return
                    if len(buffer) < _HEADER.size + length:
                        break
                    payload = bytes(buffer[_HEADER.size : _HEADER.size + length])
                    del buffer[: _HEADER.size + length]
                    if not payload:
                        continue
                    if not self._budget.take(len(payload)):
                        return
                    queue = self._status if stream == 2 else self._output
                    self._loop.call_soon_threadsafe(queue.put_nowait, payload)
        finally:
            self._stream_ended.set()
            with contextlib.suppress(RuntimeError):  # the loop may be gone at interpreter exit
                self._loop.call_soon_threadsafe(self._output.put_nowait, b"")
                self._loop.call_soon_threadsafe(self._status.put_nowait, b"")

    async def write(self, data: bytes) -> None:
        await asyncio.to_thread(self._sock.sendall, data)

    async def _take(self, queue: asyncio.Queue[bytes]) -> bytes:
        chunk = await queue.get()
        if not chunk:
            queue.put_nowait(b"")  # the end stays the end for every later reader
        else:
            self._budget.give_back(len(chunk))
        return chunk

    async def read(self) -> bytes:
        """The next output, or b'' once the stream has ended."""
        return await self._take(self._output)

    async def read_status(self) -> bytes:
        """The next bytes of the driver's status channel, or b'' once the stream has ended."""
        return await self._take(self._status)

    async def _exec(self, script: str) -> None:
        with contextlib.suppress(docker.errors.APIError):
            await asyncio.to_thread(self._container.exec_run, ["/bin/sh", "-c", script])

    async def kill_children(self) -> None:
        # The shell's driver is PID 1 of the container; `kill -1` spares PID 1 and the killer itself. Stop
        # everything first, so that a fork bomb cannot refill what the kill frees.
        await self._exec("kill -STOP -1; kill -KILL -1; true")

    async def terminate(self) -> None:
        if not self._closed:
            self._closed = True
            self._budget.close()
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

    def __init__(self, client: Any, *, default_image: str, seccomp_option: str) -> None:
        self._client = client
        self._default_image = default_image
        self._seccomp_option = seccomp_option

    @classmethod
    def connect(cls, url: str, *, default_image: str, work_root: Path) -> DockerBackend:
        """Connects to the engine at `url` (or DOCKER_HOST); refuses with a sentence if it cannot be reached."""
        try:
            client = docker.DockerClient(base_url=url) if url else docker.from_env()
            client.ping()
            components = client.version().get("Components") or []
        except (docker.errors.DockerException, OSError) as error:
            raise RuntimeError(
                f"cannot reach a Docker Engine API at {url or 'DOCKER_HOST / the default socket'} ({error}); "
                "start Docker or `podman system service`, or use --backend bwrap"
            ) from None
        # The sandbox's own syscall filter, as the engine takes a profile: Docker the JSON itself, Podman's
        # compatible API a path on its host (which is this one: the sandboxes' disks are bind mounts already).
        profile = json.dumps(seccomp.oci_profile())
        if any("podman" in str(c.get("Name", "")).lower() for c in components):
            work_root.mkdir(parents=True, exist_ok=True)
            path = work_root / ".seccomp.json"
            path.write_text(profile)
            profile = str(path)
        return cls(client, default_image=default_image, seccomp_option=f"seccomp={profile}")

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

    @property
    def posture(self) -> Posture:
        return Posture(
            user_namespace=False,
            own_identity=True,
            seccomp=seccomp.SUMMARY,
            read_only_system=True,
        )

    def needs_identity(self) -> bool:
        return True

    async def create(self, sandbox_id: str, paths: SandboxPaths, limits: Limits, identity: Identity | None) -> None:
        assert identity is not None, "docker sandboxes always have an identity"
        container = await asyncio.to_thread(self._find, sandbox_id)
        if container is None:
            container = await self._create_container(sandbox_id, paths, limits, identity)
        if not (paths.control / SHELL_BINARY).exists():
            await asyncio.to_thread(_copy_interpreter, container, paths.control)

    async def _create_container(self, sandbox_id: str, paths: SandboxPaths, limits: Limits, identity: Identity) -> Any:
        image = limits.image or self._default_image
        try:
            return await asyncio.to_thread(
                self._client.containers.create,
                image,
                [f"{CONTROL_MOUNT}/{SHELL_BINARY}", f"{CONTROL_MOUNT}/{DRIVER}", "2"],
                name=sandbox_id,
                labels={LABEL: sandbox_id},
                stdin_open=True,
                tty=False,
                # A uid of its own, not root; nothing of the image is writable, no capability, no privilege to
                # gain, the engine's default syscall filter, no network.
                user=f"{identity.uid}:{identity.gid}",
                read_only=True,
                network_mode="none",
                cap_drop=["ALL"],
                security_opt=["no-new-privileges", self._seccomp_option],
                mem_limit=limits.memory_bytes,
                memswap_limit=limits.memory_bytes,
                pids_limit=limits.max_processes,
                nano_cpus=limits.cpu_millis * 1_000_000,
                working_dir=WORKSPACE_MOUNT,
                environment=ENVIRONMENT,
                hostname="sandbox",
                tmpfs={STATE_MOUNT: _STATE_TMPFS},
                volumes={
                    str(paths.workspace): {"bind": WORKSPACE_MOUNT, "mode": "rw"},
                    str(paths.tmp): {"bind": "/tmp", "mode": "rw"},
                    str(paths.control): {"bind": CONTROL_MOUNT, "mode": "ro"},
                },
            )
        except docker.errors.ImageNotFound:
            raise SandboxUnavailable(f"the image {image!r} is not present on the container engine") from None
        except docker.errors.APIError as error:
            raise SandboxUnavailable(f"the container engine refused the sandbox: {error.explanation}") from None

    async def start_shell(
        self, sandbox_id: str, paths: SandboxPaths, limits: Limits, identity: Identity | None
    ) -> DockerShell:
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


def _copy_interpreter(container: Any, control: Path) -> None:
    """Copies the image's bash (else its sh) into the control directory, executable but not readable by the
    sandbox's uid: run from there, the driver is non-dumpable (see `hands.shell`). Blocking."""
    for path in _SHELLS:
        for _ in range(8):  # a chain of symlinks, /bin/sh -> dash or busybox
            try:
                stream, _stat = container.get_archive(path)
            except docker.errors.NotFound:
                break
            except docker.errors.APIError as error:
                if _no_such_container(error) or "no such file" in str(error.explanation or "").lower():
                    break
                raise SandboxUnavailable(f"cannot read the image's shell {path}: {error.explanation}") from None
            with tarfile.open(fileobj=io.BytesIO(_bounded(stream, path))) as tar:
                member = tar.next()
                if member is None:
                    break
                if member.issym() or member.islnk():
                    path = posixpath.normpath(posixpath.join(posixpath.dirname(path), member.linkname))
                    continue
                data = tar.extractfile(member)
                if data is None:
                    break
                target = control / SHELL_BINARY
                target.write_bytes(data.read())
                os.chmod(target, 0o111)
                return
    raise SandboxUnavailable("the image has no /bin/bash nor /bin/sh for the sandbox's shell")


def _bounded(stream: Any, path: str) -> bytes:
    """An archive from the engine, at most `_MAX_INTERPRETER` bytes: the image is the caller's choice, and its
    shell could be any size."""
    data = bytearray()
    for chunk in stream:
        data += chunk
        if len(data) > _MAX_INTERPRETER:
            raise SandboxUnavailable(f"the image's {path} is larger than {_MAX_INTERPRETER >> 20} MiB; not a shell")
    return bytes(data)


def _no_such_container(error: docker.errors.APIError) -> bool:
    """True if the engine says the container is gone. Docker answers 404; Podman, asked about a container it is
    removing at that moment, answers 500 "... does not exist in database: no such container"."""
    return isinstance(error, docker.errors.NotFound) or "no such container" in str(error.explanation or "").lower()
