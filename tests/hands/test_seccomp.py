"""The sandbox seccomp filter: its structure, its decisions (by a small BPF interpreter, for both machines), and
its enforcement by the real kernel, installed directly with prctl and through bwrap."""

from __future__ import annotations

import errno
import json
import os
import platform
import re
import shutil
import signal
import stat
import struct
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from hands import seccomp

MACHINES = ("x86_64", "aarch64")
AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
ALLOW = seccomp.SECCOMP_RET_ALLOW
KILL = seccomp.SECCOMP_RET_KILL_PROCESS
EPERM = seccomp.SECCOMP_RET_ERRNO | errno.EPERM
ENOSYS = seccomp.SECCOMP_RET_ERRNO | errno.ENOSYS
SIGCHLD = 17
ADDR_NO_RANDOMIZE = 0x0040000
TIOCGWINSZ = 0x5413

# An address in the never-mapped first page: pointer arguments there fail with EFAULT.
BAD = 1

# For each refused call, arguments that without the filter do nothing and fail with another errno (EFAULT for
# BAD pointers, EINVAL for unknown flags or operations, EBADF for fd -1, ENOSYS where the kernel lacks the
# call), so that EPERM proves the filter. vhangup takes no arguments; the probe runs without a controlling
# terminal, where it is a no-op.
HARMLESS: Mapping[str, tuple[int, ...]] = {
    "keyctl": (0xFFFF,),
    "add_key": (BAD, BAD, 0, 0, 0),
    "request_key": (BAD, BAD, 0, 0),
    "bpf": (0xFFFF, 0, 0),
    "perf_event_open": (0, 0, -1, -1, 0),
    "userfaultfd": (-1,),
    "init_module": (0, 0, BAD),
    "finit_module": (-1, BAD, 0),
    "delete_module": (BAD, 0),
    "kexec_load": (0, 1000, 0, 0),
    "kexec_file_load": (-1, -1, 0, 0, 0x80000000),
    "reboot": (0, 0, 0, 0),
    "swapon": (BAD, 0),
    "swapoff": (BAD,),
    "acct": (BAD,),
    "settimeofday": (BAD, 0),
    "clock_settime": (0, BAD),
    "clock_adjtime": (0, BAD),
    "adjtimex": (BAD,),
    "syslog": (0xFF, 0, 0),
    "mount": (BAD, BAD, BAD, 0, 0),
    "umount2": (BAD, 0xFFFF),
    "pivot_root": (BAD, BAD),
    "open_tree": (-1, BAD, 0xFFFFFFFF),
    "move_mount": (-1, BAD, -1, BAD, 0xFFFFFFFF),
    "fsopen": (BAD, 0xFFFFFFFF),
    "fsconfig": (-1, 0xFF, 0, 0, 0),
    "fsmount": (-1, 0xFFFFFFFF, 0),
    "fspick": (-1, BAD, 0xFFFFFFFF),
    "mount_setattr": (-1, BAD, 0xFFFFFFFF, BAD, 0),
    "open_tree_attr": (-1, BAD, 0xFFFFFFFF, 0, 0),
    "unshare": (-1,),
    "setns": (-1, 0),
    "open_by_handle_at": (-1, BAD, 0),
    "name_to_handle_at": (-1, BAD, BAD, BAD, 0xFFFF),
    "quotactl": (0, 0, 0, 0),
    "quotactl_fd": (-1, 0, 0, 0),
    "lookup_dcookie": (0, 0, 0),
    "nfsservctl": (),
    "uselib": (BAD,),
    "vhangup": (),
    "iopl": (4,),
    "ioperm": (0x10000, 1, 0),
    "io_uring_setup": (0, 0),
    "io_uring_enter": (-1, 0, 0, 0, 0, 0),
    "io_uring_register": (-1, 0, 0, 0),
    "ptrace": (0xFFFF, 0, 0, 0),
    "process_vm_readv": (0, 0, 0, 0, 0, 1),
    "process_vm_writev": (0, 0, 0, 0, 0, 1),
    "kcmp": (0, 0, 0xFF, 0, 0),
    "pidfd_getfd": (-1, 0, 1),
    "fanotify_init": (0xFFFFFFFF, 0),
}

# Calls that the host itself may refuse with EPERM, by a sysctl or lockdown, without any filter of ours.
HOST_POLICY = frozenset(
    {"init_module", "finit_module", "delete_module", "kexec_load", "kexec_file_load", "iopl", "ioperm"}
    | {"io_uring_setup", "io_uring_enter", "io_uring_register", "perf_event_open", "userfaultfd", "bpf"}
)

NAMESPACE_FLAGS = {
    "CLONE_NEWNS": seccomp.CLONE_NEWNS,
    "CLONE_NEWCGROUP": seccomp.CLONE_NEWCGROUP,
    "CLONE_NEWUTS": seccomp.CLONE_NEWUTS,
    "CLONE_NEWIPC": seccomp.CLONE_NEWIPC,
    "CLONE_NEWUSER": seccomp.CLONE_NEWUSER,
    "CLONE_NEWPID": seccomp.CLONE_NEWPID,
    "CLONE_NEWNET": seccomp.CLONE_NEWNET,
    "CLONE_NEWTIME": seccomp.CLONE_NEWTIME,
}

# The probe: a standalone script (it also runs inside bwrap, under the system Python) that optionally installs
# a filter with prctl, makes the calls of its JSON spec and prints their errnos, and checks that ordinary work
# still works. Raw clone children exit at once, so a filter that let one through cannot run test code twice.
PROBE = r"""
import ctypes, fcntl, json, mmap, os, resource, subprocess, sys, tempfile, threading

spec = json.loads(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
libc.syscall.argtypes = [ctypes.c_long] * 7
libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong]


def raw(nr, args):
    ctypes.set_errno(0)
    result = libc.syscall(nr, *(list(args) + [0] * 6)[:6])
    return ctypes.get_errno() if result == -1 else 0


def clone(nr, flags):
    ctypes.set_errno(0)
    pid = libc.syscall(nr, flags, 0, 0, 0, 0, 0, 0)
    if pid == 0:
        os._exit(0)
    if pid > 0:
        os.waitpid(pid, 0)
        return 0
    return ctypes.get_errno()


def pty_ioctl(request):
    controller, terminal = os.openpty()
    try:
        fcntl.ioctl(terminal, request, b"x" if request == 0x5412 else bytes(8))
        return 0
    except OSError as error:
        return error.errno
    finally:
        os.close(controller)
        os.close(terminal)


def files():
    directory = tempfile.mkdtemp()
    path = os.path.join(directory, "f")
    with open(path, "w") as file:
        file.write("hello")
    with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, prot=mmap.PROT_READ) as mapped:
        data = mapped[:]
    with mmap.mmap(-1, 4096) as anonymous:
        anonymous[:5] = b"hello"
        written = anonymous[:5]
    os.unlink(path)
    os.rmdir(directory)
    return data == b"hello" == written


def fork():
    pid = os.fork()
    if pid == 0:
        os._exit(7)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 7


def thread():
    box = []
    worker = threading.Thread(target=box.append, args=(1,))
    worker.start()
    worker.join()
    return box == [1]


def run(argv):
    return subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL).returncode == 0


def check(function, *args):
    try:
        return function(*args)
    except Exception as error:
        return repr(error)


if spec["filter"] is not None:
    # A filter that kills the process must not leave a core file behind.
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    with open(spec["filter"], "rb") as file:
        code = file.read()

    class Fprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    buffer = ctypes.create_string_buffer(code, len(code))
    fprog = Fprog(len(code) // 8, ctypes.addressof(buffer))
    if libc.prctl(38, 1, None, 0, 0) != 0 or libc.prctl(22, 2, ctypes.addressof(fprog), 0, 0) != 0:
        sys.exit(f"prctl: errno {ctypes.get_errno()}")

results = {}
for label, kind, nr, args in spec["calls"]:
    if kind == "syscall":
        results[label] = raw(nr, args)
    elif kind == "clone":
        results[label] = clone(nr, args[0])
    elif kind == "unshare":
        results[label] = 0 if libc.unshare(args[0]) == 0 else ctypes.get_errno()
    elif kind == "ioctl":
        results[label] = pty_ioctl(args[0])
work = {}
if spec["work"]:
    work = {
        "files": check(files),
        "fork": check(fork),
        "thread": check(thread),
        "true": check(run, ["/bin/true"]),
        "python": check(run, [sys.executable, "-c", "import subprocess; subprocess.run(['true'], check=True)"]),
        "tty ioctl": check(pty_ioctl, 0x5413) == 0,
    }
with open("/proc/self/status") as status:
    mode = next(line.split()[1] for line in status if line.startswith("Seccomp:"))
print(json.dumps({"calls": results, "work": work, "seccomp": mode}))
"""

Call = tuple[str, str, int, tuple[int, ...]]


def this_machine() -> str:
    machine = platform.machine().lower()
    machine = {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)
    if machine not in MACHINES:
        pytest.skip(f"no seccomp filter for {platform.machine()}")
    return machine


def _requires_kernel() -> None:
    if sys.platform != "linux":
        pytest.skip("seccomp is Linux-only")
    this_machine()


def run_probe(
    calls: list[Call], *, filter_path: Path | None, work: bool = False, argv: list[str] | None = None, **popen: Any
) -> subprocess.CompletedProcess[str]:
    """Runs the probe in a new session (no controlling terminal), by default with this interpreter."""
    spec = json.dumps({"filter": None if filter_path is None else str(filter_path), "calls": calls, "work": work})
    prefix = argv if argv is not None else [sys.executable]
    return subprocess.run(
        [*prefix, "-c", PROBE, spec],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        start_new_session=True,
        **popen,
    )


def probe_results(completed: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert completed.returncode == 0, completed.stderr
    result: dict[str, Any] = json.loads(completed.stdout)
    return result


def refused_calls(machine: str) -> list[Call]:
    numbers = seccomp.syscall_numbers(machine)
    return [(name, "syscall", numbers[name], HARMLESS[name]) for name in seccomp.REFUSED if name in numbers]


def restricted_calls(machine: str) -> list[Call]:
    """The calls the filter inspects: refused with these arguments, allowed with others (see the work checks)."""
    numbers = seccomp.syscall_numbers(machine)
    calls: list[Call] = [
        ("clone3", "syscall", numbers["clone3"], (0, 0)),
        ("unshare(CLONE_NEWUSER)", "unshare", 0, (seccomp.CLONE_NEWUSER,)),
        ("TIOCSTI", "ioctl", 0, (seccomp.TIOCSTI,)),
        ("personality(ADDR_NO_RANDOMIZE)", "syscall", numbers["personality"], (ADDR_NO_RANDOMIZE,)),
        ("personality(query)", "syscall", numbers["personality"], (0xFFFFFFFF,)),
        ("personality(PER_LINUX)", "syscall", numbers["personality"], (0,)),
    ]
    calls += [
        (f"clone({name})", "clone", numbers["clone"], (flag | SIGCHLD,)) for name, flag in NAMESPACE_FLAGS.items()
    ]
    if machine == "x86_64":
        calls.append(("x32 getpid", "syscall", 0x40000000 | 39, ()))
    return calls


# --- structure -----------------------------------------------------------------------------------------------

Instruction = tuple[int, int, int, int]


def decode(code: bytes) -> list[Instruction]:
    assert len(code) % 8 == 0
    return [struct.unpack_from("<HBBI", code, offset) for offset in range(0, len(code), 8)]


@pytest.mark.parametrize("machine", MACHINES)
def test_program_structure(machine: str) -> None:
    code = seccomp.program(machine)
    instructions = decode(code)
    assert 0 < len(instructions) < seccomp.MAX_INSTRUCTIONS
    for at, (opcode, jt, jf, _k) in enumerate(instructions):
        assert opcode in (0x20, 0x15, 0x45, 0x06), f"instruction {at}: unexpected opcode {opcode:#x}"
        if opcode & 0x07 == 0x05:  # a conditional jump: both targets inside the program
            assert at + 1 + jt < len(instructions)
            assert at + 1 + jf < len(instructions)
        else:
            assert jt == jf == 0
    # Control can only leave the program by a return.
    assert instructions[-1] == (0x06, 0, 0, ALLOW)
    # The first thing checked is the architecture.
    assert instructions[0] == (0x20, 0, 0, 4)
    assert instructions[1][3] == AUDIT_ARCH[machine]


def test_program_is_deterministic_and_defaults_to_this_machine() -> None:
    machine = this_machine()
    assert seccomp.program() == seccomp.program(machine) == seccomp.program(machine.upper())
    assert seccomp.program("amd64") == seccomp.program("x86_64")
    assert seccomp.program("arm64") == seccomp.program("aarch64")
    assert seccomp.program("x86_64") != seccomp.program("aarch64")


@pytest.mark.parametrize("machine", ["riscv64", "i686", "aarch64_be", ""])
def test_unknown_machine_is_a_clear_error(machine: str) -> None:
    with pytest.raises(seccomp.UnsupportedMachine, match="x86_64 and aarch64"):
        seccomp.program(machine)
    with pytest.raises(seccomp.UnsupportedMachine):
        seccomp.syscall_numbers(machine)


def test_refused_list_and_summary() -> None:
    assert len(set(seccomp.REFUSED)) == len(seccomp.REFUSED)
    assert set(HARMLESS) == set(seccomp.REFUSED), "every refused call needs a harmless probe"
    for name in seccomp.REFUSED:
        assert any(name in seccomp.syscall_numbers(machine) for machine in MACHINES), name
    assert seccomp.SUMMARY.startswith(f"seccomp: {len(seccomp.REFUSED)} syscalls refused (kernel keyring, bpf")
    for name in ("ptrace", "io_uring", "mounts and namespaces"):
        assert name in seccomp.SUMMARY


def test_syscall_numbers() -> None:
    x86, arm = seccomp.syscall_numbers("x86_64"), seccomp.syscall_numbers("aarch64")
    assert (x86["keyctl"], arm["keyctl"]) == (250, 219)
    assert (x86["clone"], arm["clone"]) == (56, 220)
    assert x86["io_uring_setup"] == arm["io_uring_setup"] == 425
    assert x86["clone3"] == arm["clone3"] == 435
    for name in ("iopl", "ioperm", "uselib"):
        assert name in x86
        assert name not in arm


def _header_numbers(path: Path) -> dict[str, int]:
    text = path.read_text()
    return {name: int(number) for name, number in re.findall(r"^#define __NR(?:3264)?_(\w+)\s+(\d+)\s*$", text, re.M)}


@pytest.mark.parametrize(
    ("machine", "header"),
    [
        ("x86_64", Path("/usr/include/x86_64-linux-gnu/asm/unistd_64.h")),
        ("aarch64", Path("/usr/include/asm-generic/unistd.h")),
    ],
)
def test_syscall_numbers_match_kernel_headers(machine: str, header: Path) -> None:
    """Cross-checks the tables against the installed kernel headers (linux-libc-dev), for the calls they know:
    newer calls (open_tree_attr, 467) may postdate the headers."""
    if not header.exists():
        pytest.skip(f"{header} is not installed")
    known = _header_numbers(header)
    numbers = seccomp.syscall_numbers(machine)
    compared = [name for name in numbers if name in known]
    assert len(compared) >= 50
    assert {name: numbers[name] for name in compared} == {name: known[name] for name in compared}


# --- decisions, by a classic BPF interpreter -------------------------------------------------------------------


def evaluate(code: bytes, nr: int, arch: int, args: tuple[int, ...] = ()) -> int:
    """What the filter returns for a call, by the kernel's semantics of the few opcodes it uses."""
    full = [arg & 0xFFFF_FFFF_FFFF_FFFF for arg in (*args, 0, 0, 0, 0, 0, 0)[:6]]
    data = struct.pack("<iIQ6Q", nr, arch, 0x400000, *full)
    instructions = decode(code)
    accumulator, pc = 0, 0
    while True:
        opcode, jt, jf, k = instructions[pc]
        pc += 1
        if opcode == 0x20:
            (accumulator,) = struct.unpack_from("<I", data, k)
        elif opcode == 0x15:
            pc += jt if accumulator == k else jf
        elif opcode == 0x45:
            pc += jt if accumulator & k else jf
        elif opcode == 0x06:
            return k
        else:
            raise AssertionError(f"unexpected opcode {opcode:#x}")


@pytest.mark.parametrize("machine", MACHINES)
def test_decisions(machine: str) -> None:
    code = seccomp.program(machine)
    numbers = seccomp.syscall_numbers(machine)
    arch = AUDIT_ARCH[machine]

    def decide(name: str, *args: int) -> int:
        return evaluate(code, numbers[name], arch, args)

    # Other syscall tables kill, whatever the call.
    for other in (0x40000003, 0x40000028, *(a for a in AUDIT_ARCH.values() if a != arch)):
        assert evaluate(code, 0, other) == KILL
        assert evaluate(code, numbers["keyctl"], other) == KILL
    for name in seccomp.REFUSED:
        if name in numbers:
            assert decide(name, *HARMLESS[name]) == EPERM, name
    assert decide("clone3") == ENOSYS
    for flag in NAMESPACE_FLAGS.values():
        assert decide("clone", flag | SIGCHLD) == EPERM
    # fork(), and pthread_create's flags (CLONE_VM|FS|FILES|SIGHAND|THREAD|SYSVSEM|SETTLS|PARENT_SETTID|
    # CHILD_CLEARTID); the kernel ignores clone's high 32 bits, and so does the filter.
    assert decide("clone", SIGCHLD) == ALLOW
    assert decide("clone", 0x003D0F00) == ALLOW
    assert decide("clone", (1 << 32) | SIGCHLD) == ALLOW
    assert decide("ioctl", 0, seccomp.TIOCSTI) == EPERM
    assert decide("ioctl", 0, seccomp.TIOCLINUX) == EPERM
    assert decide("ioctl", 0, TIOCGWINSZ) == ALLOW
    assert decide("personality", 0) == ALLOW
    assert decide("personality", 0xFFFFFFFF) == ALLOW
    assert decide("personality", ADDR_NO_RANDOMIZE) == EPERM
    # Ordinary calls, by number: read, write, openat, execve, mmap.
    ordinary = (0, 1, 257, 59, 9) if machine == "x86_64" else (63, 64, 56, 221, 222)
    for nr in ordinary:
        assert evaluate(code, nr, arch, (0, 0, 0)) == ALLOW
    if machine == "x86_64":
        assert evaluate(code, 0x40000000 | 39, arch) == EPERM  # x32 getpid
        assert evaluate(code, 0x40000000, arch) == EPERM


def test_write_program(tmp_path: Path) -> None:
    target = tmp_path / "seccomp.bpf"
    target.write_bytes(b"stale")
    target.chmod(0o600)
    assert seccomp.write_program(target, "x86_64") == target
    assert target.read_bytes() == seccomp.program("x86_64")
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert [path.name for path in tmp_path.iterdir()] == ["seccomp.bpf"]
    with pytest.raises(seccomp.UnsupportedMachine):
        seccomp.write_program(tmp_path / "other.bpf", "sparc")
    assert [path.name for path in tmp_path.iterdir()] == ["seccomp.bpf"]


# --- enforcement by the kernel ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def filter_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    _requires_kernel()
    return seccomp.write_program(tmp_path_factory.mktemp("seccomp") / "filter.bpf")


@pytest.fixture(scope="module")
def filtered(filter_file: Path) -> dict[str, Any]:
    """One run of the probe under the filter: every refused and restricted call, and the work checks."""
    machine = this_machine()
    return probe_results(
        run_probe(refused_calls(machine) + restricted_calls(machine), filter_path=filter_file, work=True)
    )


def test_every_refused_call_gets_eperm(filtered: dict[str, Any]) -> None:
    machine = this_machine()
    expected = {name: errno.EPERM for name in seccomp.REFUSED if name in seccomp.syscall_numbers(machine)}
    assert {name: filtered["calls"][name] for name in expected} == expected
    assert filtered["seccomp"] == "2"


def test_restricted_calls(filtered: dict[str, Any]) -> None:
    calls = filtered["calls"]
    assert calls["clone3"] == errno.ENOSYS
    assert calls["unshare(CLONE_NEWUSER)"] == errno.EPERM
    assert calls["TIOCSTI"] == errno.EPERM
    assert calls["personality(ADDR_NO_RANDOMIZE)"] == errno.EPERM
    assert calls["personality(query)"] == 0
    assert calls["personality(PER_LINUX)"] == 0
    for name in NAMESPACE_FLAGS:
        assert calls[f"clone({name})"] == errno.EPERM, name
    if this_machine() == "x86_64":
        assert calls["x32 getpid"] == errno.EPERM


def test_ordinary_work_still_works(filtered: dict[str, Any]) -> None:
    """Files and mmap, fork (plain clone), threads (glibc falls back from clone3), exec, a Python subprocess that
    itself starts one, and ioctls other than TIOCSTI."""
    assert filtered["work"] == dict.fromkeys(("files", "fork", "thread", "true", "python", "tty ioctl"), True)


def _status(field: str) -> str:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return line.split()[1]
    return ""


def test_probes_are_harmless_without_the_filter() -> None:
    """Without the filter the same probes fail with other errnos (or, for vhangup, do nothing): so EPERM above
    is the filter's, not the kernel's. Needs an unconfined root, which the tests normally are."""
    _requires_kernel()
    if _status("Seccomp") != "0" or int(_status("CapEff") or "0", 16) & (1 << 21) == 0:
        pytest.skip("the tests already run under seccomp or without CAP_SYS_ADMIN")
    machine = this_machine()
    # Of the inspected calls, those that are harmless unfiltered too (they only affect the probe process).
    restricted = [
        call for call in restricted_calls(machine) if call[0] in ("clone3", "TIOCSTI", "personality(ADDR_NO_RANDOMIZE)")
    ]
    results = probe_results(run_probe(refused_calls(machine) + restricted, filter_path=None))
    assert results["seccomp"] == "0"
    calls = results["calls"]
    refused_anyway = {name for name, number in calls.items() if number == errno.EPERM}
    assert refused_anyway <= HOST_POLICY
    assert calls["keyctl"] == errno.EOPNOTSUPP
    assert calls["mount"] == errno.EFAULT
    assert calls["clone3"] == errno.EINVAL
    assert calls["TIOCSTI"] == 0
    assert calls["personality(ADDR_NO_RANDOMIZE)"] == 0


def test_other_architecture_is_killed(tmp_path: Path) -> None:
    """A filter for another machine sees the wrong architecture on every call: the process dies of SIGSYS."""
    machine = this_machine()
    other = next(candidate for candidate in MACHINES if candidate != machine)
    path = seccomp.write_program(tmp_path / "other.bpf", other)
    completed = run_probe([], filter_path=path)
    assert completed.returncode == -signal.SIGSYS, completed.stderr


# --- enforcement through bwrap ---------------------------------------------------------------------------------


BWRAP_PROBES = ("keyctl", "bpf", "perf_event_open", "userfaultfd", "unshare", "mount", "io_uring_setup")


@pytest.fixture
def bwrap_argv() -> Iterator[list[str]]:
    _requires_kernel()
    bwrap = shutil.which("bwrap")
    if bwrap is None or not os.path.exists("/usr/bin/python3"):
        pytest.skip("needs bwrap and /usr/bin/python3")
    argv = [bwrap, "--unshare-all", "--die-with-parent", "--ro-bind", "/usr", "/usr"]
    for link in ("bin", "lib", "lib64", "sbin"):
        if os.path.islink(f"/{link}"):
            argv += ["--symlink", os.readlink(f"/{link}"), f"/{link}"]
        elif os.path.isdir(f"/{link}"):
            argv += ["--ro-bind", f"/{link}", f"/{link}"]
    yield [*argv, "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp"]


def _bwrap_calls(machine: str) -> list[Call]:
    numbers = seccomp.syscall_numbers(machine)
    calls: list[Call] = [(name, "syscall", numbers[name], HARMLESS[name]) for name in BWRAP_PROBES if name != "unshare"]
    return [*calls, ("unshare", "unshare", 0, (seccomp.CLONE_NEWUSER,))]


def test_bwrap_loads_the_filter(bwrap_argv: list[str], filter_file: Path) -> None:
    machine = this_machine()
    fd = os.open(filter_file, os.O_RDONLY)
    try:
        completed = run_probe(
            _bwrap_calls(machine),
            filter_path=None,
            work=True,
            argv=[*bwrap_argv, "--seccomp", str(fd), "/usr/bin/python3"],
            pass_fds=(fd,),
        )
    finally:
        os.close(fd)
    results = probe_results(completed)
    assert results["seccomp"] == "2"
    assert results["calls"] == dict.fromkeys(BWRAP_PROBES, errno.EPERM)
    assert results["work"] == dict.fromkeys(("files", "fork", "thread", "true", "python", "tty ioctl"), True)


def test_bwrap_without_the_filter(bwrap_argv: list[str]) -> None:
    """The control: the same sandbox without --seccomp answers keyctl, perf_event_open and mount differently."""
    completed = run_probe(_bwrap_calls(this_machine()), filter_path=None, argv=[*bwrap_argv, "/usr/bin/python3"])
    results = probe_results(completed)
    assert results["seccomp"] == "0"
    assert results["calls"]["keyctl"] == errno.EOPNOTSUPP
    assert results["calls"]["perf_event_open"] == errno.EFAULT
    assert results["calls"]["mount"] == errno.EFAULT
