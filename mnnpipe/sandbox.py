"""Confine the current process before it runs an untrusted model: writes only under given folders,
no sockets. Irreversible; meant for a throw-away child process (or a fork of one).

Layers, each applied where the kernel allows it (Linux only):

* Landlock (Linux >= 5.13; needs no privileges, works as a non-root uid and inside containers
  whose seccomp profile allows the landlock_* calls): every way of changing the filesystem
  (write, truncate, create, remove, rename, link) is denied outside the `writable` folders and
  /dev/null. ABI >= 4 also denies TCP bind/connect; ABI >= 6 keeps abstract unix sockets and
  signals inside the sandbox (the child cannot kill or talk to host processes).
* seccomp (no privileges needed once no_new_privs is set): `socket()` and `io_uring_setup()`
  fail with EPERM for every thread, so no network of any kind and no unix-socket connections
  (io_uring could open sockets behind seccomp's back). Refused 32-bit/x32 syscalls too.

Reading stays allowed everywhere (the runtime's own libraries, the model file); what a model
reads can only leave through the outputs the step computes from it. Threads that exist before
`confine` keep their freedom (Landlock applies to the calling thread), so call it while the
process is single-threaded: right after fork, or before anything starts a thread pool.

Policy (env MNNPIPE_CONFINE): "auto" (default) applies what is available and warns about what is
not; "required" fails (ConfinementError) unless both the filesystem and the network layer are
in place; "off" applies nothing (for debugging; warns). This module imports only the standard
library, so the MNN tool worker can load it by path.
"""

from __future__ import annotations

import ctypes
import os
import platform
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

ENV = "MNNPIPE_CONFINE"
POLICIES = ("auto", "required", "off")

# --------------------------------------------------------------------------- Landlock constants
_SYS_LANDLOCK_CREATE_RULESET, _SYS_LANDLOCK_ADD_RULE, _SYS_LANDLOCK_RESTRICT_SELF = 444, 445, 446
_LANDLOCK_CREATE_RULESET_VERSION = 1
_LANDLOCK_RULE_PATH_BENEATH = 1
_FS_WRITE_FILE = 1 << 1
_FS_REMOVE_DIR, _FS_REMOVE_FILE = 1 << 4, 1 << 5
_FS_MAKE = (1 << 6) | (1 << 7) | (1 << 8) | (1 << 9) | (1 << 10) | (1 << 11) | (1 << 12)  # char dir reg sock fifo block sym
_FS_REFER = 1 << 13  # ABI 2
_FS_TRUNCATE = 1 << 14  # ABI 3
_FILE_RIGHTS = _FS_WRITE_FILE | _FS_TRUNCATE  # the handled rights a rule on a single file may grant
_NET_BIND_TCP, _NET_CONNECT_TCP = 1 << 0, 1 << 1  # ABI 4
_SCOPE_ABSTRACT_UNIX_SOCKET, _SCOPE_SIGNAL = 1 << 0, 1 << 1  # ABI 6

# --------------------------------------------------------------------------- seccomp constants
_PR_SET_NO_NEW_PRIVS = 38
_SECCOMP_SET_MODE_FILTER, _SECCOMP_FILTER_FLAG_TSYNC = 1, 1
_SECCOMP_RET_ALLOW, _SECCOMP_RET_ERRNO = 0x7FFF0000, 0x00050000
_EPERM = 1
_BPF_LD_W_ABS, _BPF_JEQ_K, _BPF_JGE_K, _BPF_RET_K = 0x20, 0x15, 0x35, 0x06
# machine -> (AUDIT_ARCH, seccomp syscall number, syscalls to refuse: socket, io_uring_setup)
_ARCH = {
    "x86_64": (0xC000003E, 317, (41, 425)),
    "aarch64": (0xC00000B7, 277, (198, 425)),
}
_X32_SYSCALL_BIT = 0x40000000


class ConfinementError(RuntimeError):
    """MNNPIPE_CONFINE=required and a layer is not available here."""


@dataclass
class Confinement:
    """What `confine` put in place, for logs and results."""

    policy: str
    filesystem: str | None = None  # e.g. "landlock ABI 7"
    network: str | None = None  # e.g. "seccomp: socket() refused"
    missing: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return self.filesystem is not None and self.network is not None

    def describe(self) -> str:
        have = ", ".join(x for x in (self.filesystem, self.network) if x) or "nothing"
        return have + (f"; missing: {'; '.join(self.missing)}" if self.missing else "")


def policy() -> str:
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if value not in POLICIES:
        raise ConfinementError(f"{ENV}: expected one of {', '.join(POLICIES)}, got {value!r}")
    return value


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return libc


def landlock_abi() -> int:
    """The kernel's Landlock ABI version; 0 where Landlock is missing, disabled or blocked."""
    if platform.system() != "Linux":
        return 0
    abi = _libc().syscall(_SYS_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(_LANDLOCK_CREATE_RULESET_VERSION))
    return max(0, int(abi))


def _landlock(writable: Sequence[Path], abi: int) -> str:
    libc = _libc()
    handled_fs = _FS_WRITE_FILE | _FS_REMOVE_DIR | _FS_REMOVE_FILE | _FS_MAKE
    if abi >= 2:
        handled_fs |= _FS_REFER
    if abi >= 3:
        handled_fs |= _FS_TRUNCATE
    handled_net = _NET_BIND_TCP | _NET_CONNECT_TCP if abi >= 4 else 0
    scoped = _SCOPE_ABSTRACT_UNIX_SOCKET | _SCOPE_SIGNAL if abi >= 6 else 0
    attr = struct.pack("<QQQ", handled_fs, handled_net, scoped)[: 8 if abi < 4 else 16 if abi < 6 else 24]
    buf = ctypes.create_string_buffer(attr, len(attr))
    ruleset = libc.syscall(_SYS_LANDLOCK_CREATE_RULESET, buf, ctypes.c_size_t(len(attr)), ctypes.c_uint32(0))
    if ruleset < 0:
        raise OSError(ctypes.get_errno(), "landlock_create_ruleset failed")
    try:
        targets = [(Path(p), handled_fs) for p in writable] + [(Path(os.devnull), handled_fs & _FILE_RIGHTS)]
        for path, rights in targets:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            try:
                rule = ctypes.create_string_buffer(struct.pack("<Qi", rights, fd), 12)
                if libc.syscall(_SYS_LANDLOCK_ADD_RULE, ctypes.c_int(ruleset), ctypes.c_int(_LANDLOCK_RULE_PATH_BENEATH), rule, ctypes.c_uint32(0)) < 0:
                    raise OSError(ctypes.get_errno(), f"landlock_add_rule failed for {path}")
            finally:
                os.close(fd)
        if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")
        if libc.syscall(_SYS_LANDLOCK_RESTRICT_SELF, ctypes.c_int(ruleset), ctypes.c_uint32(0)) < 0:
            raise OSError(ctypes.get_errno(), "landlock_restrict_self failed")
    finally:
        os.close(ruleset)
    extra = (", TCP refused" if abi >= 4 else "") + (", signals/abstract sockets scoped" if abi >= 6 else "")
    return f"landlock ABI {abi}: writes only under {len(writable)} folder(s){extra}"


def _bpf(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("<HBBI", code, jt, jf, k)


def _seccomp() -> str:
    machine = platform.machine()
    if machine not in _ARCH:
        raise OSError(0, f"no seccomp filter for {machine}")
    audit_arch, sys_seccomp, denied = _ARCH[machine]
    checks = ([_X32_SYSCALL_BIT] if machine == "x86_64" else []) + list(denied)
    n = 4 + len(checks) + 2  # ld arch, jeq arch, ret deny, ld nr, checks..., ret allow, ret deny
    deny_at = n - 1
    prog = [
        _bpf(_BPF_LD_W_ABS, 0, 0, 4),  # seccomp_data.arch
        _bpf(_BPF_JEQ_K, 1, 0, audit_arch),
        _bpf(_BPF_RET_K, 0, 0, _SECCOMP_RET_ERRNO | _EPERM),  # a foreign syscall ABI (int 0x80)
        _bpf(_BPF_LD_W_ABS, 0, 0, 0),  # seccomp_data.nr
    ]
    for i, nr in enumerate(checks):
        here = 4 + i
        op = _BPF_JGE_K if nr == _X32_SYSCALL_BIT else _BPF_JEQ_K
        prog.append(_bpf(op, deny_at - here - 1, 0, nr))
    prog += [_bpf(_BPF_RET_K, 0, 0, _SECCOMP_RET_ALLOW), _bpf(_BPF_RET_K, 0, 0, _SECCOMP_RET_ERRNO | _EPERM)]
    filters = ctypes.create_string_buffer(b"".join(prog), 8 * len(prog))

    class _Fprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = _Fprog(len(prog), ctypes.cast(filters, ctypes.c_void_p))
    libc = _libc()
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")
    if libc.syscall(sys_seccomp, _SECCOMP_SET_MODE_FILTER, _SECCOMP_FILTER_FLAG_TSYNC, ctypes.byref(fprog)) != 0:
        raise OSError(ctypes.get_errno(), "seccomp(SET_MODE_FILTER) failed")
    return "seccomp: socket() and io_uring refused"


def confine(writable: Sequence[str | os.PathLike[str]], mode: str | None = None) -> Confinement:
    """Confine this process to writing under `writable` (existing folders), without sockets.

    Raises ConfinementError under policy "required" when a layer is missing; otherwise returns
    what was applied (the caller logs `describe()` when it is not `complete`).
    """
    mode = mode or policy()
    result = Confinement(policy=mode)
    if mode == "off":
        result.missing.append(f"{ENV}=off")
        return result
    folders = [Path(p).resolve() for p in writable]
    abi = landlock_abi()
    if abi:
        try:
            result.filesystem = _landlock(folders, abi)
        except OSError as exc:
            result.missing.append(f"filesystem: Landlock failed ({exc.strerror or exc})")
    else:
        result.missing.append(f"filesystem: no Landlock on this kernel ({platform.system()} {platform.release()})")
    try:
        result.network = _seccomp()
    except (OSError, AttributeError) as exc:
        result.missing.append(f"network: seccomp failed ({getattr(exc, 'strerror', None) or exc})")
    if mode == "required" and not result.complete:
        raise ConfinementError(f"{ENV}=required but this process cannot be confined: {'; '.join(result.missing)}")
    return result


def check_confine_policy() -> None:
    """An invalid MNNPIPE_CONFINE is a configuration error (exit 2), found before any child starts."""
    from .errors import SpecError

    try:
        policy()
    except ConfinementError as exc:
        raise SpecError(str(exc)) from None
