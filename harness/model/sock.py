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
    """One socket: VFS-visible struct socket fields and protocol struct sock fields together."""

    __slots__ = (
        "host", "inode", "family", "type", "protocol", "ops", "uid",
        "ss_state", "sk_state",
        "reuse", "reuseport", "freebind", "v6only", "zerocopy",
        "sndbuf", "rcvbuf", "sndbuf_locked", "rcvbuf_locked", "bindport_locked",
        "rcv_addr", "port", "bound", "peer_addr", "peer_port", "autobound_by_connect",
        "max_ack_backlog", "accept_queue", "drops",
        "peer", "rx", "tx_pending", "datagrams", "rmem_alloc",
        "err", "shutdown", "fin_received", "orphan", "parent",
        "zckey", "errqueue", "omem", "zc_inflight",
        "device", "mss_clamp", "mss_cache", "syn_rto", "syn_retries_left", "syn_next", "route_host",
        "unix_path", "listening_backlog_set",
    )

    def __init__(self, host: "Host", inode: int, family: int, sock_type: int, protocol: int,
                 ops: "ProtoOps", uid: int):
        self.host = host
        self.inode = inode
        self.family = family
        self.type = sock_type
        self.protocol = protocol
        self.ops = ops
        self.uid = uid
        self.ss_state = SS_UNCONNECTED
        self.sk_state = TCP_CLOSE
        self.reuse = False
        self.reuseport = False
        self.freebind = False
        self.v6only = False
        self.zerocopy = False
        self.sndbuf = 0
        self.rcvbuf = 0
        self.sndbuf_locked = False
        self.rcvbuf_locked = False
        self.bindport_locked = False
        self.rcv_addr: str | None = None  # None: not bound; "0.0.0.0"/"::" wildcard
        self.port = 0
        self.bound = False
        self.peer_addr: str | None = None
        self.peer_port = 0
        self.autobound_by_connect = False
        self.max_ack_backlog = 0
        self.accept_queue: deque[Sock] = deque()
        self.drops = 0
        self.peer: Sock | None = None
        self.rx = bytearray()  # stream bytes not yet read
        self.tx_pending = bytearray()  # stream bytes the peer's window has not taken yet
        self.datagrams: deque[tuple[bytes, Any, int]] = deque()  # (payload, source, truesize)
        self.rmem_alloc = 0
        self.err: str | None = None  # sk_err as an errno name
        self.shutdown = 0
        self.fin_received = False
        self.orphan = False
        self.parent: Sock | None = None  # the listener while queued for accept
        self.zckey = 0
        self.errqueue: list[list[int]] = []  # [code, lo, hi] per queued notification skb
        self.omem = 0
        self.zc_inflight: list[list[int]] = []  # deferred uargs: [id, len, zerocopy_ok]
        self.device: Device | None = None
        self.mss_clamp = 0
        self.mss_cache = 0
        self.syn_rto = 0.0
        self.route_host = None  # the peer host a pending SYN goes to (None: nobody answers)
        self.syn_retries_left = 0
        self.syn_next = 0.0
        self.unix_path: str | None = None
        self.listening_backlog_set = False

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
                 "peer_addr", "peer_port", "inode", "substate", "peer")

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
        self.peer = sk.peer

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
