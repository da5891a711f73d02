"""The seccomp filter of bwrap sandboxes: a classic-BPF program, compiled here in pure Python, that refuses the
system calls a coding sandbox never needs and that hostile code would use to attack the kernel or escape.

bwrap loads it with `--seccomp FD` just before it executes the sandbox's shell, so it binds every process in the
sandbox and cannot be removed (seccomp filters are inherited and only ever added to). The sandbox already runs
without capabilities in its own namespaces, so most refused calls would fail anyway; the filter is defence in
depth: it takes whole kernel subsystems (keyrings, BPF, io_uring, the mount API, ...) out of reach, so a bug in
one of them cannot be exploited from a sandbox.

The program, for seccomp's `struct seccomp_data {int nr; u32 arch; u64 instruction_pointer; u64 args[6];}`:

1. An architecture other than the expected one (i386 or x32 on x86_64, AArch32 on aarch64: other syscall
   tables, where our numbers mean other calls) kills the process. On x86_64 the x32 ABI, which shares the
   architecture but sets bit 30 of the number, is refused.
2. Each refused call returns EPERM, as if the sandbox lacked the privilege (which it does).
3. `clone3` returns ENOSYS: its flags live in memory, which seccomp cannot read, so glibc and other runtimes
   must fall back to `clone`, whose flags are a register (Docker's default profile does the same).
4. `clone` with a namespace flag returns EPERM; plain forks and threads pass.
5. `ioctl` TIOCSTI and TIOCLINUX (terminal input injection) return EPERM; other ioctls pass.
6. `personality` may only query or set the default persona.
7. Everything else is allowed.

Both supported machines are little-endian, so the low 32 bits of argument i are at offset 16 + 8 * i.
"""

from __future__ import annotations

import contextlib
import errno
import os
import platform
import struct
import tempfile
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Final, NamedTuple

# Classic BPF opcodes (linux/bpf_common.h) and seccomp's return values (linux/seccomp.h).
_LD_W_ABS: Final = 0x20
_JMP_JEQ_K: Final = 0x15
_JMP_JSET_K: Final = 0x45
_RET_K: Final = 0x06

SECCOMP_RET_KILL_PROCESS: Final = 0x80000000
SECCOMP_RET_ERRNO: Final = 0x00050000
SECCOMP_RET_ALLOW: Final = 0x7FFF0000

# Offsets in struct seccomp_data.
_NR: Final = 0
_ARCH: Final = 4


def _arg_low(index: int) -> int:
    """The offset of the low 32 bits of syscall argument `index` (little-endian)."""
    return 16 + 8 * index


# The kernel's BPF_MAXINSNS: a longer program is refused.
MAX_INSTRUCTIONS: Final = 4096

_X32_SYSCALL_BIT: Final = 0x40000000

# Namespace flags of clone(2). CLONE_NEWTIME shares its bit with the exit signal in clone(2)'s flags, where any
# value over 64 is invalid anyway; refusing it costs nothing and keeps the list the same as unshare's.
CLONE_NEWTIME: Final = 0x00000080
CLONE_NEWNS: Final = 0x00020000
CLONE_NEWCGROUP: Final = 0x02000000
CLONE_NEWUTS: Final = 0x04000000
CLONE_NEWIPC: Final = 0x08000000
CLONE_NEWUSER: Final = 0x10000000
CLONE_NEWPID: Final = 0x20000000
CLONE_NEWNET: Final = 0x40000000
NAMESPACE_FLAGS: Final = (
    CLONE_NEWTIME
    | CLONE_NEWNS
    | CLONE_NEWCGROUP
    | CLONE_NEWUTS
    | CLONE_NEWIPC
    | CLONE_NEWUSER
    | CLONE_NEWPID
    | CLONE_NEWNET
)

# TIOCSTI pushes bytes into a terminal's input queue, so a process that shares a terminal with someone else
# types commands into their shell; TIOCLINUX's selection paste does the same on a virtual console. Same numbers
# on both machines (asm-generic/ioctls.h).
TIOCSTI: Final = 0x5412
TIOCLINUX: Final = 0x541C

# personality(2) values allowed: the default persona, and 0xffffffff, which only reads the current one.
PER_LINUX: Final = 0x0000
PERSONALITY_QUERY: Final = 0xFFFFFFFF


class UnsupportedMachine(RuntimeError):
    """There is no filter for this machine; the caller decides whether sandboxes may run without one."""


class _Arch(NamedTuple):
    name: str
    audit_arch: int
    column: int  # the column of `_NUMBERS`
    x32_bit: bool


_ARCHES: Final[Mapping[str, _Arch]] = MappingProxyType(
    {
        "x86_64": _Arch("x86_64", 0xC000003E, 0, x32_bit=True),
        "aarch64": _Arch("aarch64", 0xC00000B7, 1, x32_bit=False),
    }
)
# What platform.machine() says elsewhere for the same machines.
_ALIASES: Final[Mapping[str, str]] = MappingProxyType({"amd64": "x86_64", "arm64": "aarch64"})

# Syscall numbers: (x86_64 from arch/x86/entry/syscalls/syscall_64.tbl, aarch64 from the generic table
# include/uapi/asm-generic/unistd.h); None where the machine has no such call. Calls added since 5.1 (424 on)
# have the same number everywhere.
_NUMBERS: Final[Mapping[str, tuple[int | None, int | None]]] = MappingProxyType(
    {
        # Inspected, not refused outright.
        "ioctl": (16, 29),
        "clone": (56, 220),
        "personality": (135, 92),
        "clone3": (435, 435),
        # Refused.
        "keyctl": (250, 219),
        "add_key": (248, 217),
        "request_key": (249, 218),
        "bpf": (321, 280),
        "perf_event_open": (298, 241),
        "userfaultfd": (323, 282),
        "init_module": (175, 105),
        "finit_module": (313, 273),
        "delete_module": (176, 106),
        "kexec_load": (246, 104),
        "kexec_file_load": (320, 294),
        "reboot": (169, 142),
        "swapon": (167, 224),
        "swapoff": (168, 225),
        "acct": (163, 89),
        "settimeofday": (164, 170),
        "clock_settime": (227, 112),
        "clock_adjtime": (305, 266),
        "adjtimex": (159, 171),
        "syslog": (103, 116),
        "mount": (165, 40),
        "umount2": (166, 39),
        "pivot_root": (155, 41),
        "open_tree": (428, 428),
        "move_mount": (429, 429),
        "fsopen": (430, 430),
        "fsconfig": (431, 431),
        "fsmount": (432, 432),
        "fspick": (433, 433),
        "mount_setattr": (442, 442),
        "open_tree_attr": (467, 467),
        "unshare": (272, 97),
        "setns": (308, 268),
        "open_by_handle_at": (304, 265),
        "name_to_handle_at": (303, 264),
        "quotactl": (179, 60),
        "quotactl_fd": (443, 443),
        "lookup_dcookie": (212, 18),
        "nfsservctl": (180, 42),
        "vhangup": (153, 58),
        "iopl": (172, None),
        "ioperm": (173, None),
        "uselib": (134, None),
        "io_uring_setup": (425, 425),
        "io_uring_enter": (426, 426),
        "io_uring_register": (427, 427),
        "ptrace": (101, 117),
        "process_vm_readv": (310, 270),
        "process_vm_writev": (311, 271),
        "kcmp": (312, 272),
        "pidfd_getfd": (438, 438),
        "fanotify_init": (300, 262),
    }
)

# The refused calls by group: (what the summary calls the group, the calls). Why each group goes:
_GROUPS: Final[tuple[tuple[str, tuple[str, ...]], ...]] = (
    # Kernel keyrings hold credentials (Kerberos tickets, fscrypt and dm-crypt keys) and have had a long run of
    # reference-counting bugs (CVE-2016-0728). Nothing a coding sandbox runs stores keys in the kernel.
    ("kernel keyring", ("keyctl", "add_key", "request_key")),
    # eBPF: a verifier and JIT in the kernel, the source of many local privilege escalations. Only tracing and
    # networking tools load programs, and those need privileges a sandbox does not have.
    ("bpf", ("bpf",)),
    # perf events: a large, often-exploited subsystem (CVE-2013-2094, CVE-2023-2235) that also measures other
    # processes' behaviour (side channels). Profilers are the only users; `perf` does not work in sandboxes.
    ("perf_event_open", ("perf_event_open",)),
    # userfaultfd lets a process stall the kernel at a chosen page fault, the standard way to win kernel races
    # in exploits. Only live migration and some garbage collectors use it.
    ("userfaultfd", ("userfaultfd",)),
    # Loading and unloading kernel modules, and booting another kernel: root-of-the-host operations.
    ("kernel modules", ("init_module", "finit_module", "delete_module")),
    ("kexec", ("kexec_load", "kexec_file_load")),
    ("reboot", ("reboot",)),
    # Swap and process accounting configure the host, not a sandbox.
    ("swap", ("swapon", "swapoff")),
    ("acct", ("acct",)),
    # The clock is the host's: setting it breaks TLS, logs and everyone's timeouts. Reading it (clock_gettime,
    # gettimeofday) is unaffected; adjtimex goes too because one call both reads and sets, and only NTP daemons
    # use it.
    ("clock setting", ("settimeofday", "clock_settime", "clock_adjtime", "adjtimex")),
    # The kernel log shows the host's messages and kernel addresses that defeat KASLR.
    ("syslog", ("syslog",)),
    # Mounts and namespaces: the sandbox's filesystem view and namespaces are built by bwrap before the filter
    # starts, and changing them is how container escapes begin. unshare/setns/mount inside a user namespace
    # reach code (filesystem drivers, netfilter) that is otherwise root-only and has had many bugs.
    (
        "mounts and namespaces",
        (
            "mount",
            "umount2",
            "pivot_root",
            "open_tree",
            "move_mount",
            "fsopen",
            "fsconfig",
            "fsmount",
            "fspick",
            "mount_setattr",
            "open_tree_attr",
            "unshare",
            "setns",
        ),
    ),
    # File handles open any file on a filesystem by its inode number, past the mount and path checks that
    # confine the sandbox (the "shocker" container escape); name_to_handle_at is the other half of that API.
    ("file handles", ("open_by_handle_at", "name_to_handle_at")),
    # Disk quotas are the host's to set.
    ("quotas", ("quotactl", "quotactl_fd")),
    # Obsolete calls: lookup_dcookie (oprofile, gone since 6.8), nfsservctl (gone since 3.1) and uselib (a.out
    # libraries, x86 only) have no users left, only history.
    ("obsolete calls", ("lookup_dcookie", "nfsservctl", "uselib")),
    # vhangup hangs up the controlling terminal, which a sandbox does not have, for everyone using it.
    ("vhangup", ("vhangup",)),
    # Raw I/O port access (x86 only): direct hardware access.
    ("I/O ports", ("iopl", "ioperm")),
    # io_uring: a second system-call interface whose operations seccomp never sees (so they would bypass this
    # very filter), and a prolific source of kernel exploits; Google disables it on ChromeOS, Android and its
    # servers. Programs that use it (some databases, runtimes) fall back to ordinary calls on EPERM.
    ("io_uring", ("io_uring_setup", "io_uring_enter", "io_uring_register")),
    # Inspecting and controlling other processes. Each sandbox has its own PID namespace and uid, so it could
    # only reach its own processes, but those include the non-dumpable shell driver that runs the agent's
    # commands, and ptrace has a long history of privilege-escalation bugs. The cost: strace and gdb (and
    # anything else built on ptrace) do not work in sandboxes.
    ("ptrace", ("ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd")),
    # fanotify watches (and can block) every file access on a mount; only virus scanners and HSMs use it.
    ("fanotify", ("fanotify_init",)),
)

REFUSED: Final[tuple[str, ...]] = tuple(name for _, names in _GROUPS for name in names)

SUMMARY: Final = (
    f"seccomp: {len(REFUSED)} syscalls refused ({', '.join(label for label, _ in _GROUPS)}); "
    "also refused: namespace flags of clone (clone3 gets ENOSYS), TIOCSTI/TIOCLINUX, personality changes"
)


def _arch(machine: str | None) -> _Arch:
    name = (platform.machine() if machine is None else machine).lower()
    name = _ALIASES.get(name, name)
    arch = _ARCHES.get(name)
    if arch is None:
        raise UnsupportedMachine(
            f"no seccomp filter for machine {name or '(unknown)'!r}: only {' and '.join(_ARCHES)} are supported"
        )
    return arch


def syscall_numbers(machine: str | None = None) -> Mapping[str, int]:
    """The numbers of the calls the filter names, on `machine` (default: this one); calls it lacks are left out."""
    arch = _arch(machine)
    found: dict[str, int] = {}
    for name, numbers in _NUMBERS.items():
        number = numbers[arch.column]
        if number is not None:
            found[name] = number
    return MappingProxyType(found)


def _errno(number: int) -> int:
    return SECCOMP_RET_ERRNO | number


class _Assembler:
    """Classic BPF with symbolic jump targets: a jump names a label further down, or a number of instructions to skip.
    Jump offsets are u8, so assembling fails loudly if a target is more than 255 instructions away."""

    def __init__(self) -> None:
        self._code: list[tuple[int, int | str, int | str, int]] = []
        self._labels: dict[str, int] = {}

    def load(self, offset: int) -> None:
        self._code.append((_LD_W_ABS, 0, 0, offset))

    def jeq(self, k: int, jt: int | str = 0, jf: int | str = 0) -> None:
        self._code.append((_JMP_JEQ_K, jt, jf, k))

    def jset(self, k: int, jt: int | str = 0, jf: int | str = 0) -> None:
        self._code.append((_JMP_JSET_K, jt, jf, k))

    def ret(self, value: int) -> None:
        self._code.append((_RET_K, 0, 0, value))

    def label(self, name: str) -> None:
        if name in self._labels:
            raise ValueError(f"label {name!r} defined twice")
        self._labels[name] = len(self._code)

    def _offset(self, at: int, target: int | str) -> int:
        skip = target if isinstance(target, int) else self._labels[target] - at - 1
        if not 0 <= skip <= 255:
            raise ValueError(f"instruction {at}: jump of {skip} does not fit a classic BPF jump")
        return skip

    def assemble(self) -> bytes:
        if len(self._code) > MAX_INSTRUCTIONS:
            raise ValueError(f"{len(self._code)} instructions, more than the kernel's {MAX_INSTRUCTIONS}")
        # struct sock_filter {u16 code; u8 jt; u8 jf; u32 k;}, little-endian like both supported machines.
        return b"".join(
            struct.pack("<HBBI", code, self._offset(at, jt), self._offset(at, jf), k)
            for at, (code, jt, jf, k) in enumerate(self._code)
        )


def program(machine: str | None = None) -> bytes:
    """The compiled filter for `machine` (default: this one, by platform.machine()): an array of struct
    sock_filter, for `bwrap --seccomp FD` or prctl(PR_SET_SECCOMP). Raises UnsupportedMachine."""
    arch = _arch(machine)
    numbers = syscall_numbers(arch.name)
    eperm = _errno(errno.EPERM)
    bpf = _Assembler()

    bpf.load(_ARCH)
    bpf.jeq(arch.audit_arch, jt=1)
    bpf.ret(SECCOMP_RET_KILL_PROCESS)
    bpf.load(_NR)
    if arch.x32_bit:
        bpf.jset(_X32_SYSCALL_BIT, jf=1)
        bpf.ret(eperm)

    # A linear chain of compare-and-return pairs: only ever jumps by 0 or 1, however long the list grows.
    for name in REFUSED:
        number = numbers.get(name)
        if number is not None:
            bpf.jeq(number, jf=1)
            bpf.ret(eperm)

    bpf.jeq(numbers["clone3"], jf=1)
    bpf.ret(_errno(errno.ENOSYS))

    # The kernel takes only the low 32 bits of clone's flags (and of personality's and ioctl's arguments), so
    # setting high bits cannot smuggle a value past these checks.
    bpf.jeq(numbers["clone"], jf="after clone")
    bpf.load(_arg_low(0))
    bpf.jset(NAMESPACE_FLAGS, jf="allow clone")
    bpf.ret(eperm)
    bpf.label("allow clone")
    bpf.ret(SECCOMP_RET_ALLOW)
    bpf.label("after clone")

    bpf.jeq(numbers["ioctl"], jf="after ioctl")
    bpf.load(_arg_low(1))
    bpf.jeq(TIOCSTI, jt="refuse ioctl")
    bpf.jeq(TIOCLINUX, jt="refuse ioctl")
    bpf.ret(SECCOMP_RET_ALLOW)
    bpf.label("refuse ioctl")
    bpf.ret(eperm)
    bpf.label("after ioctl")

    # personality(2) is not refused outright: software that asks for the current persona (0xffffffff) or resets it
    # to the default must keep working, and neither gains anything. Everything else is refused: the flags that
    # matter are exploit aids (ADDR_NO_RANDOMIZE turns ASLR off, READ_IMPLIES_EXEC makes readable memory
    # executable, MMAP_PAGE_ZERO maps page zero for null-pointer exploits), and a coding sandbox has no 32-bit or
    # foreign-OS personas to emulate (so `setarch`/`linux32` do not work).
    bpf.jeq(numbers["personality"], jf="after personality")
    bpf.load(_arg_low(0))
    bpf.jeq(PER_LINUX, jt="allow personality")
    bpf.jeq(PERSONALITY_QUERY, jt="allow personality")
    bpf.ret(eperm)
    bpf.label("allow personality")
    bpf.ret(SECCOMP_RET_ALLOW)
    bpf.label("after personality")

    bpf.ret(SECCOMP_RET_ALLOW)
    return bpf.assemble()


def write_program(path: Path, machine: str | None = None) -> Path:
    """Writes the filter for `machine` (default: this one) to `path` atomically, mode 0644, and returns `path`.
    A sandbox start opens it and hands bwrap the descriptor. Raises UnsupportedMachine."""
    data = program(machine)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            os.fchmod(file.fileno(), 0o644)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def oci_profile(machine: str | None = None) -> dict[str, object]:
    """The same filter as an OCI (Docker, Podman) seccomp profile, for container engines: the refused calls,
    clone with any namespace flag, clone3 (ENOSYS) and the terminal-injecting ioctls. Personality changes are
    left to the engine's own rules (a profile cannot compare one argument with two values in one rule)."""
    arch = _arch(machine)
    numbers = syscall_numbers(arch.name)
    oci_arch = {"x86_64": "SCMP_ARCH_X86_64", "aarch64": "SCMP_ARCH_AARCH64"}[arch.name]
    refused = [name for name in REFUSED if name in numbers]
    rules: list[dict[str, object]] = [
        {"names": refused, "action": "SCMP_ACT_ERRNO", "errnoRet": errno.EPERM},
        {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": errno.ENOSYS},
    ]
    for flag in _flag_bits(NAMESPACE_FLAGS):
        rules.append(
            {
                "names": ["clone"],
                "action": "SCMP_ACT_ERRNO",
                "errnoRet": errno.EPERM,
                "args": [{"index": 0, "value": flag, "valueTwo": flag, "op": "SCMP_CMP_MASKED_EQ"}],
            }
        )
    for request in (TIOCSTI, TIOCLINUX):
        rules.append(
            {
                "names": ["ioctl"],
                "action": "SCMP_ACT_ERRNO",
                "errnoRet": errno.EPERM,
                "args": [{"index": 1, "value": request, "op": "SCMP_CMP_EQ"}],
            }
        )
    return {"defaultAction": "SCMP_ACT_ALLOW", "architectures": [oci_arch], "syscalls": rules}


def _flag_bits(mask: int) -> list[int]:
    return [1 << bit for bit in range(32) if mask & (1 << bit)]
