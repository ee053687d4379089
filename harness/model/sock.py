"""The modelled kernel objects: struct socket + struct sock (merged), TIME_WAIT minisocks, open files."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .constants import AF_INET6, SS_UNCONNECTED, TCP_CLOSE, TCP_TIME_WAIT

if TYPE_CHECKING:
    from .host import Host
    from .proto_ops import ProtoOps

RCV_SHUTDOWN = 1
SEND_SHUTDOWN = 2
SHUTDOWN_MASK = 3


@dataclass(frozen=True, slots=True)
class Device:
    """A network device as the zerocopy and MSS rules see it."""

    name: str
    mtu: int
    sg: bool
    csum: bool = True
    loopback: bool = False  # skb_orphan_frags_rx(): local delivery forces a deferred copy


class Sock:
    """One socket: VFS-visible struct socket fields and protocol struct sock fields together.

    Scalar fields default at class level so creating a socket only stores what differs; the
    per-socket containers are made in __init__.
    """

    ss_state = SS_UNCONNECTED
    sk_state = TCP_CLOSE
    reuse = False  # sk_reuse (SO_REUSEADDR)
    reuseport = False
    freebind = False  # inet->freebind (IP_FREEBIND / IPV6_FREEBIND)
    v6only = False
    zerocopy = False  # SOCK_ZEROCOPY flag
    broadcast = False  # SOCK_BROADCAST (SO_BROADCAST)
    keepalive = False  # SOCK_KEEPOPEN (SO_KEEPALIVE)
    ll_usec = 0  # sk_ll_usec (SO_BUSY_POLL); net.core.busy_read when made
    prefer_busy_poll = False  # sk_prefer_busy_poll (SO_PREFER_BUSY_POLL)
    busy_poll_budget = 0  # sk_busy_poll_budget (SO_BUSY_POLL_BUDGET); 0: NAPI_POLL_WEIGHT when polling
    nodelay = False  # tp->nonagle & TCP_NAGLE_OFF (TCP_NODELAY)
    sndbuf = 0
    rcvbuf = 0
    sndbuf_locked = False  # SOCK_SNDBUF_LOCK
    rcvbuf_locked = False
    bindport_locked = False  # SOCK_BINDPORT_LOCK: bind() named the port
    bindaddr_locked = False  # SOCK_BINDADDR_LOCK: bind() named an address
    rcv_addr: "str | None" = None  # None: not bound; "0.0.0.0"/"::" wildcard
    port = 0
    sport = 0  # inet_sport left behind when a TCP socket lost its port (getsockname still shows it)
    bound = False
    peer_addr: "str | None" = None
    peer_port = 0
    autobound_by_connect = False
    max_ack_backlog = 0
    drops = 0  # sk_drops
    peer: "Sock | TimeWaitSock | None" = None
    rmem_alloc = 0
    # TCP urgent data: urg_mark is the urgent byte's offset in rx while tp->urg_data is set (VALID, or
    # READ once recv(MSG_OOB) took it: urg_read); urg_pending is the sender's tp->snd_up as an offset
    # in tx_pending, for urgent data not yet delivered.
    urg_mark: "int | None" = None
    urg_read = False
    urg_pending: "int | None" = None
    oobinline = False  # SOCK_URGINLINE (SO_OOBINLINE)
    unix_wmem = 0  # sk_wmem_alloc - 1 of an AF_UNIX datagram sender: its skbs still queued at receivers
    err: "str | None" = None  # sk_err as an errno name
    shutdown = 0
    fin_received = False  # SOCK_DONE: the peer's FIN arrived
    orphan = False  # SOCK_DEAD: no file refers to it any more
    parent: "Sock | None" = None  # the listener while queued for accept
    zckey = 0  # sk_zckey: next MSG_ZEROCOPY id
    zc_tail: "list[int] | None" = None  # uarg of the unsent zerocopy data at the write queue's tail (TCP)
    omem = 0  # sk_omem_alloc
    device: "Device | None" = None
    mss_clamp = 0
    mss_cache = 0
    syn_rto = 0.0
    syn_retries_left = 0
    syn_next = 0.0
    route_host = None  # the peer host a pending SYN goes to (None: nobody answers)
    unix_path: "str | None" = None
    mapped_ops = False  # icsk_af_ops is ipv6_mapped: a v4-mapped connect got as far as sending its SYN
    syn_lost = False  # the pending SYN can never be answered (sent down the stale IPv4 path)
    rst_lost = False  # a child that inherited stale ipv6_mapped ops: its RST leaves on the IPv4 path, unseen

    def __init__(self, host: "Host", inode: int, family: int, sock_type: int, protocol: int,
                 ops: "ProtoOps", uid: int):
        self.host = host
        self.inode = inode
        self.family = family
        self.type = sock_type
        self.protocol = protocol
        self.ops = ops
        self.uid = uid
        self.rx = bytearray()  # stream bytes not yet read
        self.tx_pending = bytearray()  # stream bytes the peer's window has not taken yet
        # Containers only some sockets need start as shared empty tuples and become real
        # containers on first use (listen(), the first datagram, the first zerocopy send):
        # fewer allocations keep the cyclic GC out of the hot path.
        self.accept_queue: "deque[Sock] | tuple" = ()
        self.datagrams: "deque[tuple[bytes, Any, int]] | tuple" = ()  # (payload, source, truesize)
        self.errqueue: "list[list[int]] | tuple" = ()  # [code, lo, hi] per queued notification skb
        self.zc_inflight: "list[list[int]] | tuple" = ()  # uargs not yet completed: [id, len, zerocopy_ok, bytelen]

    @property
    def is_v6(self) -> bool:
        return self.family == AF_INET6

    def take_error(self) -> str | None:
        """sock_error(): read and clear sk_err."""
        err, self.err = self.err, None
        return err

    def __repr__(self) -> str:
        return f"<Sock inode={self.inode} fam={self.family} type={self.type} state={self.sk_state} port={self.port}>"


class TimeWaitSock:
    """inet_timewait_sock: keeps the port in the bind bucket after an active close."""

    __slots__ = ("host", "family", "rcv_addr", "port", "reuse", "reuseport", "uid", "v6only", "expires",
                 "peer_addr", "peer_port", "inode", "substate")

    sk_state = TCP_TIME_WAIT
    bound = True

    def __init__(self, sk: Sock, expires: float, substate: int):
        self.host = sk.host
        self.family = sk.family
        self.rcv_addr = sk.rcv_addr
        self.port = sk.port
        self.reuse = sk.reuse
        self.reuseport = sk.reuseport
        self.uid = sk.uid
        self.v6only = sk.v6only
        self.expires = expires
        self.peer_addr = sk.peer_addr
        self.peer_port = sk.peer_port
        self.inode = 0
        self.substate = substate  # TCP_FIN_WAIT2 until the peer's FIN arrives, then TCP_TIME_WAIT

    @property
    def is_v6(self) -> bool:
        return self.family == AF_INET6


class OpenFile:
    """A file table slot: the socket plus O_NONBLOCK (file status) and FD_CLOEXEC (descriptor flag)."""

    __slots__ = ("sock", "nonblock", "cloexec")

    def __init__(self, sock: Sock, nonblock: bool, cloexec: bool):
        self.sock = sock
        self.nonblock = nonblock
        self.cloexec = cloexec
