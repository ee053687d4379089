"""Random socket programs in the scenario format, each reproducible from (seed, program number).

A program is what a scenario body holds: ``sysctls`` and a list of step mappings. The generator
keeps the state a C programmer would (which sockets exist, of which family and type, which ports
listen) so most steps are meaningful, and spends a share of its choices on the edges the kernel
must reject: bad descriptors, wrong families, short address lengths, out-of-range values and
flags it refuses.

Programs stay out of each other's way on a live guest, where TIME_WAIT outlives a program:
program ``n`` uses its own block of fixed ports (``port_block``) and AF_UNIX names carrying
the seed and ``n``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

LAB_ADDRESSES = {"client": "198.51.100.1", "server": "198.51.100.2"}
PORT_BASE, PORTS_PER_PROGRAM, PORT_SPAN = 10000, 4, 20000
# Sysctls varied within ranges that keep the guest healthy (and far from the fixed port blocks).
SAFE_SYSCTLS: dict[str, list[Any]] = {
    "net.core.somaxconn": [1, 4, 128, 4096],
    "net.core.rmem_max": [2304, 65536, 212992],  # at least SOCK_MIN_RCVBUF
    "net.core.wmem_max": [4608, 65536, 212992],  # proc_dointvec_minmax: at least SOCK_MIN_SNDBUF
    "net.core.optmem_max": [4096, 20480],
    "net.ipv4.ip_local_port_range": [[32768, 60999], [40000, 50000]],
    "net.ipv4.ip_unprivileged_port_start": [1024, 0, 11000],
    "net.ipv6.bindv6only": [0, 1],
    "net.unix.max_dgram_qlen": [10, 2],
}
TYPES = ["SOCK_STREAM", "SOCK_DGRAM", "SOCK_SEQPACKET"]
SOCKOPTS = [
    ("SOL_SOCKET", "SO_REUSEADDR", [0, 1]), ("SOL_SOCKET", "SO_REUSEPORT", [0, 1]),
    ("SOL_SOCKET", "SO_RCVBUF", [0, 1, 1024, 65536, 1 << 30, -1]), ("SOL_SOCKET", "SO_SNDBUF", [0, 2048, 65536, -5]),
    ("SOL_SOCKET", "SO_KEEPALIVE", [0, 1]), ("SOL_SOCKET", "SO_BROADCAST", [0, 1]),
    ("SOL_SOCKET", "SO_RCVBUFFORCE", [4096]), ("SOL_SOCKET", "SO_PRIORITY", [0, 6, 7]),
    ("SOL_IPV6", "IPV6_V6ONLY", [0, 1]), ("SOL_TCP", "TCP_NODELAY", [0, 1]), ("SOL_IP", "IP_FREEBIND", [0, 1]),
    ("SOL_SOCKET", "SO_ZEROCOPY", [0, 1]),
]
GETOPTS = [
    ("SOL_SOCKET", "SO_TYPE"), ("SOL_SOCKET", "SO_ERROR"), ("SOL_SOCKET", "SO_RCVBUF"), ("SOL_SOCKET", "SO_SNDBUF"),
    ("SOL_SOCKET", "SO_REUSEADDR"), ("SOL_SOCKET", "SO_REUSEPORT"), ("SOL_SOCKET", "SO_DOMAIN"),
    ("SOL_SOCKET", "SO_PROTOCOL"), ("SOL_SOCKET", "SO_ACCEPTCONN"), ("SOL_IPV6", "IPV6_V6ONLY"),
    ("SOL_TCP", "TCP_NODELAY"), ("SOL_SOCKET", "SO_KEEPALIVE"),
]
# Calls whose answer can lag the model's instant handshake: compared with `eventually` (docs/scenarios.md).
PROGRAM_LENGTH = 50  # steps per program: long enough for long batches, short enough to shrink fast
SOLO_SHARE, SOLO_LENGTH_FACTOR = 0.5, 3
SWITCH_ACTOR = 1 / 20  # mean length of a run of steps on one (host, user)
SETTLING = {"accept", "accept4", "recv", "recvmsg", "recvfrom", "poll", "getpeername", "connect", "epoll_wait",
            "send", "sendto", "sendmsg", "bind"}
EPOLL_EVENTS = ["EPOLLIN", "EPOLLOUT", "EPOLLIN|EPOLLOUT", "EPOLLIN|EPOLLRDHUP", "EPOLLIN|EPOLLET",
                "EPOLLIN|EPOLLOUT|EPOLLET", "EPOLLIN|EPOLLONESHOT", "EPOLLOUT|EPOLLONESHOT", "EPOLLIN|EPOLLEXCLUSIVE",
                "EPOLLIN|EPOLLEXCLUSIVE|EPOLLONESHOT", 0]


@dataclass
class Sock:
    name: str
    host: str
    user: str
    family: str
    type: str
    nonblock: bool
    state: str = "new"  # new, bound, listening, connecting, connected, closed
    port: int | None = None


@dataclass
class Program:
    """One generated program: a scenario body's ``sysctls`` and ``steps``, and where it came from."""

    seed: int
    number: int
    hosts: tuple[str, ...]
    sysctls: dict[str, dict[str, Any]] = field(default_factory=dict)
    steps: list[dict[str, Any]] = field(default_factory=list)


def port_block(seed: int, number: int) -> list[int]:
    """Program ``number``'s fixed ports: a block of its own, so TIME_WAIT from earlier programs never meets it."""
    start = PORT_BASE + ((seed * 7919 + number) * PORTS_PER_PROGRAM) % PORT_SPAN
    return [start + i for i in range(PORTS_PER_PROGRAM)]


def low_port(seed: int, number: int) -> int:
    return 100 + (seed * 31 + number) % 900


SHRINK_BLOCKS = 2500  # program numbers from here on are for shrink candidates (their own ports)


def relocate(program: Program, number: int) -> Program:
    """``program`` with its ports and AF_UNIX names moved to those of program ``number``.

    A shrink candidate reruns a program whose first run may have left TIME_WAIT on its ports;
    moved, it meets nothing of that run.
    """
    moves: dict[Any, Any] = dict(zip(port_block(program.seed, program.number), port_block(program.seed, number)))
    moves[low_port(program.seed, program.number)] = low_port(program.seed, number)
    old_tag, new_tag = f"fz{program.seed}-{program.number}-", f"fz{program.seed}-{number}-"

    def move(value: Any) -> Any:
        if isinstance(value, list):
            return [move(item) for item in value]
        if isinstance(value, str) and old_tag in value:
            return value.replace(old_tag, new_tag)
        if isinstance(value, int) and not isinstance(value, bool) and value in moves:
            return moves[value]
        return value

    steps = []
    for step in program.steps:
        args = {key: (move(value) if key == "addr" else value) for key, value in step["args"].items()}
        steps.append({**step, "args": args})
    return Program(program.seed, number, program.hosts, program.sysctls, steps)


class Generator:
    """Builds one program step by step from ``random.Random(f"{seed}:{number}")``."""

    def __init__(self, seed: int, number: int, hosts: tuple[str, ...] = ("server", "client"), length: int = PROGRAM_LENGTH,
                 users: tuple[str, ...] = ("root", "student")) -> None:
        self.rng = random.Random(f"{seed}:{number}")
        self.seed, self.number = seed, number
        # Half the programs are one process's (one host, one user): one batch, one round trip, and the
        # longest runs of state. The others cross users and hosts, in runs of steps on one of them.
        self.solo = self.rng.random() < SOLO_SHARE
        self.hosts = hosts if len(hosts) == 1 or (not self.solo and self.rng.random() < 0.7) else hosts[:1]
        self.users = (self.rng.choice(users),) if self.solo else users
        self.length = length * SOLO_LENGTH_FACTOR if self.solo else length
        self.ports = port_block(seed, number)
        self.low_port = low_port(seed, number)
        self.socks: list[Sock] = []
        self.epolls: list[Sock] = []  # epoll files (family "epoll"), one list for every actor
        self.watched: dict[str, list[Sock]] = {}  # epoll file name -> the sockets it was given with ADD
        self.counter = 0
        self.program = Program(seed, number, self.hosts)
        self.unix_names = [f"@fz{seed}-{number}-{i}" for i in range(2)] + [f"/tmp/fz{seed}-{number}-0"]
        # Steps come in runs on one (host, user): each run is one batch, one round trip to its agent.
        self.actor = (self.rng.choice(self.hosts), self.rng.choice(self.users))

    # -- the program ------------------------------------------------------------------------------

    def build(self) -> Program:
        rng = self.rng
        if rng.random() < 0.35:
            for _ in range(rng.randint(1, 2)):
                name = rng.choice(sorted(SAFE_SYSCTLS))
                host = rng.choice(self.hosts)
                self.program.sysctls.setdefault(host, {})[name] = rng.choice(SAFE_SYSCTLS[name])
        while len(self.program.steps) < self.length:
            self.step()
        return self.program

    def emit(self, host: str, user: str, call: str, args: dict[str, Any], save: str | None = None,
             **extra: Any) -> None:
        step: dict[str, Any] = {"on": host, "call": call, "args": args}
        if user != "root":
            step["user"] = user
        if save:
            step["as"] = save
        if call in SETTLING:
            step["compare"] = "eventually"
        step.update(extra)
        self.program.steps.append(step)

    def live(self, host: str | None = None, user: str | None = None) -> list[Sock]:
        return [s for s in self.socks if s.state != "closed" and (host is None or s.host == host)
                and (user is None or s.user == user)]

    def step(self) -> None:
        rng = self.rng
        if rng.random() < SWITCH_ACTOR:
            self.actor = (rng.choice(self.hosts), rng.choice(self.users))
        if not self.live(*self.actor) or rng.random() < 0.12:
            return self.new_socket()
        choices = [
            (self.bind, 10), (self.listen, 7), (self.connect, 9), (self.accept, 7), (self.setsockopt, 6),
            (self.getsockopt, 5), (self.send, 8), (self.recv, 7), (self.poll, 5), (self.shutdown, 3),
            (self.close, 4), (self.fcntl, 3), (self.getname, 4), (self.edge, 4), (self.sysctl, 1),
            (self.epoll, 5),
        ]
        action = rng.choices([c for c, _ in choices], [w for _, w in choices])[0]
        action()

    # -- sockets --------------------------------------------------------------------------------

    def new_socket(self) -> None:
        rng = self.rng
        host, user = self.actor
        family = rng.choices(["AF_INET", "AF_INET6", "AF_UNIX"], [5, 3, 2])[0]
        kind = rng.choices(TYPES, [6, 4, 1 if family == "AF_UNIX" else 0.2])[0]
        nonblock = rng.random() < 0.6
        type_text = kind + ("|SOCK_NONBLOCK" if nonblock else "") + ("|SOCK_CLOEXEC" if rng.random() < 0.2 else "")
        args: dict[str, Any] = {"family": family, "type": type_text}
        if rng.random() < 0.1:
            args["protocol"] = rng.choice(["IPPROTO_TCP", "IPPROTO_UDP", 0, 99])
        self.counter += 1
        name = f"s{self.counter}"
        self.emit(host, user, "socket", args, save=name)
        self.socks.append(Sock(name, host, user, family, kind, nonblock))

    def pick(self) -> Sock | None:
        """A socket of the current actor, now and then anyone's (a descriptor of another process: EBADF or worse)."""
        socks = self.live(*self.actor) if self.rng.random() < 0.97 else self.live()
        return self.rng.choice(socks) if socks else None

    def fd(self, sock: Sock) -> Any:
        if self.rng.random() < 0.03:
            return self.rng.choice([999, -1, 0])  # not a socket, or not open
        return f"${sock.name}"

    def address(self, sock: Sock, for_bind: bool) -> tuple[Any, dict[str, Any]]:
        """An address for ``sock``'s family (now and then another family's), and extra args (family, addrlen)."""
        rng = self.rng
        extra: dict[str, Any] = {}
        family = sock.family
        if rng.random() < 0.06:
            family = rng.choice(["AF_INET", "AF_INET6", "AF_UNIX"])  # the wrong family's address
        # Now and then port 0 or a privileged port of this program's own (EACCES for the student).
        port = rng.choice(self.ports) if rng.random() < 0.85 else rng.choice([0, self.low_port])
        others = [LAB_ADDRESSES[h] for h in self.hosts if h != sock.host]
        own = LAB_ADDRESSES[sock.host]
        if family == "AF_UNIX":
            addr: Any = rng.choice(self.unix_names)
        elif family == "AF_INET":
            pool = ["0.0.0.0", "127.0.0.1", own] + (["198.51.100.77"] if for_bind else []) + others
            addr = [rng.choice(pool), port]
        else:
            pool = ["::", "::1", "::ffff:127.0.0.1", f"::ffff:{own}"] + [f"::ffff:{o}" for o in others]
            addr = [rng.choice(pool), port]
        if rng.random() < 0.04:
            extra["addrlen"] = rng.choice([0, 1, 8, 15, 23, 200])
        if rng.random() < 0.03:
            extra["family"] = rng.choice(["AF_UNSPEC", "AF_INET", "AF_INET6", 99])
        return addr, extra

    def bind(self) -> None:
        sock = self.pick()
        if sock is None:
            return
        addr, extra = self.address(sock, True)
        self.emit(sock.host, sock.user, "bind", {"fd": self.fd(sock), "addr": addr, **extra})
        if sock.state == "new":
            sock.state = "bound"
            sock.port = addr if isinstance(addr, str) else addr[1] or None

    def listen(self) -> None:
        sock = self.pick()
        if sock is None:
            return
        backlog = self.rng.choice([0, 1, 2, 5, 128, -1, 100000])
        self.emit(sock.host, sock.user, "listen", {"fd": self.fd(sock), "backlog": backlog})
        sock.state = "listening"

    def connect(self) -> None:
        sock = self.pick()
        if sock is None:
            return
        rng = self.rng
        listeners = [s for s in self.live() if s.state == "listening" and s.family == sock.family] if \
            rng.random() < 0.7 else []
        if not sock.nonblock and sock.type != "SOCK_DGRAM" and not listeners and sock.family != "AF_UNIX":
            return  # a blocking connect to nobody costs the guest seconds of ARP or SYN retries
        if listeners:
            target = rng.choice(listeners)
            port: Any = target.port
            unnamed = not isinstance(port, str) if sock.family == "AF_UNIX" else not isinstance(port, int)
            if unnamed or (target.host, target.user) == self.actor and rng.random() < 0.5:
                # The listener's own answer: an ephemeral port differs between the kernel and the model.
                self.counter += 1
                where = f"n{self.counter}"
                self.emit(target.host, target.user, "getsockname", {"fd": f"${target.name}"}, save=where)
                port = f"${where}.port"
            if sock.family == "AF_UNIX":
                addr: Any = f"${where}" if unnamed else port
            else:
                ip = LAB_ADDRESSES[target.host] if target.host != sock.host or rng.random() < 0.5 else "127.0.0.1"
                if sock.family == "AF_INET6":
                    ip = "::ffff:" + ip if rng.random() < 0.8 else "::1"
                addr = [ip, port]
            self.emit(sock.host, sock.user, "connect", {"fd": self.fd(sock), "addr": addr})
        else:
            addr, extra = self.address(sock, False)
            if isinstance(addr, list) and addr[0] == "198.51.100.77":
                return
            self.emit(sock.host, sock.user, "connect", {"fd": self.fd(sock), "addr": addr, **extra})
        sock.state = "connecting"

    def accept(self) -> None:
        socks = [s for s in self.live() if s.state == "listening"] or self.live()
        if not socks:
            return
        sock = self.rng.choice(socks)
        if not sock.nonblock and self.rng.random() < 0.9:
            return  # a blocking accept on an empty queue waits out the block guard
        self.counter += 1
        name = f"a{self.counter}"
        if self.rng.random() < 0.5:
            flags = self.rng.choice(["SOCK_NONBLOCK", "SOCK_CLOEXEC", 0, "SOCK_NONBLOCK|SOCK_CLOEXEC", 1])
            self.emit(sock.host, sock.user, "accept4", {"fd": self.fd(sock), "flags": flags}, save=name)
            nonblock = isinstance(flags, str) and "NONBLOCK" in flags
        else:
            self.emit(sock.host, sock.user, "accept", {"fd": self.fd(sock)}, save=name)
            nonblock = False
        self.socks.append(Sock(name, sock.host, sock.user, sock.family, sock.type, nonblock, "connected"))

    def setsockopt(self) -> None:
        sock = self.pick()
        if sock is None:
            return
        level, optname, values = self.rng.choice(SOCKOPTS)
        args: dict[str, Any] = {"fd": self.fd(sock), "level": level, "optname": optname,
                                "value": self.rng.choice(values)}
        if self.rng.random() < 0.08:
            args["optlen"] = self.rng.choice([0, 1, 2, 8])
        self.emit(sock.host, sock.user, "setsockopt", args)

    def getsockopt(self) -> None:
        sock = self.pick()
        if sock is None:
            return
        level, optname = self.rng.choice(GETOPTS)
        self.emit(sock.host, sock.user, "getsockopt", {"fd": self.fd(sock), "level": level, "optname": optname})

    def send(self) -> None:
        sock = self.pick()
        if sock is None:
            return
        rng = self.rng
        call = rng.choice(["send", "sendto", "sendmsg"])
        flags = rng.choice(["MSG_DONTWAIT", "MSG_DONTWAIT|MSG_NOSIGNAL", "MSG_NOSIGNAL", 0])
        if not sock.nonblock and "DONTWAIT" not in str(flags):
            flags = "MSG_DONTWAIT" if flags == 0 else f"{flags}|MSG_DONTWAIT"
        args: dict[str, Any] = {"fd": self.fd(sock), "length": rng.choice([0, 1, 100, 1500, 3000]), "flags": flags}
        if call != "send" and sock.type == "SOCK_DGRAM" and rng.random() < 0.7:
            addr, extra = self.address(sock, False)
            if not (isinstance(addr, list) and addr[0] == "198.51.100.77"):
                args.update({"addr": addr, **extra})
        if rng.random() < 0.1 and sock.type != "SOCK_DGRAM":
            self.emit(sock.host, sock.user, call, args, until="EAGAIN", max=2000)
            return
        self.emit(sock.host, sock.user, call, args)

    def recv(self) -> None:
        sock = self.pick()
        if sock is None:
            return
        rng = self.rng
        flags = rng.choice(["MSG_DONTWAIT", "MSG_DONTWAIT|MSG_PEEK", "MSG_DONTWAIT|MSG_TRUNC", 0])
        if not sock.nonblock and "DONTWAIT" not in str(flags):
            flags = "MSG_DONTWAIT"
        call = rng.choice(["recv", "recvfrom", "recvmsg"])
        self.emit(sock.host, sock.user, call, {"fd": self.fd(sock), "length": rng.choice([0, 1, 64, 4096]),
                                               "flags": flags})

    def poll(self) -> None:
        host, user = self.actor
        socks = self.live(host, user)
        if not socks:
            return
        chosen = self.rng.sample(socks, min(len(socks), self.rng.randint(1, 3)))
        events = self.rng.choice(["POLLIN|POLLOUT", "POLLIN", "POLLOUT", "POLLIN|POLLOUT|POLLRDHUP"])
        self.emit(host, user, "poll", {"fds": [f"${s.name}" for s in chosen], "events": events, "timeout": 0})

    def shutdown(self) -> None:
        sock = self.pick()
        if sock is None:
            return
        how = self.rng.choice(["SHUT_RD", "SHUT_WR", "SHUT_RDWR", 3, -1])
        self.emit(sock.host, sock.user, "shutdown", {"fd": self.fd(sock), "how": how})

    def close(self) -> None:
        sock = self.pick()
        if sock is None:
            return
        self.emit(sock.host, sock.user, "close", {"fd": f"${sock.name}"})
        sock.state = "closed"

    def fcntl(self) -> None:
        sock = self.pick()
        if sock is None:
            return
        rng = self.rng
        cmd = rng.choice(["F_GETFL", "F_SETFL", "F_GETFD", "F_SETFD"])
        args: dict[str, Any] = {"fd": self.fd(sock), "cmd": cmd}
        if cmd == "F_SETFL":
            args["arg"] = rng.choice(["O_NONBLOCK", 0])
            sock.nonblock = args["arg"] == "O_NONBLOCK"
        elif cmd == "F_SETFD":
            args["arg"] = rng.choice(["FD_CLOEXEC", 0])
        self.emit(sock.host, sock.user, "fcntl", args)

    def getname(self) -> None:
        sock = self.pick()
        if sock is None:
            return
        self.emit(sock.host, sock.user, self.rng.choice(["getsockname", "getpeername"]), {"fd": self.fd(sock)})

    def edge(self) -> None:
        """A call the kernel must refuse: a bad socket() triple, a bad descriptor, rejected flags."""
        rng = self.rng
        host, user = self.actor
        kind = rng.randrange(4)
        if kind == 0:
            args = {"family": rng.choice([-1, 45, 46, "AF_INET"]), "type": rng.choice(["SOCK_RAW", 11, 0x100, -1]),
                    "protocol": rng.choice([0, 300, -1])}
            self.emit(host, user, "socket", args)
        elif kind == 1:
            fd = rng.choice([999, 0, -1])
            if rng.random() < 0.5:
                self.emit(host, user, "listen", {"fd": fd, "backlog": 1})
            else:
                self.emit(host, user, "shutdown", {"fd": fd, "how": "SHUT_RDWR"})
        elif kind == 2:
            sock = self.pick()
            if sock is not None:
                self.emit(sock.host, sock.user, "send", {"fd": f"${sock.name}", "length": 1,
                                                         "flags": rng.choice(["MSG_OOB|MSG_DONTWAIT", "MSG_DONTWAIT|MSG_EOR"])})
        else:
            self.emit(host, user, "close", {"fd": rng.choice([999, -1])})

    def epoll(self) -> None:
        """epoll_create1, epoll_ctl (ADD, MOD, DEL, and the flags it refuses) and non-blocking epoll_wait."""
        rng = self.rng
        host, user = self.actor
        mine = [e for e in self.epolls if (e.host, e.user) == self.actor and e.state != "closed"]
        if not mine or rng.random() < 0.1:
            self.counter += 1
            name = f"e{self.counter}"
            flags = rng.choices(["EPOLL_CLOEXEC", 0, 1], [3, 6, 1])[0]
            self.emit(host, user, "epoll_create1", {"flags": flags}, save=name)
            if flags != 1:
                self.epolls.append(Sock(name, host, user, "epoll", "epoll", False))
            return
        ep = rng.choice(mine)
        if rng.random() < 0.04:
            self.emit(host, user, "close", {"fd": f"${ep.name}"})
            ep.state = "closed"
            return
        if rng.random() < 0.45:
            maxevents = 16 if rng.random() < 0.9 else rng.choice([0, -1, 1])
            self.emit(host, user, "epoll_wait", {"epfd": f"${ep.name}", "maxevents": maxevents, "timeout": 0})
            return
        op = rng.choices(["EPOLL_CTL_ADD", "EPOLL_CTL_MOD", "EPOLL_CTL_DEL", 99], [5, 3, 2, 0.3])[0]
        watched = [s for s in self.watched.setdefault(ep.name, []) if s.state != "closed"]
        if rng.random() < 0.05:
            target: Any = f"${ep.name}"  # an epoll file watching itself: EINVAL
        else:
            # MOD and DEL mostly name a socket this epoll file watches; ADD mostly one it does not yet.
            sock = rng.choice(watched) if op in ("EPOLL_CTL_MOD", "EPOLL_CTL_DEL") and watched \
                and rng.random() < 0.85 else self.pick()
            if sock is None:
                return
            target = self.fd(sock)
            if op == "EPOLL_CTL_ADD" and sock not in watched:
                self.watched[ep.name].append(sock)
            elif op == "EPOLL_CTL_DEL" and sock in self.watched[ep.name]:
                self.watched[ep.name].remove(sock)
        self.emit(host, user, "epoll_ctl", {"epfd": f"${ep.name}", "op": op, "fd": target,
                                            "events": rng.choice(EPOLL_EVENTS)})

    def sysctl(self) -> None:
        host, user = self.actor
        self.emit(host, user, "sysctl_get", {"name": self.rng.choice(sorted(SAFE_SYSCTLS))})


def generate(seed: int, number: int, hosts: tuple[str, ...] = ("server", "client"), length: int = PROGRAM_LENGTH) -> Program:
    return Generator(seed, number, hosts, length).build()
