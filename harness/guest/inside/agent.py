"""socklab guest agent: runs socket system calls one JSON line at a time on stdin/stdout (stdlib only)."""

from __future__ import annotations

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
import threading
import time

# The agent starts for every scenario under TCG, where each module imported costs
# milliseconds: typing's names are for the checker only, and argparse, dataclasses and
# traceback (with what they import) stay out of the start-up path.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable, NoReturn

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


_LIBC: list[ctypes.CDLL] = []  # built once per process; a server's children inherit it (AgentServer.run)


def load_libc() -> ctypes.CDLL:
    """libc with prototypes, so ctypes passes socklen_t and size_t at their real widths."""
    if _LIBC:
        return _LIBC[0]
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
        "sendfile": (ssize, [i, i, ctypes.POINTER(ctypes.c_long), size]),
        "recvfrom": (ssize, [i, vp, size, i, vp, u32p]),
        "recvmsg": (ssize, [i, ctypes.POINTER(MsgHdr), i]),
        "poll": (i, [ctypes.POINTER(PollFd), ctypes.c_ulong, i]),
        "fcntl": (i, [i, i, i]),
        "epoll_create1": (i, [i]),
        "epoll_ctl": (i, [i, i, i, ctypes.POINTER(EpollEvent)]),
        "epoll_wait": (i, [i, ctypes.POINTER(EpollEvent), i, i]),
    }
    for name, (restype, argtypes) in prototypes.items():
        func = getattr(libc, name)
        func.restype, func.argtypes = restype, argtypes
    _LIBC.append(libc)
    return libc


class BadRequest(Exception):
    """The request cannot be turned into a system call; the message names the problem."""


class Outcome:
    """What one op produced: the return value, the errno (0 for none), extra fields, and whether it blocked."""

    __slots__ = ("ret", "errno", "extra", "blocked")

    def __init__(self, ret: Any, errno: int = 0, extra: dict | None = None, blocked: bool = False) -> None:
        self.ret = ret
        self.errno = errno
        self.extra = {} if extra is None else extra
        self.blocked = blocked


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

# block_ms for the calls that return without sleeping (socket, bind, listen, shutdown, the names,
# socket options, epoll_create1/epoll_ctl): no interval timer to arm and disarm, two system calls
# fewer per step, each costly under TCG.
NEVER_SLEEPS = 0


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


HERD_MAX = 64
SENDFILE_PATTERN = b"socklab sendfile page cache\n"
HERD_TIMEOUT_MS = 10_000  # a herd nobody collects ends on its own after this
EPOLLIN_BIT = 0x001


class Herd:
    """Threads blocked in epoll_wait at once, each on its own epoll file watching one socket.

    Each thread blocks every signal first, so the block guard's SIGALRM still lands on the main
    thread's call. ctypes drops the GIL around epoll_wait, so the waiters really sleep in the kernel
    together. Every epoll file also watches the read end of a pipe of the herd's own: collecting the
    herd writes to it, which wakes whoever is still asleep (through the pipe's wait queue, not the
    socket's), so a slow step between arming and collecting cannot time a waiter out. A waiter counts
    as woken when its epoll_wait reported the socket.
    """

    STOP = 0xFFFFFFFF  # epoll data of the pipe; the socket's is its descriptor

    def __init__(self, libc: ctypes.CDLL, fd: int, events: int, waiters: int, timeout_ms: int) -> None:
        self.libc, self.fd, self.events, self.waiters, self.timeout_ms = libc, fd, events, waiters, timeout_ms
        self.epfds: list[int] = []
        self.pipe: tuple[int, int] | None = None
        # Per waiter: (epoll_wait's return, whether it reported the socket, ms after arming).
        self.results: list[tuple[int, bool, int]] = [(0, False, 0)] * waiters
        self.threads: list[threading.Thread] = []
        self.ready = threading.Barrier(waiters + 1)
        self.armed_ns = 0

    def start(self) -> int:
        """Make the epoll files and start the waiters; an errno if an epoll call failed (nothing left behind)."""
        try:
            self.pipe = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as exc:
            return exc.errno or errno_mod.EMFILE
        for _ in range(self.waiters):
            epfd = self.libc.epoll_create1(0o2000000)  # EPOLL_CLOEXEC
            if epfd < 0:
                return self._undo(ctypes.get_errno())
            self.epfds.append(epfd)
            event = EpollEvent(self.events, self.fd & 0xFFFFFFFF)
            if self.libc.epoll_ctl(epfd, 1, self.fd, ctypes.byref(event)) < 0:  # EPOLL_CTL_ADD
                return self._undo(ctypes.get_errno())
            stop = EpollEvent(EPOLLIN_BIT, self.STOP)
            if self.libc.epoll_ctl(epfd, 1, self.pipe[0], ctypes.byref(stop)) < 0:
                return self._undo(ctypes.get_errno())
        self.armed_ns = time.monotonic_ns()
        for number, epfd in enumerate(self.epfds):
            thread = threading.Thread(target=self._wait, args=(number, epfd), daemon=True)
            thread.start()
            self.threads.append(thread)
        self.ready.wait(timeout=10)
        time.sleep(0.1)  # from "about to call epoll_wait" to asleep in it
        return 0

    def _wait(self, number: int, epfd: int) -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, set(signal.Signals))
        events = (EpollEvent * 2)()
        try:
            self.ready.wait(timeout=10)
        except threading.BrokenBarrierError:
            pass
        ret = self.libc.epoll_wait(epfd, events, 2, self.timeout_ms)
        reported = any(events[n].data == (self.fd & 0xFFFFFFFF) for n in range(max(ret, 0)))
        self.results[number] = (ret, reported, (time.monotonic_ns() - self.armed_ns) // 1_000_000)

    def finish(self) -> tuple[int, int, list[int]]:
        """(waiters the socket woke, waiters that timed out, when each woken one returned): stops, joins, closes."""
        if self.pipe is not None:
            try:
                os.write(self.pipe[1], b"x")
            except OSError:
                pass
        for thread in self.threads:
            thread.join(timeout=self.timeout_ms / 1000 + 5)
        self._undo(0)
        woken = [ms for ret, reported, ms in self.results if reported]
        return len(woken), sum(1 for ret, _, _ in self.results if ret == 0), sorted(woken)

    def _undo(self, err: int) -> int:
        for epfd in self.epfds + list(self.pipe or ()):
            try:
                os.close(epfd)
            except OSError:
                pass
        self.epfds, self.pipe = [], None
        return err


class Session:
    """One process's socket calls: the descriptors it opened and everything to undo at the end.

    Request ``{"id": 7, "op": "bind", "args": {"fd": 3, "addr": ["198.51.100.2", 7000]}}``,
    response ``{"id": 7, "op": "bind", "ret": 0, "errno": null, "t_ns": ..., "dt_ns": ...,
    "extra": {}}``. Calls go through libc with ctypes so the kernel sees what a C program
    would pass: Python's socket module clamps negative listen backlogs to 0 and adds
    SOCK_CLOEXEC to accept(). Sockets are closed at EOF, on ``reset``, SIGTERM or SIGHUP.
    """

    def __init__(self, reserved_fds: set[int], block_ms: int = DEFAULT_BLOCK_MS, tracefs: str | None = None,
                 trace_state_dir: str | None = None) -> None:
        self.libc = load_libc()
        self.reserved = reserved_fds
        self.block_ms = block_ms
        self.guard = BlockGuard()
        self.open_fds: set[int] = set()
        self.unix_paths: set[str] = set()
        self.sysctl_originals: dict[str, str] = {}
        self.exit_originals: dict[str, str] = {}  # sysctls put back when the agent ends, not at a reset
        self.zerocopy_buffers: list[ctypes.Array] = []
        self.zerocopy_bytes = 0
        self.herds: dict[int, Herd] = {}
        self.sendfile_fd: int | None = None  # the file sendfile reads (see op_sendfile)
        self.t_ns = 0
        self.dt_ns = 0
        self.handlers: dict[str, Callable[[dict], Outcome]] = {
            name[3:]: getattr(self, name) for name in dir(self) if name.startswith("op_")
        }
        self.handlers["sendto"] = self.handlers["send"]
        self.handlers["recvfrom"] = self.handlers["recv"]
        self.tracing = TracingOps(self, tracefs or TRACEFS, trace_state_dir or TRACE_STATE_DIR)
        self.handlers.update(self.tracing.handlers())

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
        ret, err = self.syscall(self.libc.socket, family, sock_type, protocol, block_ms=NEVER_SLEEPS)
        self.track(ret)
        return Outcome(ret, err)

    def _address_call(self, func: Callable[..., int], args: dict, block_ms: int | None = None) -> tuple[int, int, bytes]:
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
        if block_ms is None:
            block_ms = self.block_arg(args)
        ret, err = self.syscall(func, fd, buffer, addrlen & 0xFFFFFFFF, block_ms=block_ms)
        return ret, err, raw

    def op_bind(self, args: dict) -> Outcome:
        if args.get("addr") is None:
            raise BadRequest("missing argument 'addr'")
        refused = self.check_fd(fd_arg(args))
        if refused:
            return refused
        ret, err, raw = self._address_call(self.libc.bind, args, NEVER_SLEEPS)
        if ret == 0 and isinstance(args.get("addr"), str) and not args["addr"].startswith("@"):
            # The file the kernel made: a short addrlen binds a truncated name, which must go too.
            addrlen = args.get("addrlen")
            name = raw[2:addrlen] if isinstance(addrlen, int) and addrlen >= 2 else raw[2:]
            self.unix_paths.add(name.split(b"\0", 1)[0].decode(errors="surrogateescape"))
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
        return Outcome(*self.syscall(self.libc.listen, fd, backlog, block_ms=NEVER_SLEEPS))

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
        return self.check_fd(fd) or Outcome(*self.syscall(self.libc.shutdown, fd, how, block_ms=NEVER_SLEEPS))

    def _getname(self, func: Callable[..., int], args: dict) -> Outcome:
        fd = fd_arg(args)
        refused = self.check_fd(fd)
        if refused:
            return refused
        name = ctypes.create_string_buffer(SOCKADDR_STORAGE)
        namelen = ctypes.c_uint32(SOCKADDR_STORAGE)
        ret, err = self.syscall(func, fd, name, ctypes.byref(namelen), block_ms=NEVER_SLEEPS)
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
        return Outcome(*self.syscall(self.libc.setsockopt, fd, level, optname, buffer, optlen & 0xFFFFFFFF,
                                     block_ms=NEVER_SLEEPS))

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
        ret, err = self.syscall(self.libc.getsockopt, fd, level, optname, buffer, ctypes.byref(length),
                                block_ms=NEVER_SLEEPS)
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

    def op_sendfile(self, args: dict) -> Outcome:
        """sendfile(fd, file, &offset, length) from a file of the agent's own (a memfd: page-cache pages).

        The file holds ``length`` bytes from ``offset`` on (grown on demand, filled with a fixed
        pattern), and sits far above the scenario's descriptor numbers, like the agent's pipes.
        """
        fd = fd_arg(args)
        length, offset = int_arg(args, "length"), int_arg(args, "offset", 0)
        if not 0 <= length <= MAX_BUFFER or not 0 <= offset <= MAX_BUFFER:
            raise BadRequest(f"length and offset must be 0 to {MAX_BUFFER}")
        refused = self.check_fd(fd)
        if refused:
            return refused
        source = self._sendfile_source(offset + length)
        position = ctypes.c_long(offset)
        self._sigpipe_taken()
        ret, err = self.syscall(self.libc.sendfile, fd, source, ctypes.byref(position), length,
                                block_ms=self.block_arg(args))
        return self._sent(ret, err, None, 0)

    def _sendfile_source(self, size: int) -> int:
        if self.sendfile_fd is None:
            made = os.memfd_create("socklab-sendfile", os.MFD_CLOEXEC)
            # Below the agent's own pipes (they sit at the top of the table), far above scenario numbers.
            self.sendfile_fd = fcntl.fcntl(made, F_DUPFD_CLOEXEC, max(min(self.reserved, default=512) - 8, 64))
            os.close(made)
            self.reserved.add(self.sendfile_fd)
        have = os.fstat(self.sendfile_fd).st_size
        if size > have:
            pattern = SENDFILE_PATTERN * ((size - have) // len(SENDFILE_PATTERN) + 1)
            os.pwrite(self.sendfile_fd, pattern[:size - have], have)
        return self.sendfile_fd

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
        ret, err = self.syscall(self.libc.epoll_create1, to_c_int(int_arg(args, "flags", 0)), block_ms=NEVER_SLEEPS)
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
        ret, err = self.syscall(self.libc.epoll_ctl, epfd, to_c_int(int_arg(args, "op")), fd, ctypes.byref(event),
                                block_ms=NEVER_SLEEPS)
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

    def op_epoll_herd(self, args: dict) -> Outcome:
        """Arm a herd: ``waiters`` threads, each with its own epoll file watching ``fd``, blocked in epoll_wait.

        The call returns once every thread is about to wait; ``epoll_herd_wakeups`` later says how many
        of them the socket woke (``timeout``, default 10 s, ends a herd nobody collects). This is what a step-by-step scenario cannot do by itself: several
        waiters asleep on one socket at the same time, as in the thundering-herd problem.
        """
        fd = fd_arg(args)
        refused = self.check_fd(fd)
        if refused:
            return refused
        waiters = int_arg(args, "waiters")
        if not 1 <= waiters <= HERD_MAX:
            raise BadRequest(f"waiters must be 1 to {HERD_MAX}, not {waiters}")
        timeout = int_arg(args, "timeout", HERD_TIMEOUT_MS)
        if not 1 <= timeout <= 10_000:
            raise BadRequest(f"timeout must be 1 to 10000 ms, not {timeout}")
        if fd in self.herds:
            self.t_ns, self.dt_ns = time.monotonic_ns(), 0
            return Outcome(-1, errno_mod.EBUSY, {"agent": f"fd {fd} already has a herd; epoll_herd_wakeups ends it"})
        start = time.monotonic_ns()
        herd = Herd(self.libc, fd, int_arg(args, "events", EPOLLIN_BIT) & 0xFFFFFFFF, waiters, timeout)
        err = herd.start()
        self.t_ns, self.dt_ns = start, time.monotonic_ns() - start
        if err:
            return Outcome(-1, err)
        self.herds[fd] = herd
        return Outcome(0, 0, {"waiters": waiters, "timeout_ms": timeout})

    def op_epoll_herd_wakeups(self, args: dict) -> Outcome:
        """How many of the herd's waiters epoll_wait woke with the socket; wakes the rest through the herd's pipe."""
        fd = fd_arg(args)
        herd = self.herds.pop(fd, None)
        start = time.monotonic_ns()
        if herd is None:
            self.t_ns, self.dt_ns = start, 0
            return Outcome(-1, errno_mod.ENOENT, {"agent": f"fd {fd} has no herd (epoll_herd arms one)"})
        woken, timed_out, after_ms = herd.finish()
        self.t_ns, self.dt_ns = start, time.monotonic_ns() - start
        return Outcome(woken, 0, {"waiters": herd.waiters, "timed_out": timed_out, "woken_after_ms": after_ms})

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
        if fd < 0:
            # Python's fcntl refuses negative descriptors itself; the kernel's answer is EBADF.
            ret, err = self.syscall(self.libc.fcntl, fd, cmd, arg)
        else:
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
        restore = args.get("restore", "reset")
        if restore not in ("reset", "exit"):
            raise BadRequest(f"restore must be 'reset' or 'exit', not {restore!r}")
        originals = self.exit_originals if restore == "exit" else self.sysctl_originals
        original = None
        if not keep and path not in originals:
            try:
                original = read_text(path)
            except OSError:
                pass  # the write below reports why
        _, err = self._os_call(lambda: write_text(path, text))
        if not err and original is not None:
            originals[path] = original  # restored at the next reset, or (restore: exit) when the agent ends
        return Outcome(-1 if err else 0, err)

    def op_whoami(self, args: dict) -> Outcome:
        self.t_ns, self.dt_ns = time.monotonic_ns(), 0
        return Outcome(identity())

    def op_reset(self, args: dict) -> Outcome:
        """Back to a fresh agent's state for the next program; ``{"tracing": "keep"}`` keeps the tracer armed."""
        start = time.monotonic_ns()
        tracing = args.get("tracing", "restore")
        if tracing not in ("restore", "keep"):
            raise BadRequest(f"tracing must be 'restore' or 'keep', not {tracing!r}")
        closed = self.cleanup(keep_tracing=tracing == "keep")
        for fd in (0, 1, 2):
            # A step may have set FD_CLOEXEC or O_NONBLOCK on /dev/null at 0-2: the next program
            # starts from a fresh C program's descriptors again (inheritable, blocking).
            if fd not in self.reserved:
                try:
                    fcntl.fcntl(fd, F_SETFD, 0)
                    fcntl.fcntl(fd, F_SETFL, fcntl.fcntl(fd, F_GETFL) & ~os.O_NONBLOCK)
                except OSError:
                    pass
        self.t_ns, self.dt_ns = start, time.monotonic_ns() - start
        return Outcome(0, 0, closed)

    # -- programs ------------------------------------------------------------------------------

    def op_batch(self, args: dict) -> Outcome:
        """A whole program in one request: ``{"steps": [...]}`` -> ``ret``, one response per step (see Batch)."""
        start = time.monotonic_ns()
        replies = Batch(self).run(args.get("steps"), args.get("block_ms"))
        self.t_ns, self.dt_ns = start, time.monotonic_ns() - start
        return Outcome(replies, 0, {"steps": len(replies)})

    # -- the end -------------------------------------------------------------------------------

    def cleanup(self, final: bool = False, keep_tracing: bool = False) -> dict:
        """Close every socket this session opened, remove its socket files, restore sysctls.

        ``final`` (the agent is ending) also restores the sysctls set with ``restore: exit``.
        ``keep_tracing`` leaves an armed tracer armed, stopped (tracing_on 0): the next
        scenario of a traced check traces at once instead of arming again (a second or more).
        """
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
        for originals in (self.sysctl_originals, self.exit_originals) if final else (self.sysctl_originals,):
            for path, text in originals.items():
                try:
                    write_text(path, text)
                    restored.append(path[len("/proc/sys/"):].replace("/", "."))
                except OSError:
                    pass
            originals.clear()
        self.zerocopy_buffers.clear()
        self.zerocopy_bytes = 0
        for herd in self.herds.values():
            herd.finish()
        self.herds.clear()
        summary = {"closed": closed, "unlinked": removed, "sysctls_restored": restored}
        self.tracing.begin_error = None
        if self.tracing.tracer.plan is not None:
            if keep_tracing and not final:
                self.tracing.tracer.stop()
            else:
                summary["tracing_restore_failed"] = self.tracing.cleanup()
        return summary

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
            import traceback  # only on this path: it is not imported at start-up

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


# -- programs -----------------------------------------------------------------------------------

MAX_BATCH_STEPS = 100_000
MAX_REPEATS = 100_000
MAX_SETTLE_MS = 5000
# Answers that say "not yet" and leave the socket as it was, so asking again changes nothing.
TRANSIENT = {"accept": {"EAGAIN"}, "accept4": {"EAGAIN"}, "recv": {"EAGAIN"}, "recvfrom": {"EAGAIN"},
             "recvmsg": {"EAGAIN"}, "connect": {"EALREADY"}, "getpeername": {"ENOTCONN"},
             # a send or a bind while a refused handshake's RST is still on the way from the other VM
             "send": {"EAGAIN"}, "sendto": {"EAGAIN"}, "sendmsg": {"EAGAIN"}, "bind": {"EINVAL"}}


class Batch:
    """Runs a program's steps in one request, so 10,000 steps cost one round trip, not 10,000.

    Each step is ``{"op", "args", "save"?, "until"?, "max"?, "await"?, "settle_ms"?}``:

    - ``save`` names the step's result; a later step's argument ``{"$ref": name, "path": [...],
      "fd": true}`` stands for it (``path`` indexes into it: 1 or "port" is an address's port).
      A reference to a result that was never produced is -1 for a descriptor (EBADF, as in a C
      program that ignored an error) and otherwise makes the step answer ``errno: "UNSET"``.
    - ``until: "EAGAIN"`` repeats the call until that errno, any other errno, or ``max`` calls;
      the step answers ``{"calls", "total", "stopped"}``.
    - ``await`` is the answer the reference model gave (for an until-loop, ``{"stopped": errno}``: a loop
      whose first call got a transient answer the model's did not is run again, as a single call is). While the kernel's answer is a transient
      one (EAGAIN from accept/recv/send, EINVAL from bind, EALREADY from connect, ENOTCONN from getpeername, any poll
      result; epoll_wait's "nothing ready") and differs from it, the call is asked again every millisecond for up to
      ``settle_ms``: a handshake or a datagram still on the wire is waited for, not reported as a
      disagreement. ``extra.settled`` says how many extra calls that took.
    """

    def __init__(self, session: "Session") -> None:
        self.session = session
        self.saved: dict[str, Any] = {}

    def run(self, steps: Any, block_ms: Any = None) -> list[dict]:
        if not isinstance(steps, list) or len(steps) > MAX_BATCH_STEPS:
            raise BadRequest(f"'steps' must be a list of at most {MAX_BATCH_STEPS} steps")
        if block_ms is not None and (isinstance(block_ms, bool) or not isinstance(block_ms, int) or block_ms < 0):
            raise BadRequest("block_ms must be an integer >= 0")
        saved_block = self.session.block_ms
        if block_ms is not None:
            self.session.block_ms = block_ms
        try:
            return [self.step(item) for item in steps]
        finally:
            self.session.block_ms = saved_block

    def step(self, item: Any) -> dict:
        if not isinstance(item, dict) or not isinstance(item.get("op"), str) or item.get("op") == "batch":
            return self.error(None, "a batch step is an object with an 'op' other than batch")
        op = item["op"]
        handler = self.session.handlers.get(op)
        if handler is None:
            return self.error(op, f"unknown op {op!r}", "ENOSYS")
        args = item.get("args") or {}
        if not isinstance(args, dict):
            return self.error(op, "'args' must be an object")
        try:
            # Only lists and objects can hold a {"$ref": ...}; JSON numbers and text pass as they are.
            args = {key: self.resolve(value) if type(value) in (list, dict) else value for key, value in args.items()}
        except LookupError as exc:
            return {"op": op, "ret": None, "errno": "UNSET", "t_ns": time.monotonic_ns(), "dt_ns": 0,
                    "extra": {"unset": str(exc.args[0])}}
        until = item.get("until")
        if until is not None:
            limit = item.get("max", MAX_REPEATS)
            response = self.repeat(op, handler, args, until, limit)
            if "await" in item and response.get("error") is None:
                response = self.settle_loop(op, handler, args, until, limit, response, item["await"],
                                            item.get("settle_ms", 200))
        else:
            response = self.once(op, handler, args)
            if "await" in item and response.get("error") is None:
                response = self.settle(op, handler, args, response, item["await"], item.get("settle_ms", 200))
        name = item.get("save")
        if isinstance(name, str) and response.get("errno") is None and not response.get("blocked"):
            ret = response.get("ret")
            if op not in ("socket", "accept", "accept4") or (isinstance(ret, int) and ret >= 0):
                self.saved[name] = ret
        return response

    def resolve(self, value: Any) -> Any:
        if isinstance(value, list):
            return [self.resolve(item) for item in value]
        if not isinstance(value, dict) or "$ref" not in value:
            return value
        name = value["$ref"]
        if name not in self.saved:
            if value.get("fd"):
                return -1
            raise LookupError(name)
        result = self.saved[name]
        for key in value.get("path") or ():
            index = {"ip": 0, "host": 0, "port": 1}.get(key, key)
            if isinstance(index, int) and isinstance(result, list) and -len(result) <= index < len(result):
                result = result[index]
            elif isinstance(result, dict) and key in result:
                result = result[key]
            else:
                raise LookupError(name)
        if result is None and not value.get("fd"):
            raise LookupError(name)  # nothing to pass on, as the host side decides (UnsetReference)
        return result if not value.get("fd") or isinstance(result, int) else -1

    def once(self, op: str, handler: Callable[[dict], Outcome], args: dict) -> dict:
        session = self.session
        session.t_ns, session.dt_ns = time.monotonic_ns(), 0
        try:
            outcome = handler(args)
        except BadRequest as exc:
            return self.error(op, str(exc))
        except Exception as exc:  # an agent bug costs one step, not the program
            import traceback

            traceback.print_exc(file=sys.stderr)
            return self.error(op, f"agent failed: {type(exc).__name__}: {exc}")
        response = {"op": op, "ret": outcome.ret, "errno": errno_name(outcome.errno) if outcome.errno else None,
                    "t_ns": session.t_ns, "dt_ns": session.dt_ns, "extra": outcome.extra}
        if outcome.blocked:
            response["blocked"] = True
        return response

    def repeat(self, op: str, handler: Callable[[dict], Outcome], args: dict, until: Any, limit: Any) -> dict:
        if not isinstance(until, str) or isinstance(limit, bool) or not isinstance(limit, int) \
                or not 1 <= limit <= MAX_REPEATS:
            return self.error(op, f"until must be an errno name and max 1..{MAX_REPEATS}")
        calls = total = 0
        stopped = "max"
        started = time.monotonic_ns()
        for _ in range(limit):
            response = self.once(op, handler, args)
            if response.get("error") is not None:
                return response
            if response.get("blocked") or response.get("errno") is not None:
                stopped = "blocked" if response.get("blocked") else response["errno"]
                break
            calls += 1
            total += response["ret"] if isinstance(response["ret"], int) else 0
        return {"op": op, "ret": {"calls": calls, "total": total, "stopped": stopped}, "errno": None,
                "t_ns": started, "dt_ns": time.monotonic_ns() - started, "extra": {}}

    def settle(self, op: str, handler: Callable[[dict], Outcome], args: dict, response: dict, wanted: Any,
               settle_ms: Any) -> dict:
        if isinstance(settle_ms, bool) or not isinstance(settle_ms, int) or not 0 <= settle_ms <= MAX_SETTLE_MS:
            return self.error(op, f"settle_ms must be 0..{MAX_SETTLE_MS}")
        deadline = time.monotonic() + settle_ms / 1000
        retries = 0
        while self.transient(op, args, response, wanted) and time.monotonic() < deadline:
            time.sleep(0.001)
            response = self.once(op, handler, args)
            retries += 1
        if retries:
            response["extra"] = {**(response.get("extra") or {}), "settled": retries}
        return response

    def settle_loop(self, op: str, handler: Callable[[dict], Outcome], args: dict, until: Any, limit: Any,
                    response: dict, wanted: Any, settle_ms: Any) -> dict:
        """An until-loop asked again while its very first call gave a "not yet" answer the model's loop did not.

        Such a loop made no successful call (``calls`` 0), so it sent nothing and changed nothing:
        running it again is as safe as asking a single call again. A loop that made any call is
        never rerun (each call may have queued data).
        """
        if isinstance(settle_ms, bool) or not isinstance(settle_ms, int) or not 0 <= settle_ms <= MAX_SETTLE_MS:
            return self.error(op, f"settle_ms must be 0..{MAX_SETTLE_MS}")
        deadline = time.monotonic() + settle_ms / 1000
        retries = 0
        while self.transient_loop(op, response, wanted) and time.monotonic() < deadline:
            time.sleep(0.001)
            response = self.repeat(op, handler, args, until, limit)
            retries += 1
        if retries:
            response["extra"] = {**(response.get("extra") or {}), "settled": retries}
        return response

    @staticmethod
    def transient_loop(op: str, response: dict, wanted: Any) -> bool:
        """Whether a loop stopped at its first call by a "not yet" errno other than the model's stop."""
        loop = response.get("ret")
        if not isinstance(wanted, dict) or not isinstance(loop, dict) or loop.get("calls") != 0:
            return False
        stopped = loop.get("stopped")
        return stopped in TRANSIENT.get(op, ()) and stopped != wanted.get("stopped")

    @staticmethod
    def transient(op: str, args: dict, response: dict, wanted: Any) -> bool:
        """Whether ``response`` is a "not yet" answer that differs from the model's ``wanted`` one."""
        if not isinstance(wanted, dict) or response.get("blocked"):
            return False
        if op == "poll":
            if response.get("errno") is not None or not isinstance(response.get("ret"), dict):
                return False
            order = [item[0] if isinstance(item, list) else item for item in args.get("fds") or []]
            got = [response["ret"].get(str(fd)) for fd in order]
            return got != wanted.get("revents")
        if op == "epoll_wait":
            # Retried only while nothing is ready and the model has something: an empty answer
            # consumed no edge-triggered or one-shot event, so asking again changes nothing.
            return response.get("errno") is None and response.get("ret") == {} and bool(wanted.get("ready"))
        errno = response.get("errno")
        return errno in TRANSIENT.get(op, ()) and errno != wanted.get("errno")

    @staticmethod
    def error(op: Any, message: str, errno: str = "EINVAL") -> dict:
        return {"op": op, "ret": -1, "errno": errno, "t_ns": time.monotonic_ns(), "dt_ns": 0, "extra": {},
                "error": f"{op}: {message}" if op else message}


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
        os.dup2(null, fd)  # inheritable, as a fresh C program's 0-2 are (F_GETFD says 0)
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


# -- kernel call graphs (tracefs function_graph) ------------------------------------------------
#
# Kept apart from the socket ops above: the Session only registers these ops and calls
# KernelTracer.restore() in its cleanup. docs/tracing.md explains the design.

TRACEFS = "/sys/kernel/tracing"
TRACE_STATE_DIR = "/run/socklab/trace"
TRACE_DEPTH_DEFAULT, TRACE_DEPTH_MAX = 6, 20
TRACE_PROGRAM_TIMEOUT_MAX = 120
TRACE_OUTPUT_LIMIT = 64 << 10

# What the tracer patches (set_ftrace_filter): the socket layer and what it calls into on the way
# (LSM hooks, descriptors and files, the IP stack down to the driver). Everything else -- locking,
# memory allocation, RCU, the scheduler, tracing itself -- is never traced: that keeps arming fast
# under TCG (patching all ~36,000 functions takes 4-6 s each way, this set well under 1 s) and the
# tree readable. Functions a step's model citation names are added to the set as well.
TRACED_FUNCTIONS = (
    "__sys_*", "___sys_*", "__sock_*", "sock_*", "sockfd_*", "*_sock_*", "sk_*", "__sk_*", "sockfs_*",
    "inet_*", "__inet_*", "inet6_*", "__inet6_*", "tcp_*", "__tcp_*", "tcp4_*", "tcp6_*", "udp*", "__udp*",
    "ip_*", "__ip_*", "ip4_*", "ipv4_*", "ipv6_*", "ip6_*", "__ip6_*", "raw_*", "ping_*", "reqsk_*",
    "unix_*", "skb_*", "__skb_*", "*_skb", "*_skb_*", "msg_zerocopy_*", "*zerocopy*", "move_addr_to_*",
    "security_*", "apparmor_*", "aa_sk_*", "aa_*sock*", "tomoyo_*socket*", "tomoyo_*inet*", "bpf_lsm_*sock*",
    "selinux_*sock*", "fd_install", "get_unused_fd_flags", "alloc_file*", "alloc_empty_file", "d_alloc_pseudo",
    "__fget*", "__fdget*", "fput", "____fput", "__fput", "close_fd*", "filp_close", "task_work_run",
    "new_inode_pseudo", "do_fcntl", "vfs_fstat", "vfs_getattr*", "do_sys_poll", "*_poll", "poll_*",
    "dev_queue_xmit", "__dev_queue_xmit", "dev_hard_start_xmit", "netif_*", "__netif_*", "napi_*",
    "neigh_*", "__neigh_*", "virtnet_*", "start_xmit", "fib_*", "dst_*", "nf_hook_slow", "qdisc_*",
    "__qdisc_*", "sch_direct_xmit", "call_timer_fn", "net_rx_action", "run_timer_softirq", "__do_softirq",
    "handle_softirqs", "irq_exit_rcu", "do_epoll_*", "ep_*", "eventpoll_*", "*_epoll_*",
)
# The system calls whose trees are recorded (set_graph_function, behind the arch's wrapper prefix).
# read/write are left out for the agent's own steps (its protocol pipes use them) and added for
# trace_program, where a program's read() of a socket is as interesting as its recv().
TRACED_SYSCALLS = ("socket", "socketpair", "bind", "listen", "accept", "accept4", "connect", "close", "shutdown",
                   "getsockname", "getpeername", "setsockopt", "getsockopt", "sendto", "sendmsg", "sendmmsg",
                   "recvfrom", "recvmsg", "recvmmsg", "poll", "ppoll", "select", "pselect6", "epoll_create1",
                   "epoll_ctl", "epoll_wait", "epoll_pwait", "fcntl", "newfstat", "newfstatat", "statx", "ioctl", "readlink",
                   "sendfile64")
PROGRAM_SYSCALLS = ("read", "write", "readv", "writev", "close_range", "exit_group")
# Dropped from the tree with everything below them: locking and memory bookkeeping that the
# traced set still catches (lock_sock, release_sock), and softirq work (timers, packets received)
# that happens to run on the traced thread's stack without being part of its call.
TRACE_NOISE = ("lock_sock*", "release_sock", "__release_sock", "_raw_spin_*", "__cond_resched", "*rcu*",
               "kmem_cache_*", "__kmalloc*", "kfree*", "__local_bh_*", "mutex_*", "*trace*", "call_timer_fn",
               "net_rx_action", "run_timer_softirq", "__do_softirq", "handle_softirqs", "irq_exit_rcu")
# The syscall (wrapper) each op enters, so a step's own trees can be told from others.
TRACE_SYSCALLS = {
    "send": ("sendto",), "recv": ("recvfrom",), "sendto": ("sendto",), "recvfrom": ("recvfrom",),
    "accept": ("accept", "accept4"), "fstat": ("newfstat",), "fcntl_getfl": ("fcntl",), "fcntl_getfd": ("fcntl",),
    "wait_readable": ("poll",), "readlink_fd": ("readlink",),
}
TRACER_OPTIONS = {"funcgraph-irqs": "0", "funcgraph-overhead": "0", "funcgraph-cpu": "0", "funcgraph-proc": "0",
                  "funcgraph-duration": "1", "funcgraph-tail": "0", "funcgraph-abstime": "0", "function-fork": "0"}

def write_tracefs_line(fd: int, line: str) -> None:
    """One line to a tracefs file in as many write(2)s as it takes; tracefs parses each line on its own."""
    data = (line + "\n").encode()
    while data:
        data = data[os.write(fd, data):]


def apply_trace_restore(plan: dict) -> list[str]:
    """Write each saved tracefs file back, in order (current_tracer first), then unmount if we mounted."""
    failed = []
    for name, lines in plan["writes"]:
        path = os.path.join(plan["root"], name)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
        except OSError:
            failed.append(name)
            continue
        try:
            for line in lines:
                write_tracefs_line(fd, line)
        except OSError:
            failed.append(name)
        finally:
            os.close(fd)
    if plan.get("mounted"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.umount2(plan["root"].encode(), 2)  # MNT_DETACH
    return failed


# The watchdog: a /bin/sh (it starts in milliseconds; a second python3 would take a second of the
# guest's only vCPU under TCG) that waits for EOF on a pipe only the agent holds, then runs the
# restore script if it is still there (a clean restore removes it first). The script is written
# from the same plan apply_trace_restore() follows. Its command line names no agent file, so
# `pkill -f agent-...` does not take it down with the agent.
TRACE_WATCHDOG_SCRIPT = """trap '' HUP INT PIPE
while read -r _; do :; done
[ -f "$1" ] || exit 0
. "$1"
rm -f "$1" "$2"
"""


def restore_script(plan: dict) -> str:
    """The restore plan as sh: the same files, in the same order, one token per line (one write each)."""
    import shlex

    lines = []
    for name, values in plan["writes"]:
        path = shlex.quote(os.path.join(plan["root"], name))
        if values:
            lines.append(f"printf '%s\\n' {' '.join(shlex.quote(v) for v in values)} > {path} 2>/dev/null")
        else:
            lines.append(f": > {path} 2>/dev/null")
    if plan.get("mounted"):
        lines.append(f"umount -l {shlex.quote(plan['root'])} 2>/dev/null")
    return "\n".join(lines) + "\n"


# A traced program starts as this, waits until its pid is the traced one, then execs the program.
TRACE_GATE_SOURCE = "import os, sys; os.read(int(sys.argv[1]), 1); os.execvp(sys.argv[2], sys.argv[2:])"


class TraceRefused(BadRequest):
    """Tracing cannot start on this guest: no tracefs, no function_graph, busy, not root, bad input."""


_GLOB_REGEXES: dict[tuple[str, ...], Any] = {}


def glob_regex(patterns: tuple[str, ...] | list[str]):
    """One regex for shell globs; compiled once per process (TRACE_NOISE's alone cost a session 43 ms under TCG)."""
    key = tuple(patterns)
    if key not in _GLOB_REGEXES:
        import fnmatch
        import re

        _GLOB_REGEXES[key] = re.compile("|".join(fnmatch.translate(pattern) for pattern in patterns))
    return _GLOB_REGEXES[key]


def parse_function_graph(text: str, noise=None) -> list[list]:
    """function_graph output -> [[depth, name, duration_us], ...] in call order (depth 0 = a root).

    Nesting comes from the braces, not the indentation: ``f() {`` opens, ``}`` closes (and
    carries f's duration), ``f();`` is a leaf. Lines that are neither (headers, CPU switches,
    lost events) are skipped. A node matching ``noise`` is dropped with its subtree.
    """
    calls: list[list] = []
    stack: list[int] = []  # index in calls of each open function, or -1 when dropped
    for line in text.splitlines():
        if line.startswith("#") or "|" not in line:
            continue
        left, _, right = line.partition("|")
        body = right.strip()
        duration = None
        words = left.split()
        if len(words) >= 2 and words[-1] == "us":
            try:
                duration = float(words[-2])
            except ValueError:
                duration = None
        if body.startswith("}"):
            if stack:
                index = stack.pop()
                if index >= 0 and duration is not None:
                    calls[index][2] = duration
            continue
        if body.endswith("() {") or body.endswith("();"):
            name = body[:-4] if body.endswith("{") else body[:-3]
            hidden = bool(stack and stack[-1] < 0) or bool(noise and noise.fullmatch(name))
            index = -1
            if not hidden:
                index = len(calls)
                calls.append([len(stack), name, duration])
            if body.endswith("{"):
                stack.append(index)
    return calls


class KernelTracer:
    """function_graph on one guest, owned by one root agent; every setting it touches is put back.

    ``begin`` arms the tracer the first time (saving each tracefs setting first, to a state file
    a watchdog process restores from if the agent dies), then points it at one thread for one
    step; ``end`` stops recording and returns the step's call trees.
    """

    def __init__(self, root: str = TRACEFS, state_dir: str = TRACE_STATE_DIR) -> None:
        self.root = root
        self.state_dir = state_dir
        self.state_path = os.path.join(state_dir, "state.json")
        self.armed = False
        self.plan: dict | None = None
        self.names: list[str] = []
        self.index: dict[str, int] = {}
        self.filtered: set[str] = set()
        self.graph_roots: tuple[str, ...] = ()
        self.prefix = "__x64_sys_"
        self.roots_written: tuple[str, ...] = ()
        self.pid: int | None = None
        self.depth: int | None = None
        self.on_fd: int | None = None
        self.pipe_fd: int | None = None
        self.watch_fd: int | None = None
        self.watchdog: Any = None
        self.noise = glob_regex(TRACE_NOISE)
        self.arm_seconds = 0.0
        self.asked: dict[str, bool] = {}

    # -- tracefs files ---------------------------------------------------------------------------

    def path(self, name: str) -> str:
        return os.path.join(self.root, name)

    def read(self, name: str) -> str:
        with open(self.path(name)) as handle:
            return handle.read()

    def write(self, name: str, lines: list[str] | tuple[str, ...]) -> list[str]:
        """Truncate ``name`` and write each line with its own write(2) (tracefs parses one token per write).

        Returns the lines the kernel refused.
        """
        refused = []
        fd = os.open(self.path(name), os.O_WRONLY | os.O_TRUNC)
        try:
            for line in lines:
                try:
                    write_tracefs_line(fd, line)
                except OSError:
                    refused.append(line)
        finally:
            os.close(fd)
        return refused

    def append(self, name: str, lines: list[str]) -> None:
        fd = os.open(self.path(name), os.O_WRONLY | os.O_APPEND)
        try:
            for line in lines:
                os.write(fd, (line + "\n").encode())
        finally:
            os.close(fd)

    # -- probing ---------------------------------------------------------------------------------

    def probe(self) -> bool:
        """Check that tracing can start; mount tracefs if needed. True when this call mounted it."""
        if os.geteuid() != 0:
            raise TraceRefused("tracing needs root in the guest (tracefs is root-only); trace a root step")
        mounted = False
        if not os.path.exists(self.path("current_tracer")):
            try:
                filesystems = read_text("/proc/filesystems")
            except OSError:
                filesystems = ""
            if "tracefs" not in filesystems.split():
                raise TraceRefused("this kernel has no tracefs (CONFIG_TRACING is off): it cannot be traced")
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.mount(b"nodev", self.root.encode(), b"tracefs", 0, None) != 0:
                err = ctypes.get_errno()
                raise TraceRefused(f"cannot mount tracefs on {self.root}: {os.strerror(err)}")
            mounted = True
        try:
            tracers = self.read("available_tracers").split()
        except OSError as exc:
            raise TraceRefused(f"cannot read {self.path('available_tracers')}: {exc.strerror}") from None
        if "function_graph" not in tracers:
            self._unmount(mounted)
            raise TraceRefused("this kernel's tracefs has no function_graph tracer (CONFIG_FUNCTION_GRAPH_TRACER "
                               f"is off; it offers: {' '.join(tracers) or 'none'})")
        self._recover_stale()
        current = self.read("current_tracer").strip()
        if current != "nop":
            self._unmount(mounted)
            raise TraceRefused(f"the tracer is busy: current_tracer is {current!r}, someone else is tracing; "
                               "socklab leaves it alone (write nop to current_tracer when they are done)")
        events = [line for line in self.read("set_event").splitlines() if line.strip()]
        if events:
            self._unmount(mounted)
            raise TraceRefused(f"the tracer is busy: {len(events)} trace event(s) are enabled ({events[0]}, ...); "
                               "socklab would clear their buffer")
        return mounted

    def _unmount(self, mounted: bool) -> None:
        if mounted:
            ctypes.CDLL(None, use_errno=True).umount2(self.root.encode(), 2)

    def _recover_stale(self) -> None:
        """A state file left by an agent that died with its watchdog: restore it, unless its owner lives."""
        try:
            plan = json.loads(read_text(self.state_path))
        except (OSError, ValueError):
            return
        owner = plan.get("owner")
        if isinstance(owner, int) and owner != os.getpid() and _alive(owner):
            raise TraceRefused(f"the tracer is busy: socklab agent pid {owner} is tracing on this guest")
        apply_trace_restore(plan)
        _remove_state(self.state_path)

    def available(self) -> list[str]:
        """available_filter_functions, kept in /run for the boot: tracefs takes over a second to list it."""
        if not self.names:
            cache = os.path.join(self.state_dir, "functions-" + _boot_key())
            try:
                self.names = read_text(cache).split("\n")
            except OSError:
                self.names = [line.split()[0] for line in self.read("available_filter_functions").splitlines() if line]
                os.makedirs(self.state_dir, exist_ok=True)
                write_text(cache + ".part", "\n".join(self.names))
                os.rename(cache + ".part", cache)
            self.index = {}
            for number, name in enumerate(self.names, start=1):  # set_ftrace_filter indexes count from 1
                self.index.setdefault(name, number)
        return self.names

    def traceable(self, names: list[str]) -> dict[str, bool]:
        self.available()
        return {name: name in self.index for name in names}

    # -- arming ------------------------------------------------------------------------------------

    def _save(self, mounted: bool) -> dict:
        """The restore plan: every file arm() changes, with what it holds now, current_tracer first."""
        def lines(name: str, empty_marks: tuple[str, ...] = ()) -> list[str]:
            out = []
            for line in self.read(name).splitlines():
                if line.strip() and not line.startswith("#") and line.strip() not in empty_marks:
                    out.append(line.strip())
            return out

        filters = lines("set_ftrace_filter")
        if any(":" in line for line in filters):
            raise TraceRefused("the tracer is busy: set_ftrace_filter holds function triggers "
                               f"({filters[0]}); socklab cannot put them back, so it does not touch them")
        writes = [["current_tracer", ["nop"]], ["tracing_on", [self.read("tracing_on").strip()]],
                  ["set_ftrace_pid", lines("set_ftrace_pid", ("no pid",))],
                  ["set_graph_function", lines("set_graph_function")],
                  ["set_ftrace_filter", filters],
                  ["max_graph_depth", [self.read("max_graph_depth").strip()]]]
        for option in TRACER_OPTIONS:
            name = f"options/{option}"
            if os.path.exists(self.path(name)):
                writes.append([name, [self.read(name).strip()]])
        return {"owner": os.getpid(), "root": self.root, "mounted": mounted, "writes": writes}

    def _start_watchdog(self) -> None:
        import subprocess

        script = self.state_path[:-len(".json")] + ".sh"
        write_text(script, restore_script(self.plan))
        read_end, write_end = os.pipe()
        self.watchdog = subprocess.Popen(
            ["/bin/sh", "-c", TRACE_WATCHDOG_SCRIPT, "socklab-trace-watchdog", script, self.state_path],
            stdin=read_end, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            close_fds=True)
        os.close(read_end)
        self.watch_fd = out_of_the_way(write_end)

    def arm(self, extra: list[str]) -> None:
        started = time.monotonic()
        mounted = self.probe()
        plan = self._save(mounted)
        os.makedirs(self.state_dir, exist_ok=True)
        write_text(self.state_path + ".part", json.dumps(plan))
        os.rename(self.state_path + ".part", self.state_path)
        self.plan = plan
        self._start_watchdog()
        try:
            self.write("tracing_on", ["0"])
            names = self.available()
            self.prefix = next((p for p in ("__x64_sys_", "__arm64_sys_") if p + "listen" in self.index), "__sys_")
            roots = {self.prefix + call for call in TRACED_SYSCALLS}
            self.filtered = set(self.selected(names)) | {name for name in roots if name in self.index}
            self.filtered |= {name for name in extra if name in self.index}
            self.write("set_ftrace_filter", [str(self.index[name]) for name in sorted(self.filtered)])
            # Graph roots: the syscall wrappers (the glob roots only what is patched) and task_work_run,
            # where the final fput() of a close() runs. They are written only when a step asks for a
            # function of its own: with set_graph_function empty, every traced function of the
            # thread is graphed from the first one on its stack, which is the wrapper for a step's
            # syscall, and each token written costs a scan of all functions (0.35 s for two).
            self.graph_roots = (self.prefix + "*", "task_work_run")
            self.roots_written = ()
            for option, value in TRACER_OPTIONS.items():
                if os.path.exists(self.path(f"options/{option}")):
                    self.write(f"options/{option}", [value])
            self.write("current_tracer", ["function_graph"])
            self.on_fd = out_of_the_way(os.open(self.path("tracing_on"), os.O_WRONLY))
            # A step's events are read from trace_pipe, which consumes them: the buffer is empty again
            # for the next step without truncating `trace`. Opened after current_tracer is set, as
            # tracefs refuses to change the tracer while trace_pipe is open (restore closes it first).
            # If the agent dies instead, its descriptors are released after close_files() in LIFO
            # order (task_work), so this one, numbered above the watchdog's pipe, goes before the
            # watchdog sees EOF and writes current_tracer.
            self.pipe_fd = out_of_the_way(os.open(self.path("trace_pipe"), os.O_RDONLY | os.O_NONBLOCK))
        except BaseException:
            self.restore()
            raise
        self.armed = True
        self.arm_seconds = time.monotonic() - started

    def selected(self, names: list[str]) -> list[str]:
        """The functions TRACED_FUNCTIONS matches, cached beside the function list (matching takes a second)."""
        cache = os.path.join(self.state_dir, "selected-" + _boot_key() + "-" + _digest(repr(TRACED_FUNCTIONS)))
        try:
            return read_text(cache).split("\n")
        except OSError:
            pass
        pattern = glob_regex(TRACED_FUNCTIONS)
        chosen = [name for name in names if pattern.fullmatch(name)]
        write_text(cache + ".part", "\n".join(chosen))
        os.rename(cache + ".part", cache)
        return chosen

    def stop(self) -> None:
        """tracing_on 0, armed still: what a step that was cut off between trace_begin and trace_end left on."""
        if self.on_fd is not None:
            os.pwrite(self.on_fd, b"0", 0)

    def consume(self) -> str:
        """Everything the ring buffer holds, read from trace_pipe (which removes it) until it is empty."""
        chunks = []
        while True:
            try:
                chunk = os.read(self.pipe_fd, 1 << 16)  # trace_pipe gives under a page per read
            except BlockingIOError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks).decode(errors="replace")

    def include(self, names: list[str]) -> None:
        """Add functions to the traced set while armed (only they are patched, in place)."""
        new = [name for name in names if name in self.index and name not in self.filtered]
        if new:
            self.append("set_ftrace_filter", [str(self.index[name]) for name in new])
            self.filtered.update(new)

    # -- one step ----------------------------------------------------------------------------------

    def check_function(self, root: str) -> None:
        """Refuse an unknown graph root before anything in tracefs changes."""
        mounted = False if self.armed else self.probe()
        try:
            self.available()
        finally:
            if not self.armed:
                self._unmount(mounted)
        if root not in self.index:
            raise TraceRefused(f"unknown function {root!r}: it is not in available_filter_functions "
                               "(misspelt, inlined, or marked notrace)")

    def begin(self, pid: int, depth: int, extra: list[str], root: str | None = None) -> dict:
        if root is not None:
            self.check_function(root)
        if not self.armed:
            self.arm(extra + ([root] if root else []))
        self.include(extra + ([root] if root else []))
        roots = self.graph_roots + (root,) if root else ()
        if roots != self.roots_written:
            self.write("set_graph_function", list(roots))
            self.roots_written = roots
        if pid != self.pid:
            self.write("set_ftrace_pid", [str(pid)])
            self.pid = pid
        if depth != self.depth:
            self.write("max_graph_depth", [str(depth)])
            self.depth = depth
        # Whatever a step cut off before its trace_end left in the buffer. Not `trace` opened with
        # O_TRUNC: that resets the ring buffer, which waits for RCU grace periods, about 17 ms of
        # a TCG guest's CPU at every step.
        self.consume()
        self.asked = self.traceable(extra)
        os.pwrite(self.on_fd, b"1", 0)
        return {"arm_s": round(self.arm_seconds, 3), "traceable": self.asked}

    def end(self) -> dict:
        if not self.armed:
            raise TraceRefused("trace_end without trace_begin")
        os.pwrite(self.on_fd, b"0", 0)
        text = self.consume()
        calls, keep = [], False
        for call in parse_function_graph(text, self.noise):
            if call[0] == 0:
                # Writing tracing_on can leave a stray fragment of that write(2) at the start.
                keep = call[1].startswith(self.prefix) or call[1] in self.graph_roots or call[1] in self.roots_written
            if keep:
                calls.append(call)
        return {"calls": calls, "lost": "LOST" in text, "depth": self.depth, "traceable": self.asked}

    # -- the end ---------------------------------------------------------------------------------

    def restore(self) -> list[str]:
        """Put every saved setting back; the names of the files that could not be written."""
        failed: list[str] = []
        for fd in (self.on_fd, self.pipe_fd):
            if fd is not None:
                os.close(fd)
        self.on_fd = self.pipe_fd = None
        if self.plan is not None:
            failed = apply_trace_restore(self.plan)
            _remove_state(self.state_path)
            self.plan = None
        if self.watch_fd is not None:
            os.close(self.watch_fd)  # the watchdog sees EOF, finds no state file, and exits
            self.watch_fd = None
            try:
                self.watchdog.wait(timeout=5)
            except Exception:
                pass
        self.armed = False
        self.pid = self.depth = None
        return failed


def _remove_state(state_path: str) -> None:
    """The state file and the watchdog's restore script beside it: restored, nothing left to do."""
    for path in (state_path, state_path[:-len(".json")] + ".sh"):
        try:
            os.unlink(path)
        except OSError:
            pass


def out_of_the_way(fd: int) -> int:
    """Move one of the tracer's own descriptors near the top of the table (as claim_stdio does for the
    protocol pipes), so a traced scenario's sockets get the numbers an untraced run gives them."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    top = min(soft, 1 << 20) if soft != resource.RLIM_INFINITY else 1 << 20
    moved = fcntl.fcntl(fd, F_DUPFD_CLOEXEC, max(top - 16, 16))
    os.close(fd)
    return moved


def _boot_key() -> str:
    """This boot of this kernel: the function list and its indexes hold until the next boot."""
    try:
        boot = read_text("/proc/sys/kernel/random/boot_id").strip()
    except OSError:
        boot = "unknown"
    return _digest(os.uname().release + boot)


def _digest(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _alive(pid: int) -> bool:
    """Running and not a zombie: a process killed a moment ago still answers kill(pid, 0) until reaped."""
    try:
        return read_text(f"/proc/{pid}/stat").rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def trace_depth_arg(args: dict) -> int:
    depth = args.get("depth", TRACE_DEPTH_DEFAULT)
    if isinstance(depth, bool) or not isinstance(depth, int) or not 1 <= depth <= TRACE_DEPTH_MAX:
        raise TraceRefused(f"trace depth {depth!r} is out of range: use 1..{TRACE_DEPTH_MAX}")
    return depth


def trace_names_arg(args: dict, key: str = "functions") -> list[str]:
    names = args.get(key) or []
    if not isinstance(names, list) or not all(isinstance(n, str) and n and n.isprintable() and " " not in n
                                             for n in names):
        raise TraceRefused(f"argument {key!r} must be a list of kernel function names")
    return names


class TracingOps:
    """The tracing ops of a Session: trace_begin, trace_end, trace_traceable, trace_program."""

    def __init__(self, session: "Session", root: str = TRACEFS, state_dir: str = TRACE_STATE_DIR) -> None:
        self.session = session
        self.tracer = KernelTracer(root, state_dir)
        self.begin_error: str | None = None

    def handlers(self) -> dict[str, Callable[[dict], Outcome]]:
        return {"trace_arm": self.op_trace_arm, "trace_begin": self.op_trace_begin, "trace_end": self.op_trace_end,
                "trace_traceable": self.op_trace_traceable, "trace_program": self.op_trace_program}

    def _timed(self, func: Callable[[], Any]) -> Any:
        start = time.monotonic_ns()
        try:
            return func()
        finally:
            self.session.t_ns, self.session.dt_ns = start, time.monotonic_ns() - start

    def op_trace_arm(self, args: dict) -> Outcome:
        """Arm ahead of the first traced step (the host arms every VM of a scenario at once)."""
        extra = trace_names_arg(args)
        if not self.tracer.armed:
            self._timed(lambda: self.tracer.arm(extra))
        return Outcome(0, 0, {"arm_s": round(self.tracer.arm_seconds, 3)})

    def op_trace_begin(self, args: dict) -> Outcome:
        self.begin_error = None
        try:
            return self._trace_begin(args)
        except TraceRefused as exc:
            self.begin_error = str(exc)  # trace_end repeats it: the host may not wait for this reply
            raise

    def _trace_begin(self, args: dict) -> Outcome:
        pid = args.get("pid", os.getpid())
        if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
            raise TraceRefused(f"argument 'pid' must be a process id, not {pid!r}")
        depth, extra = trace_depth_arg(args), trace_names_arg(args)
        root = args.get("function")
        if root is not None and (not isinstance(root, str) or not root.isidentifier()):
            raise TraceRefused(f"unknown function {root!r}: not a kernel function name")
        return Outcome(0, 0, self._timed(lambda: self.tracer.begin(pid, depth, extra, root)))

    def op_trace_end(self, args: dict) -> Outcome:
        if self.begin_error is not None:
            error, self.begin_error = self.begin_error, None
            raise TraceRefused(error)
        return Outcome(0, 0, self._timed(self.tracer.end))

    def op_trace_traceable(self, args: dict) -> Outcome:
        names = trace_names_arg(args, "names")
        return Outcome(self._timed(lambda: self.tracer.traceable(names)))

    def op_trace_program(self, args: dict) -> Outcome:
        """Run ``argv`` and trace its socket calls (threads and children too), as the agent's steps are."""
        import subprocess

        argv = args.get("argv")
        if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
            raise TraceRefused("argument 'argv' must be a non-empty list of strings")
        timeout = args.get("timeout", 60)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= TRACE_PROGRAM_TIMEOUT_MAX:
            raise TraceRefused(f"timeout {timeout!r} outside 0..{TRACE_PROGRAM_TIMEOUT_MAX} s")
        depth, extra = trace_depth_arg(args), trace_names_arg(args)
        root = args.get("function")
        gate_read, gate_write = os.pipe()
        try:
            # The child waits on the gate until its pid is the one traced, then execs.
            child = subprocess.Popen(
                [sys.executable, "-I", "-c", TRACE_GATE_SOURCE, str(gate_read), *argv], pass_fds=(gate_read,),
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        except OSError as exc:
            os.close(gate_read)
            os.close(gate_write)
            raise TraceRefused(f"cannot start {argv[0]!r}: {exc.strerror}") from None
        os.close(gate_read)
        try:
            self.tracer.begin(child.pid, depth, extra, root if isinstance(root, str) else None)
            self.tracer.include([self.tracer.prefix + call for call in PROGRAM_SYSCALLS])
            self.tracer.write("options/function-fork", ["1"])
        except BaseException:
            child.kill()
            child.wait()
            os.close(gate_write)
            raise
        os.write(gate_write, b"g")
        os.close(gate_write)
        try:
            output, _ = child.communicate(timeout=timeout)
            status = child.returncode
        except subprocess.TimeoutExpired:
            child.kill()
            output, _ = child.communicate()
            status = None
        trace = self.tracer.end()
        self.tracer.write("options/function-fork", ["0"])
        self.tracer.pid = None  # function-fork added the program's children to set_ftrace_pid
        trace.update(status=status, output=output[-TRACE_OUTPUT_LIMIT:].decode(errors="replace"),
                     timed_out=status is None)
        return Outcome(0, 0, trace)

    def cleanup(self) -> list[str]:
        return self.tracer.restore() if self.tracer.plan is not None else []


# -- the agent server: one Python start per guest instead of one per agent -----------------------
#
# Under TCG a guest spends about 0.4 s starting Python and importing this module, at every agent
# start, which is every scenario and every host. The server is this module, started once as root
# and kept running; for each session it forks a child that becomes an ordinary agent on that
# session's pipes. The session's shell (Agent.command on the host) asks for it:
#
#   1. it makes a FIFO DIR/done.PID and writes "PID USER BLOCK_MS DIR/done.PID" to DIR/requests;
#   2. the server opens the FIFO, forks, answers "started", and the child opens /proc/PID/fd/7-9
#      (the shell's copies of its pipes to sshd) as its own stdio, drops to USER if that is not
#      root, and runs main() as a freshly started agent would;
#   3. the shell waits on the FIFO and exits with the status the server writes when the child ends
#      (128 + N for signal N); if the server itself is gone, the FIFO's last writer is the child,
#      and the shell exits 255 when it ends.
#
# DIR is root's and 0700: only root's sessions can ask. A shell that finds no live server starts
# one in the background and runs this agent directly, as before the server existed.

SERVE_SUFFIX = ".serve"
SESSION_FDS = (7, 8, 9)  # where the asking shell holds its stdin, stdout and stderr (Agent.command)
SERVE_CHECK_S = 10.0  # how often an idle server checks that it is still the one its directory names
PR_SET_DUMPABLE = 4


def serve_dir(module_file: str) -> str:
    """The server's directory beside its module file: /run/socklab/agent/agent_<hash>.serve."""
    return module_file.removesuffix(".py") + SERVE_SUFFIX


class AgentServer:
    """Forks an agent per request; see the comment above. Runs as root, in a session of its own."""

    def __init__(self, module_file: str) -> None:
        self.module_file = module_file
        self.directory = serve_dir(module_file)
        self.requests_fd = -1
        self.children: dict[int, int] = {}  # child pid -> write end of its session's done FIFO

    def claim(self) -> bool:
        """Make DIR (FIFO and pid inside, then one rename) or take a dead server's; False if a live one has it."""
        staging = f"{self.directory}.{os.getpid()}"
        os.mkdir(staging, 0o700)
        os.mkfifo(f"{staging}/requests", 0o600)
        write_text(f"{staging}/pid", f"{os.getpid()}\n")
        for _ in range(2):
            try:
                os.rename(staging, self.directory)
            except OSError:
                owner = self.owner()
                if owner is not None and _alive(owner):
                    break
                # A dead server's directory (SIGKILL leaves it): move it away and try once more.
                dead = f"{self.directory}.dead.{os.getpid()}"
                try:
                    os.rename(self.directory, dead)
                except OSError:
                    pass
                _remove_tree(dead)
                continue
            # Pushed over meanwhile (Agent._remove_old_versions removes the module, then the pid file):
            # a server of a removed version gives its claim back at once, not at its next look.
            if os.path.exists(self.module_file):
                return True
            _remove_tree(self.directory)
            return False
        _remove_tree(staging)
        return False

    def owner(self) -> int | None:
        try:
            return int(read_text(f"{self.directory}/pid"))
        except (OSError, ValueError):
            return None

    def still_mine(self) -> bool:
        return self.owner() == os.getpid() and os.path.exists(self.module_file)

    def run(self) -> int:
        import select

        try:
            os.setsid()
        except OSError:
            pass  # already a session leader
        if not self.claim():
            return 0
        pending = b""
        try:  # from the claim on: whatever fails, the directory and its pid file go
            self.requests_fd = os.open(f"{self.directory}/requests", os.O_RDWR | os.O_CLOEXEC)  # RDWR: never EOF
            self.prepare()
            signal.signal(signal.SIGCHLD, self.reap)
            signal.signal(signal.SIGTERM, _exit_on_signal)
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
            while True:
                ready, _, _ = select.select([self.requests_fd], [], [], SERVE_CHECK_S)
                if not ready:
                    if not self.still_mine():
                        return 0
                    continue
                pending += os.read(self.requests_fd, 4096)
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    self.spawn(line)
        finally:
            if self.owner() in (os.getpid(), None):  # None: a newer agent took our pid file away
                _remove_tree(self.directory)

    @staticmethod
    def prepare() -> None:
        """Build once what every session builds (Session's libc, KernelTracer's noise regex): each child inherits it.

        Under TCG, when each child built them, they took 50 of a forked agent's 75 ms (cProfile in the guest:
        the regex 43 ms, libc 7 ms).
        """
        load_libc()
        glob_regex(TRACE_NOISE)

    def spawn(self, line: bytes) -> None:
        try:
            pid_text, user, block_text, done_path = line.decode().split()
            pid, block_ms = int(pid_text), int(block_text)
        except ValueError:
            return
        if os.path.dirname(done_path) != self.directory:
            return
        try:
            # The shell holds it open (read-write) until it has the answer; a FIFO it gave up on is gone.
            done = os.open(done_path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return
        signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGCHLD])  # the child is recorded before it is reaped
        try:
            child = os.fork()
            if child == 0:
                self.child(pid, user, block_ms)  # never returns
            self.children[child] = done
            try:
                os.write(done, b"started\n")
            except OSError:
                pass
        except OSError:
            os.close(done)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGCHLD])

    def reap(self, signum: int = 0, frame: object = None) -> None:
        while True:
            try:
                child, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if child == 0:
                return
            done = self.children.pop(child, None)
            if done is None:
                continue
            code = os.waitstatus_to_exitcode(status)
            try:
                os.write(done, f"{128 - code if code < 0 else code}\n".encode())
            except OSError:
                pass
            os.close(done)

    def child(self, pid: int, user: str, block_ms: int) -> NoReturn:
        """In the forked child: take the session's stdio, cwd, umask and environment, become ``user``, run main()."""
        code = 1
        try:
            os.close(self.requests_fd)
            for done in self.children.values():
                os.close(done)
            self.children.clear()
            for signum in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP):
                signal.signal(signum, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_SETMASK, [])  # spawn() blocked SIGCHLD around the fork
            os.setsid()
            # Opening a pipe through /proc opens the pipe itself: the agent reads and writes sshd's
            # pipes as if it had been exec'd on them. The shell keeps copies of its stdio on
            # SESSION_FDS, which no redirection of its own moves while it waits.
            for fd, flags in ((0, os.O_RDONLY), (1, os.O_WRONLY), (2, os.O_WRONLY)):
                opened = os.open(f"/proc/{pid}/fd/{SESSION_FDS[fd]}", flags)
                if opened != fd:
                    os.dup2(opened, fd)
                    os.close(opened)
            session_env = read_environ(pid)
            os.chdir(f"/proc/{pid}/cwd")
            os.umask(session_umask(pid))
            if user != "root":
                session_env = become(user, session_env)
            os.environ.clear()
            os.environ.update(session_env)
            code = main(["--block-ms", str(block_ms)])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException as exc:  # noqa: BLE001 - the child must end here, never return into the server
            try:
                # sys.stderr: the session's stderr once main() has moved it off fd 2, else fd 2 itself.
                print(f"socklab agent: the agent server's child failed: {type(exc).__name__}: {exc}", file=sys.stderr)
                sys.stderr.flush()
            except (OSError, ValueError):
                pass
        finally:
            os._exit(code)


def read_environ(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/environ", "rb") as source:
        pairs = [item.partition(b"=") for item in source.read().split(b"\0") if b"=" in item]
    return {key.decode(errors="surrogateescape"): value.decode(errors="surrogateescape") for key, _, value in pairs}


def session_umask(pid: int) -> int:
    for line in read_text(f"/proc/{pid}/status").splitlines():
        if line.startswith("Umask:"):
            return int(line.split()[1], 8)
    return 0o022


def become(user: str, session_env: dict[str, str]) -> dict[str, str]:
    """What `setpriv --reuid --regid --init-groups --reset-env` does; returns the environment to use.

    All three uids become the user's, so the kernel clears the permitted and effective
    capabilities; the process is made dumpable again, so its /proc files are the user's, as
    they are for a program the user exec'd.
    """
    import pwd

    entry = pwd.getpwnam(user)
    os.setgroups(os.getgrouplist(user, entry.pw_gid))
    os.setresgid(entry.pw_gid, entry.pw_gid, entry.pw_gid)
    os.setresuid(entry.pw_uid, entry.pw_uid, entry.pw_uid)
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_DUMPABLE, 1, 0, 0, 0)
    env = {"HOME": entry.pw_dir, "SHELL": entry.pw_shell or "/bin/sh", "USER": user, "LOGNAME": user,
           "PATH": "/usr/local/bin:/bin:/usr/bin"}
    if "TERM" in session_env:
        env["TERM"] = session_env["TERM"]
    return env


def _remove_tree(path: str) -> None:
    import shutil  # the server's only, never on an agent's start-up path

    shutil.rmtree(path, ignore_errors=True)


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


USAGE = """usage: agent.py [--block-ms MS] | agent.py --serve

socklab guest agent: runs socket system calls one JSON line at a time on stdin/stdout.

  --block-ms MS  interrupt a call that blocks longer than MS and report it as blocked (0: never);
                 default 2000
  --serve        run as the agent server: fork an agent for each session that asks (root only)"""


class Options:
    __slots__ = ("block_ms", "tracefs", "trace_state_dir", "serve")

    def __init__(self) -> None:
        self.block_ms = DEFAULT_BLOCK_MS
        self.tracefs = TRACEFS  # --tracefs and --trace-state-dir are for tests (a fake tracefs)
        self.trace_state_dir = TRACE_STATE_DIR
        self.serve = False


def parse_options(argv: list[str]) -> Options:
    """The agent's few options, parsed by hand: argparse costs more to import than the agent to start.

    Raises SystemExit(2) with the usage on stderr for anything else, as argparse would.
    """
    options = Options()
    names = {"--block-ms": "block_ms", "--tracefs": "tracefs", "--trace-state-dir": "trace_state_dir"}
    rest = list(argv)
    while rest:
        word = rest.pop(0)
        if word in ("-h", "--help"):
            print(USAGE)
            raise SystemExit(0)
        if word == "--serve":
            options.serve = True
            continue
        name, has_value, value = word.partition("=")
        if name not in names:
            return _usage_error(f"unrecognized argument: {word}")
        if not has_value:
            if not rest:
                return _usage_error(f"{name} expects a value")
            value = rest.pop(0)
        if name == "--block-ms":
            try:
                options.block_ms = int(value)
            except ValueError:
                return _usage_error(f"--block-ms: not a whole number of milliseconds: {value!r}")
        else:
            setattr(options, names[name], value)
    return options


def _usage_error(message: str) -> NoReturn:
    print(f"{USAGE.splitlines()[0]}\nagent.py: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def main(argv: list[str] | None = None) -> int:
    options = parse_options(sys.argv[1:] if argv is None else argv)
    if options.serve:
        return AgentServer(os.path.abspath(__file__)).run()

    read_fd, write_fd, diag_fd = claim_stdio()
    strays = move_stray_fds((read_fd, write_fd, diag_fd))
    sys.stderr = open(diag_fd, "w", buffering=1, closefd=False)
    sys.stdout = sys.stderr  # a stray print must never corrupt the reply stream

    signal.signal(signal.SIGTERM, _exit_on_signal)
    signal.signal(signal.SIGHUP, _exit_on_signal)
    # Blocked rather than ignored: the kernel drops an ignored SIGPIPE at generation, but a
    # blocked one stays pending, so a send can report that it raised one.
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGPIPE])

    channel = LineChannel(read_fd, write_fd)
    session = Session({read_fd, write_fd, diag_fd, *strays}, options.block_ms, options.tracefs,
                      options.trace_state_dir)
    try:
        hello = {"hello": {"agent": "socklab", "protocol": PROTOCOL, "kernel": os.uname().release,
                           "python": sys.version.split()[0], "t_ns": time.monotonic_ns(), **identity()}}
        channel.write(hello)
        for line in channel.lines():
            channel.write(session.handle(line))
    except BrokenPipeError:
        return 0  # the host went away; cleanup below still runs
    finally:
        summary = session.cleanup(final=True)
        if summary["closed"] or summary["unlinked"] or summary["sysctls_restored"] or "tracing_restore_failed" in summary:
            print(f"socklab agent: cleanup {json.dumps(summary)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
