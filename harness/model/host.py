"""One modelled machine: sysctls, users and their processes' file tables, port tables, counters, views."""

from __future__ import annotations

import heapq
import random
from typing import TYPE_CHECKING, Any, Mapping

from .addr import canonical_ip
from .config import ROOT, STUDENT, Creds, build_sysctls
from .constants import AF_INET6
from .ports import PortTable
from .result import Result, SyscallError, fail
from .sock import Device, OpenFile
from . import views
from .syscalls import SYSCALLS

if TYPE_CHECKING:
    from .network import Network

TTY = "tty"  # what fds 0-2 hold: open, but not sockets (ENOTSOCK)


class Process:
    """The one process a user runs on a host: credentials and a file descriptor table."""

    __slots__ = ("creds", "fds", "_next_fd", "_freed", "tty_flags")

    def __init__(self, creds: Creds):
        self.creds = creds
        self.fds: dict[int, Any] = {0: TTY, 1: TTY, 2: TTY}
        self._next_fd = 3  # every number below is in use or in _freed
        self._freed: list[int] = []  # heap of closed numbers below _next_fd
        self.tty_flags: dict[int, list[bool]] = {}  # fd 0-2 -> [O_NONBLOCK, FD_CLOEXEC] once a step set them

    def install(self, entry: OpenFile) -> int:
        """get_unused_fd_flags(): the lowest free descriptor number."""
        fd = heapq.heappop(self._freed) if self._freed else self._next_fd
        if fd == self._next_fd:
            self._next_fd += 1
        self.fds[fd] = entry
        return fd

    def release(self, fd: int) -> Any:
        """close_fd(): drop the table entry and make the number reusable."""
        entry = self.fds.pop(fd)
        heapq.heappush(self._freed, fd)
        return entry

    def lookup(self, fd: Any) -> OpenFile:
        """sockfd_lookup_light(): EBADF for unknown descriptors, ENOTSOCK for non-sockets."""
        entry = self.fds.get(fd) if type(fd) is int else None
        if type(entry) is OpenFile:
            return entry
        if type(fd) is not int:
            raise fail("EBADF", f"fd {fd!r} is not a descriptor number", "fdget")
        entry = self.fds.get(fd)
        if entry is None:
            raise fail("EBADF", f"fd {fd} is not open", "fdget")
        if entry is TTY:
            # sock_from_file() is inlined into sockfd_lookup_light() on the traced guests.
            raise fail("ENOTSOCK", f"fd {fd} is open but is not a socket (sock_from_file finds no socket)",
                       "sockfd_lookup_light")
        return entry


class Host:
    """A machine in the lab. Build with Network.add_host(); drive with call(op, args, user)."""

    def __init__(self, net: "Network", name: str, addrs: list[str], sysctls: Mapping[str, Any] | None,
                 sg: bool, mtu: int, kernel_sublevel: int, kernel: str = "6.1", memory_mib: int = 512):
        self.net = net
        # The kernel series this host runs (versions.KERNELS); its version rules apply.
        self.kernel = kernel
        self.memory_mib = memory_mib
        self.name = name
        self.addrs4: list[str] = []
        self.addrs6: list[str] = []
        for addr in addrs:
            parsed = canonical_ip(addr)
            if parsed is None:
                raise ValueError(f"{addr!r} is not an IP address")
            (self.addrs6 if parsed[0] == AF_INET6 else self.addrs4).append(parsed[1])
        self.sysctls = build_sysctls(sysctls, kernel, memory_mib)
        self.kernel_sublevel = kernel_sublevel
        self.lo = Device("lo", 65536, sg=True, csum=True, loopback=True)
        self.nic = Device("eth0", mtu, sg=sg, csum=True)
        self.users: dict[str, Creds] = {"root": ROOT, "student": STUDENT}
        self.procs: dict[str, Process] = {}
        self.tcp_ports = PortTable(udp=False)
        self.udp_ports = PortTable(udp=True)
        self.tcp_listeners: dict[int, list] = {}  # port -> listening sockets (the listening hash)
        self.unix_names: dict[str, Any] = {}  # path or '@abstract' -> Sock, or a leftover socket file
        self.counters: dict[str, int] = {}
        self.rng = random.Random(f"{net.seed}:{name}")
        self._inode = 10000

    # -- identity ----------------------------------------------------------------------------

    def add_user(self, name: str, uid: int, caps: frozenset[int] | set[int] = frozenset(), gid: int | None = None) -> Creds:
        """Register a user with explicit capabilities (e.g. only CAP_NET_BIND_SERVICE)."""
        creds = Creds(name, uid, uid if gid is None else gid, frozenset(caps))
        self.users[name] = creds
        self.procs.pop(name, None)
        return creds

    def process(self, user: str) -> Process:
        proc = self.procs.get(user)
        if proc is None:
            creds = self.users.get(user)
            if creds is None:
                raise fail("ESRCH", f"no user {user!r} on host {self.name}", "model")
            proc = self.procs[user] = Process(creds)
        return proc

    def next_inode(self) -> int:
        self._inode += 1
        return self._inode

    def is_local4(self, addr: str) -> bool:
        return addr.startswith("127.") or addr in self.addrs4

    def is_local6(self, addr: str) -> bool:
        return addr == "::1" or addr in self.addrs6

    def bump(self, counter: str, by: int = 1) -> None:
        self.counters[counter] = self.counters.get(counter, 0) + by

    # -- the generic entry point -------------------------------------------------------------

    def call(self, op: str, args: Mapping[str, Any] | None = None, user: str = "root") -> Result:
        """Run one syscall ``op`` with C-named ``args`` as ``user``; never raises for bad input."""
        handler = SYSCALLS.get(op)
        if handler is None:
            return Result(op, -1, "ENOSYS", f"the model has no syscall {op!r}", "sys_ni_syscall")
        if args is None:
            args = {}
        try:
            return handler(self, self.procs.get(user) or self.process(user), op, args)
        except SyscallError as err:
            return Result(op, -1, err.errno, err.rule, err.kernel_fn, signal=err.signal)
        except Exception as exc:  # bad argument shapes must not escape as tracebacks
            if self.net.strict:
                raise
            return Result(op, -1, "EINVAL", f"model could not interpret the arguments: {exc!r}", "model")

    # -- introspection -----------------------------------------------------------------------

    def socket(self, fd: int, user: str = "root") -> "views.SocketView":
        """Read-only view of the socket behind fd."""
        return views.socket_view(self, self.process(user).lookup(fd))

    def sockets(self, user: str = "root") -> dict[int, "views.SocketView"]:
        proc = self.process(user)
        return {fd: views.socket_view(self, entry) for fd, entry in proc.fds.items() if isinstance(entry, OpenFile)}

    def ss_listener(self, port: int) -> tuple[int, int] | None:
        """`ss -lnt` Recv-Q/Send-Q for the TCP listener on port: (sk_ack_backlog, sk_max_ack_backlog)."""
        return views.ss_listener(self, port)

    def ss(self) -> list["views.SsRow"]:
        """Every TCP/UDP socket on the host as `ss -tuanm` would list it (TIME_WAIT included)."""
        return views.ss_rows(self)

    def port_owners(self, port: int, proto: str = "tcp") -> list["views.PortOwner"]:
        return views.port_owners(self, port, proto)

    # The nstat counters the model moves (every host.bump() name); any other counter it does not predict.
    MODELLED_COUNTERS = frozenset({
        "Tcp.ActiveOpens", "Tcp.PassiveOpens", "Tcp.OutRsts", "Tcp.AttemptFails", "TcpExt.TCPReqQFullDoCookies",
        "TcpExt.TCPReqQFullDrop", "TcpExt.ListenOverflows", "TcpExt.ListenDrops", "TcpExt.TCPAbortOnClose",
        "TcpExt.TCPAbortOnData", "Udp.SndbufErrors", "Udp.OutDatagrams", "Udp.NoPorts", "Udp.RcvbufErrors",
        "Udp.InErrors", "Udp.InDatagrams",
    })

    def predict_counters(self) -> dict[str, int]:
        """Lower bounds for nstat counters (TcpExt.ListenOverflows, TcpExt.ListenDrops, ...)."""
        return dict(self.counters)

    def __repr__(self) -> str:
        return f"<Host {self.name} {self.addrs4 + self.addrs6}>"

