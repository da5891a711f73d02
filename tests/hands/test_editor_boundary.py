"""The text editor against a hostile sandbox, on the real filesystem: code in the sandbox swaps directories for
symlinks while hands works, plants links, FIFOs, sockets and devices, fills directories, and the editor, running
as root on the host, must never read or write anything outside the workspace, never hang, never answer more than
its cap, and act with the sandbox's own permissions when given its identity."""

from __future__ import annotations

import asyncio
import ctypes
import errno
import os
import platform
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from hands.tools import files, text_editor
from hands.tools.files import Resolution
from hands.tools.text_editor import MAX_FILE_BYTES, MAX_RESULT_BYTES, EditorResult

UID, GID = 4242, 4343  # the sandbox's host identity: no user or group of this machine
SECRET = "SECRET-of-the-host"
ALL_COMMANDS = ("view", "create", "str_replace", "insert")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="plays hands as root on the host")


@pytest.fixture(params=["openat2", "walk"])
def resolution(request: pytest.FixtureRequest) -> Resolution:
    """Both ways paths are resolved: openat2(2), and the per-component walk for kernels without it."""
    value: Resolution = request.param
    return value


@pytest.fixture
def host(tmp_path: Path) -> Path:
    """A host directory outside the workspace: a secret to read and a target to write."""
    directory = tmp_path / "host"
    directory.mkdir()
    (directory / "secret.txt").write_text(f"{SECRET}\nline\n")
    (directory / "target.txt").write_text("host target\nline\n")
    (directory / f"{SECRET}-only-on-the-host.txt").write_text("x")
    return directory


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    directory = tmp_path / "workspace"
    directory.mkdir()
    (directory / "real.txt").write_text("inside\nline\n")
    return directory


def edit(
    workspace: Path,
    *,
    resolution: Resolution = "auto",
    uid: int | None = None,
    gid: int | None = None,
    within: float = 5.0,
    **tool_input: Any,
) -> EditorResult:
    """One editor call that fails the test instead of hanging it."""
    answers: list[EditorResult] = []

    def call() -> None:
        answers.append(text_editor.run(tool_input, workspace, uid=uid, gid=gid, resolution=resolution))

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(within)
    assert answers, f"the editor did not answer {tool_input} within {within} s"
    return answers[0]


def command_input(command: str, path: str) -> dict[str, Any]:
    """A well-formed call of `command` on `path`."""
    calls: dict[str, dict[str, Any]] = {
        "view": {"command": "view", "path": path},
        "create": {"command": "create", "path": path, "file_text": "pwned\n"},
        "str_replace": {"command": "str_replace", "path": path, "old_str": "line", "new_str": "pwned"},
        "insert": {"command": "insert", "path": path, "insert_line": 0, "insert_text": "pwned"},
    }
    return calls[command]


def snapshot(directory: Path) -> dict[str, tuple[bytes, int, int, int]]:
    """Every entry under `directory` (itself included): content, mode, inode and modification time."""
    state: dict[str, tuple[bytes, int, int, int]] = {}
    for path in [directory, *sorted(directory.rglob("*"))]:
        status = path.lstat()
        content = path.read_bytes() if stat.S_ISREG(status.st_mode) else b""
        state[str(path)] = (content, status.st_mode, status.st_ino, status.st_mtime_ns)
    return state


def fs_ids() -> tuple[int, int]:
    """The calling thread's fsuid and fsgid (setfs*id(-1) changes nothing and answers the current one)."""
    libc = ctypes.CDLL(None)
    return libc.setfsuid(-1), libc.setfsgid(-1)


# The race ------------------------------------------------------------------------------------------------------

# Swaps two names for ever, dwelling a few microseconds (at random) between swaps: swapping flat out, most of
# hands' lookups would meet a swap in progress; dwelling, a check and the use after it see different trees. (With
# this exchanger the editor as it was, realpath then open by name, leaked the secret about once in ten calls.)
EXCHANGER = r"""
import ctypes, platform, random, sys
libc = ctypes.CDLL(None, use_errno=True)
renameat2 = {"x86_64": 316, "aarch64": 276}[platform.machine()]
first, second = (name.encode() for name in sys.argv[1:3])
dwell = random.Random(0)
print("ready", flush=True)
while True:
    libc.syscall(renameat2, -100, first, -100, second, 2)  # AT_FDCWD, RENAME_EXCHANGE
    for _ in range(dwell.randrange(200)):
        pass
"""


@pytest.fixture
def swapping(workspace: Path, host: Path) -> Iterator[Path]:
    """`workspace/d`, a real directory that another process keeps swapping with a symlink to `host`."""
    real = workspace / "d"
    real.mkdir()
    (real / "secret.txt").write_text("inside\nline\n")
    (real / "target.txt").write_text("inside target\nline\n")
    (workspace / "s").symlink_to(host)
    command = [sys.executable, "-c", EXCHANGER, str(real), str(workspace / "s")]
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as exchanger:
        try:
            assert exchanger.stdout is not None and exchanger.stdout.readline() == "ready\n"
            yield real
        finally:
            exchanger.kill()


def test_a_directory_swapped_for_a_symlink_never_leads_outside(
    swapping: Path, workspace: Path, host: Path, resolution: Resolution
) -> None:
    before = snapshot(host)
    calls: list[dict[str, Any]] = [
        {"command": "view", "path": "d/secret.txt"},
        {"command": "view", "path": "/workspace/d"},
        {"command": "create", "path": "d/target.txt", "file_text": "pwned\nline\n"},
        {"command": "str_replace", "path": "d/target.txt", "old_str": "line", "new_str": "line"},
        {"command": "insert", "path": "/workspace/d/target.txt", "insert_line": 0, "insert_text": "pwned"},
        {"command": "create", "path": "d/new/made.txt", "file_text": "pwned"},
    ]
    outcomes = {"done": 0, "refused": 0}
    messages: set[str] = set()
    for attempt in range(1_000):
        result = edit(workspace, resolution=resolution, **calls[attempt % len(calls)])
        assert SECRET not in result.output
        assert "host target" not in result.output
        if result.is_error:
            messages.add(result.output)
        outcomes["refused" if result.is_error else "done"] += 1
    assert snapshot(host) == before, "nothing outside the workspace was created or changed"
    # Most calls look up `d` more than once (a write: to read, then to replace), so fewer succeed than fail.
    assert outcomes["done"] >= 10 and outcomes["refused"] >= 10, f"the race was not run: {outcomes}"
    assert any("is a symbolic link; the editor does not follow links" in message for message in messages)


# Links, `..` and absolute paths --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("link", "target", "path"),
    [
        ("link", "host/secret.txt", "link"),  # the last component, to a file outside
        ("link", "workspace/real.txt", "/workspace/link"),  # the last component, to a file inside: not followed
        ("dangling", "host/new.txt", "dangling"),  # create through it would make a file outside
        ("linkdir", "host", "linkdir/secret.txt"),  # a middle component
        ("a/b", "host", "/workspace/a/b/secret.txt"),  # a deeper middle component
        ("linkdir", "host", "linkdir/new/made.txt"),  # create would make directories outside
        ("root", "/proc/self/root", "root/etc/passwd"),  # to a magic link
        ("fd", "/proc/self/cwd", "fd"),
    ],
)
@pytest.mark.parametrize("command", ALL_COMMANDS)
def test_symlinks_are_never_followed(
    tmp_path: Path,
    workspace: Path,
    host: Path,
    resolution: Resolution,
    command: str,
    link: str,
    target: str,
    path: str,
) -> None:
    (workspace / "a").mkdir()
    (workspace / link).symlink_to(target if target.startswith("/") else tmp_path / target)
    before = snapshot(host)
    result = edit(workspace, resolution=resolution, **command_input(command, path))
    assert result.is_error
    assert "is a symbolic link; the editor does not follow links" in result.output
    assert f"/workspace/{link} " in result.output, "the sentence names the link"
    assert SECRET not in result.output and "root:" not in result.output
    assert snapshot(host) == before


@pytest.mark.parametrize(
    "path",
    [
        "../host/secret.txt",
        "/workspace/../host/secret.txt",
        "a/../../host/secret.txt",
        "/workspace/a/../../host/target.txt",
        "..",
        "/etc/passwd",
        "/proc/self/root/etc/passwd",
        "/workspacex/secret.txt",
        f"{'x/' * 100}{'../' * 102}host/secret.txt",
    ],
)
@pytest.mark.parametrize("command", ALL_COMMANDS)
def test_paths_that_leave_the_workspace_are_refused(
    workspace: Path, host: Path, command: str, path: str, resolution: Resolution
) -> None:
    before = snapshot(host)
    result = edit(workspace, resolution=resolution, **command_input(command, path))
    assert result.is_error and "outside the workspace" in result.output
    assert SECRET not in result.output and snapshot(host) == before


def test_dot_dot_that_stays_inside_means_the_file_inside(workspace: Path, resolution: Resolution) -> None:
    (workspace / "a").mkdir()
    result = edit(workspace, resolution=resolution, command="view", path="/workspace/a/../real.txt")
    assert result.output.endswith("     1\tinside\n     2\tline\n     3\t")


@needs_root
def test_a_mount_point_inside_the_workspace_is_not_crossed(workspace: Path, host: Path) -> None:
    """A bind mount in the workspace (made in a private mount namespace so it leaves this machine alone)."""
    (workspace / "mnt").mkdir()
    script = f"""
import subprocess, sys
from pathlib import Path
from hands.tools import text_editor
subprocess.run(["mount", "--bind", {str(host)!r}, {str(workspace / "mnt")!r}], check=True)
for resolution in ("openat2", "walk"):
    for path in ("mnt/secret.txt", "mnt", "mnt/made.txt"):
        command = "create" if path.endswith("made.txt") else "view"
        tool_input = {{"command": command, "path": path, "file_text": "pwned"}}
        print(repr(text_editor.run(tool_input, Path({str(workspace)!r}), resolution=resolution)))
    print(repr(text_editor.run({{"command": "view", "path": "/workspace"}}, Path({str(workspace)!r}))))
"""
    try:
        done = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", sys.executable, "-c", script],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=Path(__file__).parents[2],
        )
    except FileNotFoundError:
        pytest.skip("no unshare(1)")
    if done.returncode != 0 and "mount" in done.stderr:
        pytest.skip(f"cannot make a mount namespace here: {done.stderr.strip()}")
    assert done.returncode == 0, done.stderr
    answers = done.stdout.splitlines()
    assert len(answers) == 8
    for answer in answers[:3] + answers[4:7]:
        assert "is_error=True" in answer and "leaves the workspace's filesystem" in answer, answer
    assert SECRET not in done.stdout
    assert not (host / "made.txt").exists()


# Hard links and identity ---------------------------------------------------------------------------------------


@pytest.fixture
def owned_workspace(workspace: Path) -> Path:
    """The workspace as the sandbox's user owns it."""
    for path in [workspace, *workspace.rglob("*")]:
        os.chown(path, UID, GID)
    return workspace


@needs_root
@pytest.mark.parametrize("command", ["create", "str_replace", "insert"])
def test_a_root_owned_hard_link_cannot_be_written_as_the_sandbox(
    owned_workspace: Path, host: Path, command: str, resolution: Resolution
) -> None:
    os.link(host / "target.txt", owned_workspace / "hard.txt")
    before = snapshot(host)
    result = edit(owned_workspace, resolution=resolution, uid=UID, gid=GID, **command_input(command, "hard.txt"))
    assert result.is_error and "permission denied" in result.output.lower()
    assert snapshot(host) == before


@needs_root
def test_a_root_only_hard_link_cannot_be_read_as_the_sandbox(owned_workspace: Path, host: Path) -> None:
    (host / "secret.txt").chmod(0o600)
    os.link(host / "secret.txt", owned_workspace / "hard.txt")
    result = edit(owned_workspace, uid=UID, gid=GID, command="view", path="hard.txt")
    assert result.is_error and "permission denied" in result.output.lower() and SECRET not in result.output


def test_an_edit_never_writes_into_an_existing_inode(workspace: Path, host: Path, resolution: Resolution) -> None:
    """Even as root with no identity, editing a hard link to a host file replaces the workspace's entry only."""
    os.link(host / "target.txt", workspace / "hard.txt")
    before = snapshot(host)
    result = edit(workspace, resolution=resolution, command="str_replace", path="hard.txt", old_str="line", new_str="x")
    assert not result.is_error, result.output
    assert (workspace / "hard.txt").read_text() == "host target\nx\n"
    assert snapshot(host) == before


@needs_root
def test_files_made_with_the_sandbox_identity_belong_to_it(owned_workspace: Path, resolution: Resolution) -> None:
    result = edit(
        owned_workspace, resolution=resolution, uid=UID, gid=GID, command="create", path="new/dir/f.txt", file_text="x"
    )
    assert not result.is_error, result.output
    for path in ("new", "new/dir", "new/dir/f.txt"):
        status = (owned_workspace / path).stat()
        assert (status.st_uid, status.st_gid) == (UID, GID), path
    (owned_workspace / "mine.txt").write_text("a\nline\n")
    os.chown(owned_workspace / "mine.txt", UID, GID)
    (owned_workspace / "mine.txt").chmod(0o640)
    edited = edit(owned_workspace, uid=UID, gid=GID, command="insert", path="mine.txt", insert_line=1, insert_text="b")
    assert not edited.is_error and (owned_workspace / "mine.txt").read_text() == "a\nb\nline\n"
    status = (owned_workspace / "mine.txt").stat()
    assert (status.st_uid, status.st_gid, stat.S_IMODE(status.st_mode)) == (UID, GID, 0o640)


@needs_root
def test_the_sandbox_identity_gets_the_sandbox_permissions(owned_workspace: Path, resolution: Resolution) -> None:
    root_only = owned_workspace / "root-only.txt"
    root_only.write_text(f"{SECRET}\n")
    os.chown(root_only, 0, 0)
    root_only.chmod(0o600)
    readable = owned_workspace / "readable.txt"
    readable.write_text("line\n")
    os.chown(readable, 0, 0)
    closed = owned_workspace / "closed"
    closed.mkdir(mode=0o700)
    (closed / "f.txt").write_text(SECRET)
    as_sandbox: dict[str, Any] = {"resolution": resolution, "uid": UID, "gid": GID}
    groups = os.getgroups()

    denied = [
        edit(owned_workspace, **as_sandbox, command="view", path="root-only.txt"),
        edit(owned_workspace, **as_sandbox, command="view", path="closed/f.txt"),
        edit(owned_workspace, **as_sandbox, command="create", path="closed/g.txt", file_text="x"),
        edit(owned_workspace, **as_sandbox, command="str_replace", path="readable.txt", old_str="line", new_str="x"),
    ]
    for result in denied:
        assert result.is_error and "permission denied" in result.output.lower(), result.output
        assert SECRET not in result.output
    assert not edit(owned_workspace, **as_sandbox, command="view", path="readable.txt").is_error
    assert readable.read_text() == "line\n" and not (closed / "g.txt").exists()
    assert fs_ids() == (0, 0) and os.getgroups() == groups, "the calling thread keeps its identity"


@needs_root
def test_without_an_identity_the_editor_acts_as_hands(workspace: Path) -> None:
    root_only = workspace / "root-only.txt"
    root_only.write_text("for root\nline\n")
    root_only.chmod(0o600)
    assert "for root" in edit(workspace, command="view", path="root-only.txt").output
    theirs = workspace / "theirs.txt"
    theirs.write_text("line\n")
    os.chown(theirs, UID, GID)
    assert not edit(workspace, command="str_replace", path="theirs.txt", old_str="line", new_str="x").is_error
    assert (theirs.stat().st_uid, theirs.stat().st_gid) == (UID, GID), "an edit keeps the file's owner"
    assert not edit(workspace, command="create", path="made.txt", file_text="x").is_error
    assert (workspace / "made.txt").stat().st_uid == os.geteuid()


def test_uid_and_gid_come_together(workspace: Path) -> None:
    with pytest.raises(ValueError, match="together"):
        text_editor.run({"command": "view", "path": "real.txt"}, workspace, uid=UID)


def test_the_walk_takes_over_when_the_kernel_has_no_openat2(
    workspace: Path, host: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_openat2(dirfd: int, path: str, flags: int, mode: int = 0) -> int:
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS), path)

    monkeypatch.setattr(files, "openat2", no_openat2)
    (workspace / "linkdir").symlink_to(host)
    assert not edit(workspace, command="create", path="a/b.txt", file_text="x\n").is_error
    assert "     1\tx" in edit(workspace, command="view", path="a/b.txt").output
    assert "symbolic link" in edit(workspace, command="view", path="linkdir/secret.txt").output
    assert "no openat2" in edit(workspace, resolution="openat2", command="view", path="a/b.txt").output


# Files that are not files --------------------------------------------------------------------------------------


@pytest.fixture
def specials(workspace: Path) -> dict[str, str]:
    """A FIFO, a socket, and devices (the numbers of /dev/null and of a loop device) in the workspace."""
    os.mkfifo(workspace / "fifo")
    os.mknod(workspace / "socket", stat.S_IFSOCK | 0o666)
    null = os.stat("/dev/null").st_rdev
    os.mknod(workspace / "chardev", stat.S_IFCHR | 0o666, null)
    os.mknod(workspace / "blockdev", stat.S_IFBLK | 0o600, os.makedev(7, 250))
    return {
        "fifo": "a FIFO (named pipe)",
        "socket": "a socket",
        "chardev": "a character device",
        "blockdev": "a block device",
    }


@needs_root
@pytest.mark.parametrize("special", ["fifo", "socket", "chardev", "blockdev"])
@pytest.mark.parametrize("command", ALL_COMMANDS)
def test_special_files_are_refused_at_once(
    workspace: Path, specials: dict[str, str], special: str, command: str, resolution: Resolution
) -> None:
    started = time.monotonic()
    result = edit(workspace, resolution=resolution, **command_input(command, f"/workspace/{special}"))
    assert time.monotonic() - started < 1.0
    assert result.is_error
    assert result.output == (
        f"/workspace/{special} is {specials[special]}; the editor only opens regular files and directories"
    )
    assert not stat.S_ISREG((workspace / special).lstat().st_mode), "nothing replaced it"
    through = edit(workspace, resolution=resolution, **command_input(command, f"{special}/x"))
    assert through.is_error and through.output == f"/workspace/{special} is not a directory"


@needs_root
def test_a_directory_holding_special_files_is_listed(workspace: Path, specials: dict[str, str]) -> None:
    listing = edit(workspace, command="view", path="/workspace", within=2.0)
    assert not listing.is_error
    assert all(f"/workspace/{name}" in listing.output for name in specials)


# Size ----------------------------------------------------------------------------------------------------------


def test_the_result_cap_is_far_below_what_the_brain_logs() -> None:
    assert MAX_RESULT_BYTES <= 256 * 1024 < 4 * 1024 * 1024 // 8


@pytest.fixture(scope="module")
def crowded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A workspace with a directory of 200,000 files (made once for the module)."""
    workspace = tmp_path_factory.mktemp("crowded")
    (workspace / "a.txt").write_text("a\n")
    many = workspace / "many"
    many.mkdir()
    directory = os.open(many, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for number in range(200_000):
            os.close(os.open(f"file-{number:06}", os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o644, dir_fd=directory))
    finally:
        os.close(directory)
    return workspace


def test_a_directory_of_200000_files_is_listed_within_the_cap(crowded: Path, resolution: Resolution) -> None:
    started = time.monotonic()
    result = edit(crowded, resolution=resolution, within=10.0, command="view", path="/workspace/many")
    assert time.monotonic() - started < 5.0
    assert not result.is_error
    lines = result.output.split("\n")
    assert lines[1:3] == ["/workspace/many/file-000000", "/workspace/many/file-000001"]
    assert len(lines) == 1 + 1_000 + 1
    assert lines[-1] == ("[... 199,000 more entries were left out; run `ls` or `find` in bash to see the rest ...]")
    assert len(result.output.encode()) <= MAX_RESULT_BYTES
    whole = edit(crowded, resolution=resolution, within=10.0, command="view", path="/workspace")
    assert whole.output.split("\n")[1:4] == ["/workspace/a.txt", "/workspace/many", "/workspace/many/file-000000"]
    assert "199,002 more entries were left out" in whole.output
    assert len(whole.output.encode()) <= MAX_RESULT_BYTES


def test_long_and_strange_names_keep_the_listing_within_the_cap(workspace: Path) -> None:
    wide = "\U0001f600" * 62  # 248 bytes, with the number 252: a name as long as a name can be, in 4-byte characters
    for number in range(1_200):
        (workspace / f"{number:04}{wide}").mkdir()
    os.close(os.open(os.path.join(os.fsencode(workspace), b"!bad\xffname\nwith a newline"), os.O_CREAT, 0o644))
    result = edit(workspace, command="view", path="/workspace")
    assert not result.is_error
    assert len(result.output.encode()) <= MAX_RESULT_BYTES
    assert "/workspace/!bad\\udcffname\\nwith a newline" in result.output
    assert result.output.endswith("run `ls` or `find` in bash to see the rest ...]")


def test_a_file_over_the_limit_is_refused(workspace: Path, resolution: Resolution) -> None:
    with open(workspace / "big.bin", "wb") as big:
        big.truncate(MAX_FILE_BYTES + 1)
    for command in ("view", "str_replace", "insert"):
        result = edit(workspace, resolution=resolution, **command_input(command, "big.bin"))
        assert result.is_error
        assert result.output == "/workspace/big.bin is larger than 10 MiB; use bash to inspect it"
    assert (workspace / "big.bin").stat().st_size == MAX_FILE_BYTES + 1


@pytest.mark.parametrize(
    "content",
    [
        "\U0001f600" * (MAX_FILE_BYTES // 4),  # one line of 4-byte characters
        "\n" * MAX_FILE_BYTES,  # ten million empty lines
    ],
)
def test_the_largest_files_answer_within_the_cap(workspace: Path, content: str) -> None:
    (workspace / "large.txt").write_text(content)
    started = time.monotonic()
    answers = [
        edit(workspace, command="view", path="large.txt"),
        edit(workspace, command="view", path="large.txt", view_range=[1, -1]),
        edit(workspace, command="insert", path="large.txt", insert_line=1, insert_text="x"),
    ]
    assert time.monotonic() - started < 10.0
    for answer in answers:
        assert len(answer.output.encode()) <= MAX_RESULT_BYTES, answer.output[:200]
    assert "file cut here" in answers[0].output


def test_answers_that_echo_input_stay_within_the_cap(workspace: Path) -> None:
    (workspace / "f.txt").write_text("a\nline\nb\n")
    long_path = "/workspace/" + "d/" * 2_000 + "x"
    answers = [
        edit(workspace, command="view", path=long_path),
        edit(workspace, command="view", path="/etc/" + "x" * 4_000),
        edit(workspace, command="view", path="/workspace/" + "x" * 10_000_000),
        edit(workspace, command="str_replace", path="f.txt", old_str="line", new_str="\U0001f600\n" * 1_000_000),
        edit(workspace, command="view", path="f.txt", view_range=[10**5000, 1]),
        edit(workspace, command="insert", path="f.txt", insert_line=10**5000, insert_text="x"),
    ]
    for answer in answers:
        assert len(answer.output.encode()) <= 8 * 1024 or "snippet cut here" in answer.output, answer.output[:200]
        assert len(answer.output.encode()) <= MAX_RESULT_BYTES


# Time ----------------------------------------------------------------------------------------------------------


async def test_an_operation_past_its_time_is_abandoned_without_blocking_the_loop(crowded: Path) -> None:
    lags: list[float] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        while not stop.is_set():
            before = time.monotonic()
            await asyncio.sleep(0.005)
            lags.append(time.monotonic() - before - 0.005)

    ticking = asyncio.create_task(ticker())
    started = time.monotonic()
    result = await text_editor.run_async(
        {"command": "view", "path": "/workspace/many"}, crowded, uid=None, gid=None, timeout=0.001
    )
    waited = time.monotonic() - started
    finished = await text_editor.run_async(
        {"command": "view", "path": "/workspace/many"}, crowded, uid=None, gid=None, timeout=30
    )
    stop.set()
    await ticking
    assert result.is_error
    assert result.output.startswith("The file operation did not finish within 0.001 s and was abandoned")
    assert waited < 0.5
    assert not finished.is_error and "199,000 more entries" in finished.output
    assert lags and max(lags) < 0.25, f"the event loop stalled for {max(lags):.3f} s"


async def test_run_async_does_not_wait_for_the_default_pool(workspace: Path) -> None:
    loop = asyncio.get_running_loop()
    pool = ThreadPoolExecutor(max_workers=1)
    loop.set_default_executor(pool)
    gate = threading.Event()
    occupied = loop.run_in_executor(None, gate.wait)
    try:
        result = await text_editor.run_async(
            {"command": "view", "path": "real.txt"}, workspace, uid=None, gid=None, timeout=5
        )
    finally:
        gate.set()
        await occupied
    assert not result.is_error and "inside" in result.output


@needs_root
async def test_run_async_with_an_identity(owned_workspace: Path) -> None:
    made = await text_editor.run_async(
        {"command": "create", "path": "async.txt", "file_text": "x"}, owned_workspace, uid=UID, gid=GID, timeout=5
    )
    assert not made.is_error
    assert (owned_workspace / "async.txt").stat().st_uid == UID
    assert fs_ids() == (0, 0)


def test_the_architecture_is_known() -> None:
    assert platform.machine() in ("x86_64", "aarch64")
