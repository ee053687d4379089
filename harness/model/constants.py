"""Linux x86_64 numeric constants for the socket layer, and a name resolver for step files."""

from __future__ import annotations

import errno as _errno

# Address families (include/linux/socket.h).
AF_UNSPEC = 0
AF_UNIX = 1
AF_LOCAL = 1
AF_INET = 2
AF_INET6 = 10
AF_NETLINK = 16
AF_PACKET = 17
AF_MAX = 46  # NPROTO: __sock_create rejects family >= this

# Socket types (include/linux/net.h) and the flag bits that share the type argument.
SOCK_STREAM = 1
SOCK_DGRAM = 2
SOCK_RAW = 3
SOCK_RDM = 4
SOCK_SEQPACKET = 5
SOCK_DCCP = 6
SOCK_PACKET = 10
SOCK_MAX = 11
SOCK_TYPE_MASK = 0xF
SOCK_NONBLOCK = 0o4000
SOCK_CLOEXEC = 0o2000000
O_NONBLOCK = 0o4000
O_CLOEXEC = 0o2000000
S_IFSOCK = 0o140000

# IP protocols (include/uapi/linux/in.h).
IPPROTO_IP = 0
IPPROTO_ICMP = 1
IPPROTO_TCP = 6
IPPROTO_UDP = 17
IPPROTO_IPV6 = 41
IPPROTO_ICMPV6 = 58
IPPROTO_SCTP = 132
IPPROTO_UDPLITE = 136
IPPROTO_RAW = 255
IPPROTO_MPTCP = 262
IPPROTO_MAX = 263

# Option levels.
SOL_IP = 0
SOL_SOCKET = 1
SOL_TCP = 6
SOL_UDP = 17
SOL_IPV6 = 41

# SOL_SOCKET options (include/uapi/asm-generic/socket.h, used by x86_64).
SO_DEBUG = 1
SO_REUSEADDR = 2
SO_TYPE = 3
SO_ERROR = 4
SO_DONTROUTE = 5
SO_BROADCAST = 6
SO_SNDBUF = 7
SO_RCVBUF = 8
SO_KEEPALIVE = 9
SO_OOBINLINE = 10
SO_NO_CHECK = 11
SO_PRIORITY = 12
SO_LINGER = 13
SO_BSDCOMPAT = 14
SO_REUSEPORT = 15
SO_PASSCRED = 16
SO_PEERCRED = 17
SO_RCVLOWAT = 18
SO_SNDLOWAT = 19
SO_ACCEPTCONN = 30
SO_SNDBUFFORCE = 32
SO_RCVBUFFORCE = 33
SO_PROTOCOL = 38
SO_DOMAIN = 39
SO_ZEROCOPY = 60
SO_BUSY_POLL = 46  # sk_ll_usec: microseconds to busy-poll the NIC queue before sleeping (CONFIG_NET_RX_BUSY_POLL)
SO_INCOMING_NAPI_ID = 56  # read-only: sk_napi_id, the NAPI context the socket's last packet came through
SO_PREFER_BUSY_POLL = 69
SO_BUSY_POLL_BUDGET = 70

# SOL_IP / SOL_IPV6 / SOL_TCP options.
IP_TOS = 1
IP_TTL = 2
IP_RECVERR = 11
IP_FREEBIND = 15
IP_TRANSPARENT = 19
IPV6_RECVERR = 25
IPV6_V6ONLY = 26
IPV6_FREEBIND = 78
TCP_NODELAY = 1
TCP_MAXSEG = 2

# send/recv flags (include/linux/socket.h).
MSG_OOB = 0x1
MSG_PEEK = 0x2
MSG_DONTROUTE = 0x4
MSG_CTRUNC = 0x8
MSG_TRUNC = 0x20
MSG_DONTWAIT = 0x40
MSG_EOR = 0x80
MSG_WAITALL = 0x100
MSG_ERRQUEUE = 0x2000
MSG_NOSIGNAL = 0x4000
MSG_MORE = 0x8000
MSG_ZEROCOPY = 0x4000000
MSG_FASTOPEN = 0x20000000
MSG_CMSG_CLOEXEC = 0x40000000

SHUT_RD = 0
SHUT_WR = 1
SHUT_RDWR = 2

# poll bits (include/uapi/asm-generic/poll.h).
POLLIN = 0x1
POLLPRI = 0x2
POLLOUT = 0x4
POLLERR = 0x8
POLLHUP = 0x10
POLLNVAL = 0x20
POLLRDNORM = 0x40
POLLRDBAND = 0x80
POLLWRNORM = 0x100
POLLWRBAND = 0x200
POLLRDHUP = 0x2000

# Extended error reporting (include/uapi/linux/errqueue.h).
SO_EE_ORIGIN_NONE = 0
SO_EE_ORIGIN_LOCAL = 1
SO_EE_ORIGIN_ICMP = 2
SO_EE_ORIGIN_ICMP6 = 3
SO_EE_ORIGIN_TXSTATUS = 4
SO_EE_ORIGIN_ZEROCOPY = 5
SO_EE_CODE_ZEROCOPY_COPIED = 1

# struct socket state (include/uapi/linux/net.h).
SS_FREE = 0
SS_UNCONNECTED = 1
SS_CONNECTING = 2
SS_CONNECTED = 3
SS_DISCONNECTING = 4

# TCP sk_state values (include/net/tcp_states.h).
TCP_ESTABLISHED = 1
TCP_SYN_SENT = 2
TCP_SYN_RECV = 3
TCP_FIN_WAIT1 = 4
TCP_FIN_WAIT2 = 5
TCP_TIME_WAIT = 6
TCP_CLOSE = 7
TCP_CLOSE_WAIT = 8
TCP_LAST_ACK = 9
TCP_LISTEN = 10
TCP_CLOSING = 11

# Capabilities (include/uapi/linux/capability.h).
CAP_NET_BIND_SERVICE = 10
CAP_NET_ADMIN = 12
CAP_NET_RAW = 13
CAP_IPC_LOCK = 14

SS_STATE_NAMES = {
    SS_FREE: "SS_FREE",
    SS_UNCONNECTED: "SS_UNCONNECTED",
    SS_CONNECTING: "SS_CONNECTING",
    SS_CONNECTED: "SS_CONNECTED",
    SS_DISCONNECTING: "SS_DISCONNECTING",
}

TCP_STATE_NAMES = {
    TCP_ESTABLISHED: "ESTABLISHED",
    TCP_SYN_SENT: "SYN_SENT",
    TCP_SYN_RECV: "SYN_RECV",
    TCP_FIN_WAIT1: "FIN_WAIT1",
    TCP_FIN_WAIT2: "FIN_WAIT2",
    TCP_TIME_WAIT: "TIME_WAIT",
    TCP_CLOSE: "CLOSE",
    TCP_CLOSE_WAIT: "CLOSE_WAIT",
    TCP_LAST_ACK: "LAST_ACK",
    TCP_LISTEN: "LISTEN",
    TCP_CLOSING: "CLOSING",
}

# fcntl(2) commands and descriptor flags (include/uapi/asm-generic/fcntl.h), so scenarios can name them.
F_GETFD, F_SETFD, F_GETFL, F_SETFL = 1, 2, 3, 4
FD_CLOEXEC = 1

_PREFIXES = (
    "AF_", "PF_", "SOCK_", "IPPROTO_", "SOL_", "SO_", "IP_", "IPV6_", "TCP_", "MSG_", "SHUT_",
    "POLL", "SS_", "O_", "S_IF", "CAP_", "F_", "FD_",
)

NAMES: dict[str, int] = {
    name: value
    for name, value in globals().items()
    if name.isupper() and isinstance(value, int) and name.startswith(_PREFIXES)
}
# PF_* are the same numbers as AF_* (include/linux/socket.h).
NAMES.update({"PF_" + name[3:]: value for name, value in list(NAMES.items()) if name.startswith("AF_")})


def resolve(value: int | str | None) -> int:
    """Turn 'SOCK_STREAM|SOCK_NONBLOCK', '0x40', 7 or 'EADDRINUSE' into an int; raises ValueError otherwise."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if value is None:
        return 0
    if not isinstance(value, str):
        raise ValueError(f"cannot resolve {value!r} to an integer constant")
    total = 0
    for part in value.split("|"):
        token = part.strip()
        if not token:
            raise ValueError(f"empty term in {value!r}")
        if token in NAMES:
            total |= NAMES[token]
        elif hasattr(_errno, token) and token.startswith("E"):
            total |= getattr(_errno, token)
        else:
            try:
                total |= int(token, 0)
            except ValueError:
                raise ValueError(f"unknown constant {token!r}") from None
    return total


def name_of(value: int, prefix: str) -> str:
    """Best-effort reverse lookup, e.g. name_of(2, 'AF_') -> 'AF_INET'."""
    for name, number in NAMES.items():
        if number == value and name.startswith(prefix):
            return name
    return str(value)

# epoll (include/uapi/linux/eventpoll.h)
EPOLL_CTL_ADD, EPOLL_CTL_DEL, EPOLL_CTL_MOD = 1, 2, 3
EPOLLIN, EPOLLPRI, EPOLLOUT, EPOLLERR, EPOLLHUP, EPOLLRDHUP = 0x1, 0x2, 0x4, 0x8, 0x10, 0x2000
EPOLLEXCLUSIVE, EPOLLWAKEUP, EPOLLONESHOT, EPOLLET = 1 << 28, 1 << 29, 1 << 30, 1 << 31
EPOLL_CLOEXEC = 0o2000000
EPOLL_NAMES = {name: value for name, value in list(globals().items()) if name.startswith("EPOLL")}
NAMES.update(EPOLL_NAMES)
