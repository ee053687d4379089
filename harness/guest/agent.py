"""socklab guest agent: runs socket system calls one JSON line at a time on stdin/stdout (stdlib only)."""

from __future__ import annotations

import argparse
import base64
import ctypes
import errno as errno_mod
import fcntl
import json
import os
import resource
import signal
import socket
import struct
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

PROTOCOL = 1

AF_UNSPEC, AF_UNIX, AF_INET, AF_INET6 = 0, 1, 2, 10
SOL_IP, SOL_IPV6 = 0, 41
IP_RECVERR, IPV6_RECVERR = 11, 25
MSG_ERRQUEUE, MSG_ZEROCOPY = 0x2000, 0x4000000
SO_EE_ORIGIN_ZEROCOPY = 5
POLLIN, POLLOUT = 0x1, 0x4
F_DUPFD, F_GETFD, F_SETFD, F_GETFL, F_SETFL, F_DUPFD_CLOEXEC = 0, 1, 2, 3, 4, 1030
SOCKADDR_STORAGE = 128  # sizeof(struct sockaddr_storage): move_addr_to_kernel() rejects anything longer
MAX_BUFFER = 64 << 20  # largest send/recv buffer the agent allocates for one step
MAX_OPTLEN = 64 << 10
ZEROCOPY_KEEP_BYTES = 64 << 20
DEFAULT_BLOCK_MS = 2000
# Python's errno.errorcode picks aliases the kernel sources do not use (ENOTSUP for 95).
KERNEL_ERRNO_NAMES = {errno_mod.EOPNOTSUPP: "EOPNOTSUPP", errno_mod.EAGAIN: "EAGAIN", errno_mod.EDEADLK: "EDEADLK"}

# struct sock_extended_err (include/uapi/linux/errqueue.h): ee_errno, ee_origin, ee_type,
# ee_code, ee_pad, ee_info, ee_data. For MSG_ZEROCOPY ee_info..ee_data is the range of send
# ids completed (lo..hi) and ee_code is SO_EE_CODE_ZEROCOPY_COPIED when the kernel copied.
SOCK_EXTENDED_ERR = struct.Struct("=IBBBBII")
CMSG_HEADER = struct.Struct("=Qii")  # struct cmsghdr on 64-bit: size_t cmsg_len, int level, int type


def cmsg_align(length: int) -> int:
    return (length + 7) & ~7


class Iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class MsgHdr(ctypes.Structure):
    _fields_ = [
        ("msg_name", ctypes.c_void_p), ("msg_namelen", ctypes.c_uint32),
        ("msg_iov", ctypes.POINTER(Iovec)), ("msg_iovlen", ctypes.c_size_t),
        ("msg_control", ctypes.c_void_p), ("msg_controllen", ctypes.c_size_t),
        ("msg_flags", ctypes.c_int),
    ]


class PollFd(ctypes.Structure):
    _fields_ = [("fd", ctypes.c_int), ("events", ctypes.c_short), ("revents", ctypes.c_short)]


class EpollEvent(ctypes.Structure):
    """struct epoll_event: packed on x86-64 (include/uapi/linux/eventpoll.h, EPOLL_PACKED)."""

    _pack_ = 1
    _fields_ = [("events", ctypes.c_uint32), ("data", ctypes.c_uint64)]


def load_libc() -> ctypes.CDLL:
    """libc with prototypes, so ctypes passes socklen_t and size_t at their real widths."""
    libc = ctypes.CDLL(None, use_errno=True)
    i, u32, size, ssize, vp = ctypes.c_int, ctypes.c_uint32, ctypes.c_size_t, ctypes.c_ssize_t, ctypes.c_void_p
    u32p = ctypes.POINTER(ctypes.c_uint32)
    prototypes = {
        "socket": (i, [i, i, i]),
        "bind": (i, [i, vp, u32]),
        "connect": (i, [i, vp, u32]),
        "listen": (i, [i, i]),
        "accept": (i, [i, vp, u32p]),
        "accept4": (i, [i, vp, u32p, i]),
        "close": (i, [i]),
        "shutdown": (i, [i, i]),
        "getsockname": (i, [i, vp, u32p]),
        "getpeername": (i, [i, vp, u32p]),
        "setsockopt": (i, [i, i, i, vp, u32]),
        "getsockopt": (i, [i, i, i, vp, u32p]),
        "send": (ssize, [i, vp, size, i]),
        "sendto": (ssize, [i, vp, size, i, vp, u32]),
        "sendmsg": (ssize, [i, ctypes.POINTER(MsgHdr), i]),
        "recvfrom": (ssize, [i, vp, size, i, vp, u32p]),
        "recvmsg": (ssize, [i, ctypes.POINTER(MsgHdr), i]),
        "poll": (i, [ctypes.POINTER(PollFd), ctypes.c_ulong, i]),
        "epoll_create1": (i, [i]),
        "epoll_ctl": (i, [i, i, i, ctypes.POINTER(EpollEvent)]),
        "epoll_wait": (i, [i, ctypes.POINTER(EpollEvent), i, i]),
    }
    for name, (restype, argtypes) in prototypes.items():
        func = getattr(libc, name)
        func.restype, func.argtypes = restype, argtypes
    return libc


class BadRequest(Exception):
    """The request cannot be turned into a system call; the message names the problem."""


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one op produced: the return value, the errno (0 for none), extra fields, and whether it blocked."""

    ret: Any
    errno: int = 0
    extra: dict = field(default_factory=dict)
    blocked: bool = False


# -- argument decoding --------------------------------------------------------------------------

_MISSING = object()


def to_c_int(value: int) -> int:
    """Truncate to a 32-bit signed int, as the C ABI would pass a wider value."""
    return ((value + 2**31) % 2**32) - 2**31


def int_arg(args: dict, name: str, default: Any = _MISSING) -> int:
    value = args.get(name, _MISSING)
    if value is _MISSING or value is None:
        if default is _MISSING:
            raise BadRequest(f"missing argument {name!r}")
        return default
    if isinstance(value, bool):
        return int(value)
    if not isinstance(value, int):
        raise BadRequest(f"argument {name!r} must be an integer, not {value!r} (the host resolves constant names)")
    return to_c_int(value)


def fd_arg(args: dict, name: str = "fd") -> int:
    value = args.get(name, _MISSING)
    if value is _MISSING:
        raise BadRequest(f"missing argument {name!r}")
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"argument {name!r} must be a descriptor number, not {value!r}")
    return to_c_int(value)


def bytes_value(value: Any, name: str) -> bytes:
    """Bytes from a JSON value: text is UTF-8, {"$b64": ...} is base64."""
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, dict) and set(value) == {"$b64"} and isinstance(value["$b64"], str):
        try:
            return base64.b64decode(value["$b64"], validate=True)
        except ValueError as exc:
            raise BadRequest(f"argument {name!r}: bad base64 ({exc})") from None
    raise BadRequest(f"argument {name!r} must be text or {{\"$b64\": ...}}, not {type(value).__name__}")


def encode_bytes(data: bytes) -> dict:
    return {"$b64": base64.b64encode(data).decode()}


def payload_arg(args: dict) -> tuple[bytes | None, int]:
    """(buffer, length) for send: ``data`` as given, or ``length`` zero bytes (None when length < 0)."""
    if args.get("data") is not None:
        data = bytes_value(args["data"], "data")
        return data, len(data)
    length = args.get("length", args.get("len", 0))
    if isinstance(length, bool) or not isinstance(length, int):
        raise BadRequest(f"argument 'length' must be an integer, not {length!r}")
    if length < 0:
        # The kernel sees a huge size_t; hand it no buffer so a fault is all it can find.
        return None, length & 0xFFFFFFFFFFFFFFFF
    if length > MAX_BUFFER:
        raise BadRequest(f"length {length} exceeds the agent's {MAX_BUFFER}-byte buffer limit")
    return bytes(length), length


def recv_length_arg(args: dict) -> int:
    length = args.get("length", args.get("len", 65536))
    if isinstance(length, bool) or not isinstance(length, int):
        raise BadRequest(f"argument 'length' must be an integer, not {length!r}")
    if length > MAX_BUFFER:
        raise BadRequest(f"length {length} exceeds the agent's {MAX_BUFFER}-byte buffer limit")
    return length


# -- socket addresses ---------------------------------------------------------------------------

def _ip_bytes(host: str) -> tuple[int, bytes, int]:
    """(natural family, packed address, scope id) for IP text; '%ifname' suffixes give the scope."""
    scope = 0
    if "%" in host:
        host, _, ifname = host.partition("%")
        try:
            scope = int(ifname) if ifname.isdigit() else socket.if_nametoindex(ifname)
        except OSError:
            raise BadRequest(f"no interface {ifname!r} for the IPv6 scope") from None
    for family in (AF_INET, AF_INET6):
        try:
            return family, socket.inet_pton(family, host), scope
        except OSError:
            continue
    raise BadRequest(f"{host!r} is not an IP address (inet_pton rejects it)")


def encode_sockaddr(addr: Any, family_override: Any = None) -> tuple[bytes, int]:
    """(sockaddr bytes, default addrlen) for [host, port(, flowinfo, scope)], {"host", "port"} or a path.

    A ``family`` override replaces sa_family (and the default length) while the rest keeps the
    layout the address text implies, so a step can hand the kernel a mismatched family.
    """
    flowinfo = 0
    if isinstance(addr, dict):
        family_override = addr.get("family", family_override)
        path = addr.get("path")
        if path is not None:
            addr = path
        else:
            addr = [addr.get("host", addr.get("addr", "")), addr.get("port", 0)]
    if family_override is not None and (isinstance(family_override, bool) or not isinstance(family_override, int)):
        raise BadRequest(f"family {family_override!r} must be an integer")
    if isinstance(addr, str):
        family = AF_UNIX if family_override is None else family_override
        # Abstract names (leading '@') start with a NUL and carry no terminator (unix_mkname).
        path = b"\0" + addr[1:].encode() if addr.startswith("@") else addr.encode()
        if len(path) > 108:
            raise BadRequest(f"path of {len(path)} bytes does not fit sun_path[108]")
        raw = struct.pack("=H", family & 0xFFFF) + path
        return raw, 2 + len(path) + (0 if addr.startswith("@") else 1)
    if not isinstance(addr, (list, tuple)) or len(addr) < 2:
        raise BadRequest(f"cannot read {addr!r} as a socket address: use [host, port], a dict or a path")
    host, port = addr[0], addr[1]
    if len(addr) >= 3:
        flowinfo = addr[2]
    scope = addr[3] if len(addr) >= 4 else 0
    if not isinstance(host, str) or isinstance(port, bool) or not isinstance(port, int):
        raise BadRequest(f"cannot read {addr!r} as [host, port]")
    if not 0 <= port <= 0xFFFF:
        raise BadRequest(f"port {port} does not fit the 16-bit sin_port field")
    if not isinstance(flowinfo, int) or not isinstance(scope, int):
        raise BadRequest(f"flowinfo and scope id in {addr!r} must be integers")
    if host:
        natural, packed, text_scope = _ip_bytes(host)
        scope = scope or text_scope
    else:
        natural = AF_INET6 if family_override == AF_INET6 else AF_INET
        packed = bytes(16 if natural == AF_INET6 else 4)
    family = natural if family_override is None else family_override
    if natural == AF_INET6:
        raw = struct.pack("=H", family & 0xFFFF) + struct.pack("!HI", port, flowinfo & 0xFFFFFFFF) + packed \
            + struct.pack("=I", scope & 0xFFFFFFFF)
    else:
        raw = struct.pack("=H", family & 0xFFFF) + struct.pack("!H", port) + packed + bytes(8)
    default_len = 28 if family == AF_INET6 else 16 if family in (AF_INET, AF_UNSPEC) else len(raw)
    return raw, default_len


def decode_sockaddr(raw: bytes) -> Any:
    """[host, port] for AF_INET, [host, port, flowinfo, scope_id] for AF_INET6, a path (or None) for AF_UNIX."""
    if len(raw) < 2:
        return None
    family = struct.unpack_from("=H", raw)[0]
    if family == AF_INET and len(raw) >= 8:
        return [socket.inet_ntop(AF_INET, raw[4:8]), struct.unpack_from("!H", raw, 2)[0]]
    if family == AF_INET6 and len(raw) >= 24:
        port, flowinfo = struct.unpack_from("!HI", raw, 2)
        scope = struct.unpack_from("=I", raw, 24)[0] if len(raw) >= 28 else 0
        return [socket.inet_ntop(AF_INET6, raw[8:24]), port, flowinfo, scope]
    if family == AF_UNIX:
        path = raw[2:]
        if not path:
            return None  # unnamed: autobind never happened
        if path[0] == 0:
            return "@" + path[1:].decode(errors="surrogateescape")
        return path.split(b"\0", 1)[0].decode(errors="surrogateescape")
    return {"family": family, "raw": encode_bytes(raw)}


# -- the session --------------------------------------------------------------------------------

class BlockGuard:
    """Interrupts a system call that would block past ``ms`` with SIGALRM (no SA_RESTART: EINTR).

    The itimer repeats every 50 ms so a signal that lands just before the call enters the
    kernel cannot leave it sleeping for ever.
    """

    def __init__(self) -> None:
        signal.signal(signal.SIGALRM, lambda signum, frame: None)
        self.ms = 0

    def __enter__(self) -> "BlockGuard":
        if self.ms > 0:
            signal.setitimer(signal.ITIMER_REAL, self.ms / 1000.0, 0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.ms > 0:
            signal.setitimer(signal.ITIMER_REAL, 0, 0)


class Session:
    """One process's socket calls: the descriptors it opened and everything to undo at the end.

    Request ``{"id": 7, "op": "bind", "args": {"fd": 3, "addr": ["198.51.100.2", 7000]}}``,
    response ``{"id": 7, "op": "bind", "ret": 0, "errno": null, "t_ns": ..., "dt_ns": ...,
    "extra": {}}``. Calls go through libc with ctypes so the kernel sees what a C program
    would pass: Python's socket module clamps negative listen backlogs to 0 and adds
    SOCK_CLOEXEC to accept(). Sockets are closed at EOF, on ``reset``, SIGTERM or SIGHUP.
    """

    def __init__(self, reserved_fds: set[int], block_ms: int = DEFAULT_BLOCK_MS) -> None:
        self.libc = load_libc()
        self.reserved = reserved_fds
        self.block_ms = block_ms
        self.guard = BlockGuard()
        self.open_fds: set[int] = set()
        self.unix_paths: set[str] = set()
        self.sysctl_originals: dict[str, str] = {}
        self.zerocopy_buffers: list[ctypes.Array] = []
        self.zerocopy_bytes = 0
        self.t_ns = 0
        self.dt_ns = 0
        self.handlers: dict[str, Callable[[dict], Outcome]] = {
            name[3:]: getattr(self, name) for name in dir(self) if name.startswith("op_")
        }
        self.handlers["sendto"] = self.handlers["send"]
        self.handlers["recvfrom"] = self.handlers["recv"]

    # -- plumbing ------------------------------------------------------------------------------

    def syscall(self, func: Callable[..., int], *args: Any, block_ms: int | None = None) -> tuple[int, int]:
        """Run one libc call under the block guard; record when it started and how long it took."""
        self.guard.ms = self.block_ms if block_ms is None else block_ms
        ctypes.set_errno(0)
        with self.guard:
            start = time.monotonic_ns()
            ret = func(*args)
            end = time.monotonic_ns()
        self.t_ns, self.dt_ns = start, end - start
        return ret, (ctypes.get_errno() if ret < 0 else 0)

    def was_blocked(self, err: int) -> bool:
        """EINTR after the guard's deadline: the call would have slept on (only SIGALRM interrupts us)."""
        return err == errno_mod.EINTR and self.guard.ms > 0 and self.dt_ns >= self.guard.ms * 900_000

    def blocked_or(self, ret: Any, err: int, extra: dict | None = None) -> Outcome:
        if self.was_blocked(err):
            return Outcome(None, 0, {"blocked_after_ms": self.dt_ns // 1_000_000, **(extra or {})}, blocked=True)
        return Outcome(ret if err == 0 else -1, err, extra)

    def check_fd(self, fd: int) -> Outcome | None:
        """The agent's own pipes are not the scenario's: report them as not open."""
        if fd in self.reserved:
            self.t_ns, self.dt_ns = time.monotonic_ns(), 0
            return Outcome(-1, errno_mod.EBADF, {"agent": f"fd {fd} is one of the agent's own descriptors"})
        return None

    def block_arg(self, args: dict) -> int | None:
        if "block_ms" not in args:
            return None
        value = int_arg(args, "block_ms")
        if value < 0:
            raise BadRequest("block_ms must be >= 0 (0 lets the call block for ever)")
        return value

    def track(self, fd: int) -> None:
        if fd >= 0:
            self.open_fds.add(fd)

    # -- sockets -------------------------------------------------------------------------------

    def op_socket(self, args: dict) -> Outcome:
        family, sock_type = int_arg(args, "family"), int_arg(args, "type")
        protocol = int_arg(args, "protocol", 0)
        ret, err = self.syscall(self.libc.socket, family, sock_type, protocol)
        self.track(ret)
        return Outcome(ret, err)

    def _address_call(self, func: Callable[..., int], args: dict) -> tuple[int, int, bytes]:
        fd = fd_arg(args)
        raw, default_len = encode_sockaddr(args.get("addr"), args.get("family"))
        addrlen = args.get("addrlen")
        if addrlen is None:
            addrlen = default_len
        elif isinstance(addrlen, bool) or not isinstance(addrlen, int):
            raise BadRequest(f"addrlen {addrlen!r} must be an integer")
        # Zero-padded sockaddr_storage: a long addrlen reads zeros, never agent memory; the kernel
        # rejects addrlen > 128 (and negative ones, as int) in move_addr_to_kernel() before copying.
        buffer = ctypes.create_string_buffer(raw, SOCKADDR_STORAGE)
        ret, err = self.syscall(func, fd, buffer, addrlen & 0xFFFFFFFF, block_ms=self.block_arg(args))
        return ret, err, raw

    def op_bind(self, args: dict) -> Outcome:
        if args.get("addr") is None:
            raise BadRequest("missing argument 'addr'")
        refused = self.check_fd(fd_arg(args))
        if refused:
            return refused
        ret, err, raw = self._address_call(self.libc.bind, args)
        if ret == 0 and isinstance(args.get("addr"), str) and not args["addr"].startswith("@"):
            self.unix_paths.add(args["addr"])
        return Outcome(ret, err)

    def op_connect(self, args: dict) -> Outcome:
        if args.get("addr") is None:
            raise BadRequest("missing argument 'addr'")
        refused = self.check_fd(fd_arg(args))
        if refused:
            return refused
        ret, err, _ = self._address_call(self.libc.connect, args)
        return self.blocked_or(ret, err)

    def op_listen(self, args: dict) -> Outcome:
        fd, backlog = fd_arg(args), int_arg(args, "backlog")
        refused = self.check_fd(fd)
        if refused:
            return refused
        # Raw listen(2): __sys_listen() compares (unsigned)backlog > somaxconn, so a negative
        # backlog becomes somaxconn; Python's sock.listen() would have turned it into 0.
        return Outcome(*self.syscall(self.libc.listen, fd, backlog))

    def _accept(self, args: dict, flags: int | None) -> Outcome:
        fd = fd_arg(args)
        refused = self.check_fd(fd)
        if refused:
            return refused
        name = ctypes.create_string_buffer(SOCKADDR_STORAGE)
        namelen = ctypes.c_uint32(SOCKADDR_STORAGE)
        if flags is None:
            # Plain accept(2): Python's socket.accept() would add SOCK_CLOEXEC behind our back.
            ret, err = self.syscall(self.libc.accept, fd, name, ctypes.byref(namelen), block_ms=self.block_arg(args))
        else:
            ret, err = self.syscall(self.libc.accept4, fd, name, ctypes.byref(namelen), flags,
                                    block_ms=self.block_arg(args))
        self.track(ret)
        extra = {"peer": decode_sockaddr(name.raw[:min(namelen.value, SOCKADDR_STORAGE)])} if ret >= 0 else {}
        return self.blocked_or(ret, err, extra)

    def op_accept(self, args: dict) -> Outcome:
        return self._accept(args, None)

    def op_accept4(self, args: dict) -> Outcome:
        return self._accept(args, int_arg(args, "flags", 0))

    def op_close(self, args: dict) -> Outcome:
        fd = fd_arg(args)
        refused = self.check_fd(fd)
        if refused:
            return refused
        # close() can sleep: SO_LINGER with a timeout waits for unsent data.
        ret, err = self.syscall(self.libc.close, fd, block_ms=self.block_arg(args))
        if err != errno_mod.EBADF:
            self.open_fds.discard(fd)  # Linux frees the descriptor even when close() reports EINTR/EIO
        return Outcome(ret, err)

    def op_shutdown(self, args: dict) -> Outcome:
        fd, how = fd_arg(args), int_arg(args, "how")
        return self.check_fd(fd) or Outcome(*self.syscall(self.libc.shutdown, fd, how))

    def _getname(self, func: Callable[..., int], args: dict) -> Outcome:
        fd = fd_arg(args)
        refused = self.check_fd(fd)
        if refused:
            return refused
        name = ctypes.create_string_buffer(SOCKADDR_STORAGE)
        namelen = ctypes.c_uint32(SOCKADDR_STORAGE)
        ret, err = self.syscall(func, fd, name, ctypes.byref(namelen))
        if err:
            return Outcome(-1, err)
        return Outcome(decode_sockaddr(name.raw[:min(namelen.value, SOCKADDR_STORAGE)]), 0,
                       {"addrlen": namelen.value})

    def op_getsockname(self, args: dict) -> Outcome:
        return self._getname(self.libc.getsockname, args)

    def op_getpeername(self, args: dict) -> Outcome:
        return self._getname(self.libc.getpeername, args)

    def op_setsockopt(self, args: dict) -> Outcome:
        fd, level, optname = fd_arg(args), int_arg(args, "level"), int_arg(args, "optname")
        value = args.get("value", args.get("optval", _MISSING))
        if value is _MISSING:
            raise BadRequest("missing argument 'value'")
        if isinstance(value, bool) or isinstance(value, int):
            raw = struct.pack("=i", to_c_int(int(value)))
        elif isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raw = struct.pack(f"={len(value)}i", *(to_c_int(v) for v in value))  # e.g. struct linger
        else:
            raw = bytes_value(value, "value")
        optlen = int_arg(args, "optlen", len(raw))
        if optlen > MAX_OPTLEN:
            raise BadRequest(f"optlen {optlen} exceeds {MAX_OPTLEN}")
        refused = self.check_fd(fd)
        if refused:
            return refused
        buffer = ctypes.create_string_buffer(raw, max(len(raw), optlen, 1))
        return Outcome(*self.syscall(self.libc.setsockopt, fd, level, optname, buffer, optlen & 0xFFFFFFFF))

    def op_getsockopt(self, args: dict) -> Outcome:
        fd, level, optname = fd_arg(args), int_arg(args, "level"), int_arg(args, "optname")
        optlen = int_arg(args, "optlen", 4)
        if optlen > MAX_OPTLEN:
            raise BadRequest(f"optlen {optlen} exceeds {MAX_OPTLEN}")
        refused = self.check_fd(fd)
        if refused:
            return refused
        buffer = ctypes.create_string_buffer(max(optlen, 1))
        length = ctypes.c_uint32(optlen & 0xFFFFFFFF)
        ret, err = self.syscall(self.libc.getsockopt, fd, level, optname, buffer, ctypes.byref(length))
        if err:
            return Outcome(-1, err)
        got = buffer.raw[:min(length.value, len(buffer))]
        if len(got) == 4:
            value: Any = struct.unpack("=i", got)[0]
        elif len(got) == 1:
            value = got[0]  # some IP_* options answer with one byte when optlen < sizeof(int)
        else:
            value = encode_bytes(got)
        return Outcome(value, 0, {"optlen": length.value})

    # -- data ----------------------------------------------------------------------------------

    def _keep_for_zerocopy(self, buffer: ctypes.Array, flags: int) -> None:
        """MSG_ZEROCOPY pins the pages: they must not be reused until the completion arrives."""
        if flags & MSG_ZEROCOPY and buffer is not None:
            self.zerocopy_buffers.append(buffer)
            self.zerocopy_bytes += len(buffer)
            while self.zerocopy_bytes > ZEROCOPY_KEEP_BYTES and len(self.zerocopy_buffers) > 1:
                self.zerocopy_bytes -= len(self.zerocopy_buffers.pop(0))

    def _sigpipe_taken(self) -> bool:
        """SIGPIPE stays blocked in the agent; a send that raised it leaves it pending (see main)."""
        if signal.SIGPIPE in signal.sigpending():
            signal.sigtimedwait([signal.SIGPIPE], 0)
            return True
        return False

    def op_send(self, args: dict) -> Outcome:
        fd, flags = fd_arg(args), int_arg(args, "flags", 0)
        data, length = payload_arg(args)
        dest = None
        if args.get("addr") is not None:
            raw, default_len = encode_sockaddr(args["addr"], args.get("family"))
            addrlen = args.get("addrlen", default_len)
            dest = (ctypes.create_string_buffer(raw, SOCKADDR_STORAGE), addrlen & 0xFFFFFFFF)
        refused = self.check_fd(fd)
        if refused:
            return refused
        buffer = None if data is None else ctypes.create_string_buffer(data, max(len(data), 1))
        self._sigpipe_taken()
        block_ms = self.block_arg(args)
        if dest is None:
            ret, err = self.syscall(self.libc.send, fd, buffer, length, flags, block_ms=block_ms)
        else:
            ret, err = self.syscall(self.libc.sendto, fd, buffer, length, flags, dest[0], dest[1], block_ms=block_ms)
        return self._sent(ret, err, buffer, flags)

    def _sent(self, ret: int, err: int, buffer: Any, flags: int) -> Outcome:
        extra: dict = {}
        if self._sigpipe_taken():
            extra["signal"] = "SIGPIPE"  # sk_stream_error(): EPIPE without MSG_NOSIGNAL also raises it
        if ret >= 0:
            self._keep_for_zerocopy(buffer, flags)
        if ret >= 0 and 0 < self.guard.ms * 900_000 <= self.dt_ns:
            extra["interrupted"] = True  # a blocking send cut short by the guard returns what it copied
        return self.blocked_or(ret, err, extra)

    def op_sendmsg(self, args: dict) -> Outcome:
        fd, flags = fd_arg(args), int_arg(args, "flags", 0)
        data, length = payload_arg(args)
        name = None
        namelen = 0
        if args.get("addr") is not None:
            raw, default_len = encode_sockaddr(args["addr"], args.get("family"))
            name = ctypes.create_string_buffer(raw, SOCKADDR_STORAGE)
            namelen = args.get("addrlen", default_len) & 0xFFFFFFFF
        refused = self.check_fd(fd)
        if refused:
            return refused
        buffer = None if data is None else ctypes.create_string_buffer(data, max(len(data), 1))
        iov = Iovec(ctypes.cast(buffer, ctypes.c_void_p) if buffer is not None else None, length)
        msg = MsgHdr(ctypes.cast(name, ctypes.c_void_p) if name is not None else None, namelen,
                     ctypes.pointer(iov), 1, None, 0, 0)
        self._sigpipe_taken()
        ret, err = self.syscall(self.libc.sendmsg, fd, ctypes.byref(msg), flags, block_ms=self.block_arg(args))
        return self._sent(ret, err, buffer, flags)

    def op_recv(self, args: dict) -> Outcome:
        fd, flags = fd_arg(args), int_arg(args, "flags", 0)
        length = recv_length_arg(args)
        refused = self.check_fd(fd)
        if refused:
            return refused
        buffer = ctypes.create_string_buffer(max(length, 1)) if length >= 0 else None
        size = length & 0xFFFFFFFFFFFFFFFF
        name = ctypes.create_string_buffer(SOCKADDR_STORAGE)
        namelen = ctypes.c_uint32(SOCKADDR_STORAGE)
        # recv(2) is recvfrom() without an address; with MSG_ERRQUEUE it dequeues a notification
        # but has no room for its cmsg, so the sock_extended_err is lost (MSG_CTRUNC).
        ret, err = self.syscall(self.libc.recvfrom, fd, buffer, size, flags, name, ctypes.byref(namelen),
                                block_ms=self.block_arg(args))
        extra: dict = {}
        if ret >= 0:
            extra["data"] = encode_bytes(buffer.raw[:min(ret, length)] if buffer is not None else b"")
            if namelen.value:
                extra["addr"] = decode_sockaddr(name.raw[:min(namelen.value, SOCKADDR_STORAGE)])
        return self.blocked_or(ret, err, extra)

    def op_recvmsg(self, args: dict) -> Outcome:
        fd, flags = fd_arg(args), int_arg(args, "flags", 0)
        length = recv_length_arg(args)
        controllen = int_arg(args, "controllen", 512)
        if not 0 <= controllen <= MAX_OPTLEN:
            raise BadRequest(f"controllen {controllen} outside 0..{MAX_OPTLEN}")
        refused = self.check_fd(fd)
        if refused:
            return refused
        buffer = ctypes.create_string_buffer(max(length, 1)) if length >= 0 else None
        control = ctypes.create_string_buffer(max(controllen, 1))
        name = ctypes.create_string_buffer(SOCKADDR_STORAGE)
        iov = Iovec(ctypes.cast(buffer, ctypes.c_void_p) if buffer is not None else None,
                    length & 0xFFFFFFFFFFFFFFFF)
        msg = MsgHdr(ctypes.cast(name, ctypes.c_void_p), SOCKADDR_STORAGE, ctypes.pointer(iov), 1,
                     ctypes.cast(control, ctypes.c_void_p), controllen, 0)
        ret, err = self.syscall(self.libc.recvmsg, fd, ctypes.byref(msg), flags, block_ms=self.block_arg(args))
        if err:
            return self.blocked_or(ret, err)
        cmsgs = parse_cmsgs(control.raw[:min(msg.msg_controllen, controllen)])
        extra: dict = {"bytes": ret, "msg_flags": msg.msg_flags}
        if msg.msg_namelen:
            extra["addr"] = decode_sockaddr(name.raw[:min(msg.msg_namelen, SOCKADDR_STORAGE)])
        completions = [c for c in cmsgs if "origin" in c]
        others = [c for c in cmsgs if "origin" not in c]
        if others:
            extra["cmsgs"] = others
        if flags & MSG_ERRQUEUE:
            # ip_recv_error()/ipv6_recv_error(): one sock_extended_err per call.
            if ret > 0 and buffer is not None:
                extra["data"] = encode_bytes(buffer.raw[:min(ret, length)])
            return Outcome(completions, 0, extra)
        if completions:
            extra["completions"] = completions
        extra["data"] = encode_bytes(buffer.raw[:min(ret, length)] if buffer is not None else b"")
        return Outcome(ret, 0, extra)

    def op_poll(self, args: dict) -> Outcome:
        entries = args.get("fds")
        if not isinstance(entries, list):
            raise BadRequest("argument 'fds' must be a list of descriptors or [fd, events] pairs")
        default_events = int_arg(args, "events", POLLIN | POLLOUT)
        timeout = int_arg(args, "timeout_ms", int_arg(args, "timeout", 0))
        pairs = []
        for item in entries:
            fd, events = item if isinstance(item, list) and len(item) == 2 else (item, default_events)
            if isinstance(fd, bool) or not isinstance(fd, int) or isinstance(events, bool) or not isinstance(events, int):
                raise BadRequest(f"poll entry {item!r} is not fd or [fd, events]")
            pairs.append((to_c_int(fd), events))
        hidden = {fd for fd, _ in pairs if fd in self.reserved}
        array = (PollFd * max(len(pairs), 1))()
        for index, (fd, events) in enumerate(pairs):
            # The agent's own pipes are polled as -1: ignored, revents 0.
            array[index].fd, array[index].events = (-1 if fd in hidden else fd), ctypes.c_short(events).value
        # A finite timeout is the caller's to wait out; only poll(-1) gets the block guard.
        block_ms = (self.block_arg(args) or self.block_ms) if timeout < 0 else 0
        ret, err = self.syscall(self.libc.poll, array, len(pairs), timeout, block_ms=block_ms)
        if err:
            return self.blocked_or(ret, err)
        revents = {str(fd): array[index].revents & 0xFFFF for index, (fd, _) in enumerate(pairs)}
        for fd in hidden:
            revents[str(fd)] = 0x20  # POLLNVAL, as for a descriptor that is not open
        return Outcome(revents, 0, {"ready": ret})

    def op_epoll_create1(self, args: dict) -> Outcome:
        ret, err = self.syscall(self.libc.epoll_create1, to_c_int(int_arg(args, "flags", 0)))
        if ret >= 0:
            self.track(ret)  # closed with the session's sockets
        return self.blocked_or(ret, err)

    def op_epoll_ctl(self, args: dict) -> Outcome:
        epfd, fd = fd_arg(args, "epfd"), fd_arg(args)
        for number in (epfd, fd):
            refused = self.check_fd(number)
            if refused:
                return refused
        event = EpollEvent(int_arg(args, "events", 0) & 0xFFFFFFFF, fd & 0xFFFFFFFF)
        ret, err = self.syscall(self.libc.epoll_ctl, epfd, to_c_int(int_arg(args, "op")), fd, ctypes.byref(event))
        return self.blocked_or(ret, err)

    def op_epoll_wait(self, args: dict) -> Outcome:
        """The ready events as {fd: events} (the scenario registers each fd with data = fd)."""
        epfd = fd_arg(args, "epfd")
        refused = self.check_fd(epfd)
        if refused:
            return refused
        maxevents = int_arg(args, "maxevents", 16)
        timeout = int_arg(args, "timeout", 0)
        events = (EpollEvent * max(min(maxevents, 1024), 1))()
        block_ms = (self.block_arg(args) or self.block_ms) if timeout < 0 else 0
        ret, err = self.syscall(self.libc.epoll_wait, epfd, events, to_c_int(maxevents), timeout, block_ms=block_ms)
        if err:
            return self.blocked_or(ret, err)
        return Outcome({str(events[n].data): events[n].events for n in range(ret)}, 0, {"ready": ret})

    def op_wait_readable(self, args: dict) -> Outcome:
        fd = fd_arg(args)
        timeout = int_arg(args, "timeout_ms", 1000)
        refused = self.check_fd(fd)
        if refused:
            return refused
        array = (PollFd * 1)()
        array[0].fd, array[0].events = fd, POLLIN
        block_ms = (self.block_arg(args) or self.block_ms) if timeout < 0 else 0
        ret, err = self.syscall(self.libc.poll, array, 1, timeout, block_ms=block_ms)
        if err:
            return self.blocked_or(ret, err)
        return Outcome(array[0].revents & 0xFFFF, 0, {"ready": ret})

    # -- descriptors ---------------------------------------------------------------------------

    def _os_call(self, func: Callable[[], Any]) -> tuple[Any, int]:
        start = time.monotonic_ns()
        try:
            value, err = func(), 0
        except OSError as exc:
            value, err = -1, exc.errno or errno_mod.EIO
        self.t_ns, self.dt_ns = start, time.monotonic_ns() - start
        return value, err

    def op_fstat(self, args: dict) -> Outcome:
        fd = fd_arg(args)
        refused = self.check_fd(fd)
        if refused:
            return refused
        st, err = self._os_call(lambda: os.fstat(fd))
        if err:
            return Outcome(-1, err)
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            link = None
        # "mode"/"ino" for people, "st_mode"/"st_ino"/"link" as the reference model names them.
        info = {"mode": st.st_mode, "ino": st.st_ino, "st_mode": st.st_mode, "st_ino": st.st_ino, "link": link}
        return Outcome(info)

    def op_readlink_fd(self, args: dict) -> Outcome:
        fd = fd_arg(args)
        return self.check_fd(fd) or Outcome(*self._os_call(lambda: os.readlink(f"/proc/self/fd/{fd}")))

    def op_fcntl(self, args: dict) -> Outcome:
        fd, cmd, arg = fd_arg(args), int_arg(args, "cmd"), int_arg(args, "arg", 0)
        if cmd not in (F_DUPFD, F_GETFD, F_SETFD, F_GETFL, F_SETFL, F_DUPFD_CLOEXEC):
            raise BadRequest(f"fcntl cmd {cmd} is not one the agent runs (F_DUPFD, F_GETFD, F_SETFD, F_GETFL, "
                             "F_SETFL, F_DUPFD_CLOEXEC)")
        refused = self.check_fd(fd)
        if refused:
            return refused
        ret, err = self._os_call(lambda: fcntl.fcntl(fd, cmd, arg))
        if cmd in (F_DUPFD, F_DUPFD_CLOEXEC) and not err:
            self.track(ret)
        return Outcome(ret, err)

    def op_fcntl_getfl(self, args: dict) -> Outcome:
        return self.op_fcntl({"fd": args.get("fd"), "cmd": F_GETFL})

    def op_fcntl_getfd(self, args: dict) -> Outcome:
        return self.op_fcntl({"fd": args.get("fd"), "cmd": F_GETFD})

    def op_unlink(self, args: dict) -> Outcome:
        path = args.get("path")
        if not isinstance(path, str) or not path:
            raise BadRequest("argument 'path' must be a file name")
        ret, err = self._os_call(lambda: os.unlink(path))
        if not err:
            self.unix_paths.discard(path)
        return Outcome(0 if not err else -1, err)

    # -- the machine ---------------------------------------------------------------------------

    def op_sleep(self, args: dict) -> Outcome:
        seconds = args.get("seconds", _MISSING)
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 <= seconds <= 600:
            raise BadRequest(f"argument 'seconds' must be a number in 0..600, not {seconds!r}")
        start = time.monotonic_ns()
        time.sleep(seconds)
        self.t_ns, self.dt_ns = start, time.monotonic_ns() - start
        return Outcome(0)

    def op_sysctl_get(self, args: dict) -> Outcome:
        path = sysctl_path(args.get("name"))
        text, err = self._os_call(lambda: read_text(path))
        return Outcome(-1, err) if err else Outcome(parse_sysctl(text))

    def op_sysctl_set(self, args: dict) -> Outcome:
        name = args.get("name")
        path = sysctl_path(name)
        value = args.get("value", _MISSING)
        if isinstance(value, list) and all(isinstance(v, (int, str)) and not isinstance(v, bool) for v in value):
            text = "\t".join(str(v) for v in value)
        elif isinstance(value, (int, str)) and not isinstance(value, bool):
            text = str(value)
        else:
            raise BadRequest(f"sysctl value must be an int, text or a list of them, not {value!r}")
        keep = bool(args.get("keep"))
        original = None
        if not keep and path not in self.sysctl_originals:
            try:
                original = read_text(path)
            except OSError:
                pass  # the write below reports why
        _, err = self._os_call(lambda: write_text(path, text))
        if not err and original is not None:
            self.sysctl_originals[path] = original  # restored when the session ends
        return Outcome(-1 if err else 0, err)

    def op_whoami(self, args: dict) -> Outcome:
        self.t_ns, self.dt_ns = time.monotonic_ns(), 0
        return Outcome(identity())

    def op_reset(self, args: dict) -> Outcome:
        start = time.monotonic_ns()
        closed = self.cleanup()
        self.t_ns, self.dt_ns = start, time.monotonic_ns() - start
        return Outcome(0, 0, closed)

    # -- the end -------------------------------------------------------------------------------

    def cleanup(self) -> dict:
        """Close every socket this session opened, remove its socket files, restore sysctls."""
        self.guard.ms = 0
        signal.setitimer(signal.ITIMER_REAL, 0, 0)
        closed = []
        for fd in sorted(self.open_fds):
            try:
                os.close(fd)
                closed.append(fd)
            except OSError:
                pass
        self.open_fds.clear()
        removed = []
        for path in sorted(self.unix_paths):
            try:
                if os.path.exists(path) and (os.lstat(path).st_mode & 0o170000) == 0o140000:  # S_IFSOCK
                    os.unlink(path)
                    removed.append(path)
            except OSError:
                pass
        self.unix_paths.clear()
        restored = []
        for path, text in self.sysctl_originals.items():
            try:
                write_text(path, text)
                restored.append(path[len("/proc/sys/"):].replace("/", "."))
            except OSError:
                pass
        self.sysctl_originals.clear()
        self.zerocopy_buffers.clear()
        self.zerocopy_bytes = 0
        return {"closed": closed, "unlinked": removed, "sysctls_restored": restored}

    # -- one request ---------------------------------------------------------------------------

    def handle(self, line: bytes) -> dict:
        """One request line in, one response dict out; never raises for bad input."""
        received = time.monotonic_ns()
        request_id: Any = None
        op: Any = None
        try:
            try:
                request = json.loads(line)
            except ValueError as exc:
                raise BadRequest(f"request is not JSON ({exc})") from None
            if not isinstance(request, dict):
                raise BadRequest("request must be a JSON object with id, op and args")
            request_id, op = request.get("id"), request.get("op")
            args = request.get("args") or {}
            if not isinstance(op, str):
                raise BadRequest("request has no 'op' string")
            if not isinstance(args, dict):
                raise BadRequest(f"{op}: 'args' must be an object")
            handler = self.handlers.get(op)
            if handler is None:
                known = ", ".join(sorted(self.handlers))
                return self.error_response(request_id, op, "ENOSYS", f"unknown op {op!r}; known: {known}", received)
            self.t_ns, self.dt_ns = received, 0
            outcome = handler(args)
        except BadRequest as exc:
            text = str(exc)
            return self.error_response(request_id, op, "EINVAL", f"{op}: {text}" if op else text, received)
        except Exception as exc:  # an agent bug must cost one step, not the session
            traceback.print_exc(file=sys.stderr)
            return self.error_response(request_id, op, "EINVAL", f"{op}: agent failed: {type(exc).__name__}: {exc}",
                                       received)
        response = {
            "id": request_id, "op": op, "ret": outcome.ret,
            "errno": errno_name(outcome.errno) if outcome.errno else None,
            "t_ns": self.t_ns, "dt_ns": self.dt_ns, "extra": outcome.extra,
        }
        if outcome.blocked:
            response["blocked"] = True
        return response

    @staticmethod
    def error_response(request_id: Any, op: Any, errno_name: str, message: str, received: int) -> dict:
        return {"id": request_id, "op": op, "ret": -1, "errno": errno_name, "t_ns": received, "dt_ns": 0,
                "extra": {}, "error": message}


# -- helpers ------------------------------------------------------------------------------------

def errno_name(number: int) -> str:
    return KERNEL_ERRNO_NAMES.get(number) or errno_mod.errorcode.get(number, str(number))


def sysctl_path(name: Any) -> str:
    """/proc/sys path for 'net.core.somaxconn' (or 'net/core/somaxconn'); nothing outside /proc/sys."""
    if not isinstance(name, str) or not name:
        raise BadRequest("argument 'name' must be a sysctl name such as net.core.somaxconn")
    relative = name if "/" in name else name.replace(".", "/")
    parts = relative.strip("/").split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise BadRequest(f"sysctl name {name!r} is not a /proc/sys path")
    return "/proc/sys/" + "/".join(parts)


def read_text(path: str) -> str:
    with open(path) as handle:
        return handle.read()


def write_text(path: str, text: str) -> None:
    with open(path, "w") as handle:
        handle.write(text)


def parse_sysctl(text: str) -> Any:
    """An int for one number, a list for several (tcp_rmem), else the text."""
    words = text.split()
    try:
        numbers = [int(word) for word in words]
    except ValueError:
        return text.strip()
    return numbers[0] if len(numbers) == 1 else numbers


def parse_cmsgs(control: bytes) -> list[dict]:
    """Walk struct cmsghdr records; IP_RECVERR/IPV6_RECVERR become completion dicts."""
    found = []
    offset = 0
    while offset + CMSG_HEADER.size <= len(control):
        length, level, kind = CMSG_HEADER.unpack_from(control, offset)
        if length < CMSG_HEADER.size or offset + length > len(control):
            break
        data = control[offset + CMSG_HEADER.size:offset + length]
        if (level, kind) in ((SOL_IP, IP_RECVERR), (SOL_IPV6, IPV6_RECVERR)) and len(data) >= SOCK_EXTENDED_ERR.size:
            ee_errno, origin, ee_type, code, _pad, info, ee_data = SOCK_EXTENDED_ERR.unpack_from(data)
            entry = {"origin": origin, "code": code, "lo": info, "hi": ee_data, "errno": ee_errno}
            if origin != SO_EE_ORIGIN_ZEROCOPY:
                # ICMP and local errors: type matters and SO_EE_OFFENDER follows the struct.
                entry["type"] = ee_type
                entry["offender"] = decode_sockaddr(data[SOCK_EXTENDED_ERR.size:])
            found.append(entry)
        else:
            found.append({"level": level, "type": kind, "data": encode_bytes(data)})
        offset += cmsg_align(length)
    return found


def identity() -> dict:
    caps = {}
    try:
        for line in read_text("/proc/self/status").splitlines():
            key, _, value = line.partition(":")
            if key in ("CapEff", "CapPrm", "CapBnd", "CapAmb"):
                caps[key] = value.strip()
    except OSError:
        pass
    return {"pid": os.getpid(), "uid": os.getuid(), "euid": os.geteuid(), "gid": os.getgid(),
            "egid": os.getegid(), "groups": os.getgroups(), "cap_eff": caps.get("CapEff"),
            "cap_prm": caps.get("CapPrm"), "cap_amb": caps.get("CapAmb")}


class LineChannel:
    """Newline-delimited JSON on two raw descriptors: partial reads joined, writes completed."""

    def __init__(self, read_fd: int, write_fd: int) -> None:
        self.read_fd, self.write_fd = read_fd, write_fd
        self.pending = bytearray()

    def lines(self):
        while True:
            newline = self.pending.find(b"\n")
            if newline >= 0:
                line = bytes(self.pending[:newline])
                del self.pending[:newline + 1]
                if line.strip():
                    yield line
                continue
            chunk = os.read(self.read_fd, 1 << 16)
            if not chunk:
                if self.pending.strip():
                    yield bytes(self.pending)  # a last request without its newline still counts
                return
            self.pending += chunk

    def write(self, message: dict) -> None:
        data = memoryview((json.dumps(message, separators=(",", ":")) + "\n").encode())
        while data:
            written = os.write(self.write_fd, data)
            data = data[written:]


def claim_stdio() -> tuple[int, int, int]:
    """Move the protocol pipes to the top of the descriptor table and put /dev/null on 0-2.

    Scenario sockets then get the numbers a fresh C program would (3, 4, ...), and a step that
    closes fd 1 closes /dev/null instead of the agent's reply pipe.
    """
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    top = min(soft, 1 << 20) if soft != resource.RLIM_INFINITY else 1 << 20
    base = max(top - 3, 16)
    moved = tuple(fcntl.fcntl(fd, F_DUPFD_CLOEXEC, base) for fd in (0, 1, 2))
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd, inheritable=False)
    if null > 2:
        os.close(null)
    return moved  # type: ignore[return-value]


def move_stray_fds(keep: tuple[int, ...], below: int = 64) -> set[int]:
    """Move descriptors the interpreter's libraries opened out of the scenario's way; returns their new numbers.

    forky's libffi (static trampolines) keeps its own .so open from the moment ctypes loads, on fd
    3; a fresh C program has nothing there. libffi only uses that descriptor again to map more
    trampolines for a new callback, and the agent makes no ctypes callbacks.
    """
    moved = set()
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd <= 2 or fd >= below or fd in keep:
            continue
        try:
            high = fcntl.fcntl(fd, F_DUPFD_CLOEXEC, min(keep) - 16)
        except OSError:
            continue  # the directory's own descriptor, already closed
        os.close(fd)
        moved.add(high)
    return moved


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--block-ms", type=int, default=DEFAULT_BLOCK_MS,
                        help="interrupt a call that blocks longer than this and report it as blocked (0: never)")
    options = parser.parse_args(argv)

    read_fd, write_fd, diag_fd = claim_stdio()
    strays = move_stray_fds((read_fd, write_fd, diag_fd))
    sys.stderr = open(diag_fd, "w", buffering=1, closefd=False)
    sys.stdout = sys.stderr  # a stray print must never corrupt the reply stream

    def stop(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGHUP, stop)
    # Blocked rather than ignored: the kernel drops an ignored SIGPIPE at generation, but a
    # blocked one stays pending, so a send can report that it raised one.
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGPIPE])

    channel = LineChannel(read_fd, write_fd)
    session = Session({read_fd, write_fd, diag_fd, *strays}, options.block_ms)
    try:
        hello = {"hello": {"agent": "socklab", "protocol": PROTOCOL, "kernel": os.uname().release,
                           "python": sys.version.split()[0], "t_ns": time.monotonic_ns(), **identity()}}
        channel.write(hello)
        for line in channel.lines():
            channel.write(session.handle(line))
    except BrokenPipeError:
        return 0  # the host went away; cleanup below still runs
    finally:
        summary = session.cleanup()
        if summary["closed"] or summary["unlinked"] or summary["sysctls_restored"]:
            print(f"socklab agent: cleanup {json.dumps(summary)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
