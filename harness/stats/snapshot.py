"""Immutable records of one VM's socket-layer state, and the deltas between two of them.

Every record says which kernel field a number reports, so a lab can explain
what it shows: a listener's Recv-Q is ``sk->sk_ack_backlog``, its Send-Q is
``sk->sk_max_ack_backlog``, and ``skmem:(r…)`` is ``sk->sk_rmem_alloc``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Generic, TypeVar

from .errors import StatsError, StatsLookupError

K = TypeVar("K")
V = TypeVar("V")


class FrozenDict(Mapping[K, V], Generic[K, V]):
    """A read-only, hashable mapping, so the records holding one stay immutable and hashable."""

    __slots__ = ("_items", "_hash")

    def __init__(self, items: Mapping[K, V] | None = None) -> None:
        self._items: dict[K, V] = dict(items or {})
        self._hash: int | None = None

    def __getitem__(self, key: K) -> V:
        return self._items[key]

    def __iter__(self) -> Iterator[K]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        if self._hash is None:
            self._hash = hash(frozenset(self._items.items()))
        return self._hash

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Mapping):
            return dict(self._items) == dict(other)
        return NotImplemented

    def __repr__(self) -> str:
        return f"FrozenDict({self._items!r})"


EMPTY: FrozenDict = FrozenDict()


# -- sockets (ss) -------------------------------------------------------------


@dataclass(frozen=True)
class SkMem:
    """``skmem:(r,rb,t,tb,f,w,o,bl,d)``: the socket's memory, named after the ``struct sock`` fields.

    sock_diag fills these from ``sk_get_meminfo()`` (net/core/sock.c) in the
    order of ``SK_MEMINFO_RMEM_ALLOC … SK_MEMINFO_DROPS``; ss prints them with
    the one- or two-letter prefixes in brackets. All are bytes except ``sk_drops``.
    """

    sk_rmem_alloc: int      # r: truesize of skbs charged to the receive side (queued, not yet read)
    sk_rcvbuf: int          # rb: receive buffer limit (SO_RCVBUF doubled, or tcp_rmem autotuning)
    sk_wmem_alloc: int      # t: truesize of skbs sent but not yet freed below the socket (qdisc, driver, or
                            #    for AF_UNIX the bytes sitting in the peer's receive queue)
    sk_sndbuf: int          # tb: send buffer limit
    sk_forward_alloc: int   # f: memory reserved from the protocol's pool but not used yet
    sk_wmem_queued: int     # w: truesize of the write queue (TCP: sent-unacked plus not yet sent)
    sk_omem_alloc: int      # o: option memory (ancillary data, socket filters, MSG_ZEROCOPY notifications)
    sk_backlog_len: int     # bl: packets queued on sk_backlog while a user context held the socket lock
    sk_drops: int           # d: packets dropped for this socket (a listener counts refused handshakes here)

    LETTERS = ("r", "rb", "t", "tb", "f", "w", "o", "bl", "d")


@dataclass(frozen=True)
class Endpoint:
    """One side of a socket as ss prints it.

    For inet sockets ``address`` is the numeric address without brackets
    (``*`` for a dual-stack IPv6 wildcard, which ss prints instead of ``[::]``)
    and ``port`` is ``None`` when ss prints ``*``. For AF_UNIX sockets
    ``address`` is the path, ``@name`` for the abstract namespace or ``*``
    when unbound, and ``port`` is the socket's inode (``unix_diag``'s
    ``udiag_ino`` locally, ``UNIX_DIAG_PEER`` for the peer, 0 when none).
    """

    address: str
    port: int | None
    interface: str | None = None  # ``%dev`` suffix: bound with SO_BINDTODEVICE

    def __str__(self) -> str:
        dev = f"%{self.interface}" if self.interface else ""
        port = "*" if self.port is None else str(self.port)
        if ":" in self.address:
            return f"[{self.address}]{dev}:{port}"
        return f"{self.address}{dev}:{port}"


@dataclass(frozen=True)
class TcpInfo:
    """The ``struct tcp_info`` fields ss prints with ``-i`` (``tcp_get_info()``, net/ipv4/tcp.c).

    ss leaves out zero values, so a missing field reads 0 here. Times are in
    milliseconds as ss prints them. For a LISTEN socket the kernel reuses two
    fields: ``unacked`` is ``sk_ack_backlog`` and (unprinted) ``sacked`` is
    ``sk_max_ack_backlog``. ``fields`` keeps every ``key:value`` token exactly
    as printed, so nothing ss showed is lost; ``flags`` keeps the bare words.
    """

    congestion: str = ""        # tcp_congestion_ops name (INET_DIAG_CONG), e.g. cubic
    rto_ms: float = 0.0         # icsk_rto
    rtt_ms: float = 0.0         # srtt_us >> 3, smoothed RTT
    rttvar_ms: float = 0.0      # mdev_us >> 2
    min_rtt_ms: float = 0.0     # tcp_min_rtt()
    ato_ms: float = 0.0         # icsk_ack.ato, delayed-ACK timeout
    backoff: int = 0            # icsk_backoff, RTO exponential backoff count
    mss: int = 0                # mss_cache, the send MSS
    rcv_mss: int = 0            # icsk_ack.rcv_mss
    advmss: int = 0             # advmss
    pmtu: int = 0               # icsk_pmtu_cookie
    cwnd: int = 0               # snd_cwnd, in segments
    ssthresh: int = 0           # snd_ssthresh (not printed while it is "infinite")
    bytes_sent: int = 0         # bytes_sent, including retransmissions
    bytes_retrans: int = 0      # bytes_retrans
    bytes_acked: int = 0        # bytes_acked (RFC 4898 tcpEStatsAppHCThruOctetsAcked)
    bytes_received: int = 0     # bytes_received (tcpEStatsAppHCThruOctetsReceived)
    segs_out: int = 0           # segs_out
    segs_in: int = 0            # segs_in
    data_segs_out: int = 0      # data_segs_out
    data_segs_in: int = 0       # data_segs_in
    delivered: int = 0          # delivered
    unacked: int = 0            # packets_out; for a listener: sk_ack_backlog
    retrans: int = 0            # retrans_out, segments retransmitted and still unacknowledged
    retrans_total: int = 0      # total_retrans over the connection's life
    lost: int = 0               # lost_out
    notsent_bytes: int = 0      # write_seq - snd_nxt: queued but not sent yet
    rcv_space: int = 0          # rcvq_space.space, receive-buffer autotuning estimate
    rcv_ssthresh: int = 0       # rcv_ssthresh, window clamp while slow-starting the receive window
    snd_wnd: int = 0            # snd_wnd, the peer's advertised window
    send_bps: int = 0           # ss's estimate cwnd * mss * 8 / rtt
    pacing_rate_bps: int = 0    # sk_pacing_rate * 8
    delivery_rate_bps: int = 0  # tcp_compute_delivery_rate() * 8
    app_limited: bool = False   # rate sample was application limited
    flags: frozenset[str] = frozenset()
    fields: FrozenDict[str, str] = EMPTY


@dataclass(frozen=True)
class Socket:
    """One line of ``ss -tuxanmieHO``: a TCP, UDP or AF_UNIX socket.

    ``recv_q`` and ``send_q`` mean different things by kind and state:

    * TCP LISTEN: ``sk_ack_backlog`` (connections in the accept queue) and
      ``sk_max_ack_backlog`` (the ``listen()`` backlog, capped by
      somaxconn). The queue is full only when it holds backlog + 1
      (``sk_acceptq_is_full()`` compares with ``>``).
    * TCP otherwise: ``rcv_nxt - copied_seq`` (bytes received, not yet read)
      and ``write_seq - snd_una`` (bytes sent or queued, not yet acknowledged).
    * UDP: ``sk_rmem_alloc`` minus the forward deficit (truesize of queued
      datagrams, not payload bytes) and ``sk_wmem_alloc``.
    * AF_UNIX LISTEN: connections waiting in ``sk_receive_queue`` and
      ``sk_max_ack_backlog``; otherwise ``unix_inq_len()`` (stream: all
      unread bytes; datagram: the first datagram's length) and
      ``sk_wmem_alloc`` (bytes in the peer's queue, charged to the sender).

    ``inode`` is the socket inode (``sock_i_ino()``, what /proc/PID/fd links
    name). A TCP connection still waiting in an accept queue has no file yet
    and shows inode 0, as do TIME-WAIT and SYN-RECV mini sockets.
    """

    netid: str                  # tcp, udp, u_str, u_dgr, u_seq
    state: str                  # ss's name: LISTEN, ESTAB, UNCONN, SYN-SENT, TIME-WAIT, …
    recv_q: int
    send_q: int
    local: Endpoint
    peer: Endpoint
    inode: int
    uid: int | None             # sock_i_uid(); ss prints it only when non-zero; None for AF_UNIX (not dumped)
    cookie: int | None          # ``sk:`` sock_gen_cookie(), unique for the socket's life; None for AF_UNIX
    v6only: bool | None         # IPV6_V6ONLY of an AF_INET6 socket; None otherwise
    shutdown: str | None        # ``<->`` open, ``-->`` receive side shut, ``<--`` send side shut, ``---`` both
    timer: str | None           # ``timer:(name,expires,retrans)`` as printed, e.g. ``(on,5.7ms,3)``
    cgroup: str | None
    skmem: SkMem | None         # None only for mini sockets: TIME-WAIT, SYN-RECV, an orphan's FIN-WAIT-2
    tcp: TcpInfo | None         # TCP sockets with a full struct tcp_sock
    vfs_inode: int | None = None     # AF_UNIX bound to a path: the inode of the socket file
    vfs_dev: str | None = None       # and its device, as major/minor
    pending: tuple[int, ...] = ()    # AF_UNIX listener: inodes of connections waiting to be accepted
    line: str = field(default="", compare=False, repr=False)

    @property
    def family(self) -> str:
        """``inet``, ``inet6`` or ``unix``."""
        if self.netid.startswith("u_"):
            return "unix"
        if self.local.address == "*" or ":" in self.local.address:
            return "inet6"
        return "inet"

    @property
    def is_listener(self) -> bool:
        return self.state == "LISTEN"

    @property
    def accept_queue(self) -> int:
        """A listener's ``sk_ack_backlog``: connections ready for ``accept()``."""
        self._require_listener("accept_queue")
        return self.recv_q

    @property
    def backlog(self) -> int:
        """A listener's ``sk_max_ack_backlog``: ``min(backlog, somaxconn)`` from ``listen()``."""
        self._require_listener("backlog")
        return self.send_q

    @property
    def accept_queue_full(self) -> bool:
        """``sk_acceptq_is_full()``: the next completed handshake overflows (TcpExt.ListenOverflows)."""
        self._require_listener("accept_queue_full")
        return self.recv_q > self.send_q

    def _require_listener(self, what: str) -> None:
        if not self.is_listener:
            raise StatsError(f"{what} is a listener's value; this {self.netid} socket {self.local} is {self.state}")


# -- NICs (ethtool) -----------------------------------------------------------


@dataclass(frozen=True)
class Feature:
    """One line of ``ethtool -k``: a netdev feature bit (``NETIF_F_*``). Truthy when on.

    ``fixed`` means the driver does not offer it in ``hw_features``, so
    ``ethtool -K`` cannot change it. ``requested`` is shown only when the
    wanted state differs from the active one (a dependency keeps it off).
    """

    name: str
    enabled: bool
    fixed: bool
    requested: bool | None = None
    parent: str | None = None  # the umbrella feature an indented line belongs to

    def __bool__(self) -> bool:
        return self.enabled


@dataclass(frozen=True)
class NicQueue:
    """The ``ethtool -S`` counters of one RX or TX queue (virtio_net: ``rx_queue_0_packets`` → ``packets``)."""

    direction: str  # "rx" or "tx"
    index: int
    counters: FrozenDict[str, int]

    def __getitem__(self, name: str) -> int:
        return self.counters[name]


@dataclass(frozen=True)
class Nic:
    """A network interface: its driver counters (``ethtool -S``) and offload features (``ethtool -k``).

    ``counters`` holds every ``ethtool -S`` line as printed; ``queues`` groups
    the per-queue ones. ``counters_collected`` is False for the loopback
    device (its driver has no statistics) and for NICs left out with
    ``collect(nics=…)``; their features are still there.
    """

    name: str
    counters: FrozenDict[str, int]
    queues: tuple[NicQueue, ...]
    features: FrozenDict[str, Feature]
    counters_collected: bool

    def queue(self, direction: str, index: int) -> NicQueue:
        for queue in self.queues:
            if queue.direction == direction and queue.index == index:
                return queue
        raise StatsLookupError(f"{self.name} has no {direction} queue {index}; it has "
                               f"{len(self.rx_queues)} rx and {len(self.tx_queues)} tx")

    @property
    def rx_queues(self) -> tuple[NicQueue, ...]:
        return tuple(q for q in self.queues if q.direction == "rx")

    @property
    def tx_queues(self) -> tuple[NicQueue, ...]:
        return tuple(q for q in self.queues if q.direction == "tx")

    def total(self, direction: str, counter: str) -> int:
        """A counter summed over the queues of one direction, e.g. ``total("rx", "packets")``."""
        return sum(q.counters.get(counter, 0) for q in self.queues if q.direction == direction)

    def feature(self, name: str) -> Feature:
        try:
            return self.features[name]
        except KeyError:
            raise StatsLookupError(f"{self.name} has no feature {name!r}; ethtool -k lists "
                                   f"{', '.join(sorted(self.features)) or 'none'}") from None


# -- sysctls ------------------------------------------------------------------


@dataclass(frozen=True)
class TcpMem:
    """``tcp_rmem`` / ``tcp_wmem``: min, default and max of a TCP socket's buffer, in bytes."""

    min: int
    default: int   # the sk_rcvbuf / sk_sndbuf a new TCP socket starts with
    max: int       # autotuning's ceiling (SO_RCVBUF / SO_SNDBUF are capped by rmem_max / wmem_max instead)


@dataclass(frozen=True)
class PortRange:
    """``ip_local_port_range``: the ephemeral ports ``connect()`` and ``bind(port 0)`` pick from."""

    low: int
    high: int

    def __contains__(self, port: object) -> bool:
        return isinstance(port, int) and self.low <= port <= self.high


@dataclass(frozen=True)
class Sysctls:
    """The socket-layer sysctls labs depend on, typed. ``get("net.core.somaxconn")`` reads one by name."""

    somaxconn: int = field(metadata={"sysctl": "net.core.somaxconn"})  # cap on every listen() backlog
    rmem_max: int = field(metadata={"sysctl": "net.core.rmem_max"})  # cap on SO_RCVBUF (before doubling)
    wmem_max: int = field(metadata={"sysctl": "net.core.wmem_max"})  # cap on SO_SNDBUF (before doubling)
    rmem_default: int = field(metadata={"sysctl": "net.core.rmem_default"})  # sk_rcvbuf of a new non-TCP socket
    wmem_default: int = field(metadata={"sysctl": "net.core.wmem_default"})  # sk_sndbuf of a new non-TCP socket
    optmem_max: int = field(metadata={"sysctl": "net.core.optmem_max"})  # cap on sk_omem_alloc
    tcp_rmem: TcpMem = field(metadata={"sysctl": "net.ipv4.tcp_rmem"})
    tcp_wmem: TcpMem = field(metadata={"sysctl": "net.ipv4.tcp_wmem"})
    ip_local_port_range: PortRange = field(metadata={"sysctl": "net.ipv4.ip_local_port_range"})
    ip_unprivileged_port_start: int = field(metadata={"sysctl": "net.ipv4.ip_unprivileged_port_start"})  # lowest port bind() allows without CAP_NET_BIND_SERVICE
    tcp_syncookies: int = field(metadata={"sysctl": "net.ipv4.tcp_syncookies"})  # 0 never, 1 when the SYN queue overflows, 2 always
    tcp_max_syn_backlog: int = field(metadata={"sysctl": "net.ipv4.tcp_max_syn_backlog"})  # SYN queue size before syncookies / drops
    ip_nonlocal_bind: bool = field(metadata={"sysctl": "net.ipv4.ip_nonlocal_bind"})  # bind() to an address the host does not have
    tcp_abort_on_overflow: bool = field(metadata={"sysctl": "net.ipv4.tcp_abort_on_overflow"})  # RST instead of silently dropping the ACK of a full accept queue

    def get(self, name: str) -> object:
        """One sysctl by its name (``net.core.somaxconn``) or its field (``somaxconn``)."""
        for spec in fields(self):
            if spec.metadata["sysctl"] == name or spec.name == name:
                return getattr(self, spec.name)
        collected = ", ".join(spec.metadata["sysctl"] for spec in fields(self))
        raise StatsLookupError(f"sysctl {name!r} is not collected; collected: {collected}")


# -- the snapshot -------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    """Everything ``collect()`` read from one VM in one SSH round trip.

    ``counters`` are the kernel's SNMP MIB counters keyed ``Group.Name``
    (``TcpExt.ListenOverflows``, ``Tcp.ActiveOpens``, ``IpExt.InOctets``)
    from /proc/net/netstat and /proc/net/snmp. ``sockstat`` holds the
    /proc/net/sockstat and sockstat6 gauges (``sockstat["TCP"]["tw"]``;
    ``mem`` is in pages). ``stderr`` keeps, per command, what a tool printed
    on stderr while still succeeding (ss -e reports every cgroup it cannot
    resolve), so warnings are visible rather than dropped.
    """

    vm: str
    boot_id: str                   # /proc/sys/kernel/random/boot_id: deltas refuse to span a reboot
    taken_at: float                # host wall clock when the output arrived
    round_trip_ms: float           # the one SSH command, host side
    sockets: tuple[Socket, ...]
    nics: FrozenDict[str, Nic]
    counters: FrozenDict[str, int]
    sockstat: FrozenDict[str, FrozenDict[str, int]]
    sysctls: Sysctls
    stderr: FrozenDict[str, str] = EMPTY
    # The tools' output exactly as it came back (ss, ethtool, /proc), kept so a run's results can show it.
    raw: str = field(default="", compare=False, repr=False)

    # -- sockets

    def find(self, *, netid: str | None = None, state: str | None = None, port: int | None = None,
             peer_port: int | None = None, address: str | None = None, family: str | None = None) -> tuple[Socket, ...]:
        """Sockets matching every criterion given (``port`` is the local port, ``address`` the local address)."""
        found = []
        for sock in self.sockets:
            if netid is not None and sock.netid != netid:
                continue
            if state is not None and sock.state != state:
                continue
            if port is not None and (sock.family == "unix" or sock.local.port != port):
                continue
            if peer_port is not None and (sock.family == "unix" or sock.peer.port != peer_port):
                continue
            if address is not None and sock.local.address != address:
                continue
            if family is not None and sock.family != family:
                continue
            found.append(sock)
        return tuple(found)

    def listeners(self, netid: str = "tcp") -> tuple[Socket, ...]:
        return self.find(netid=netid, state="LISTEN")

    def listener(self, port: int, address: str | None = None, netid: str = "tcp") -> Socket:
        """The one ``netid`` socket in LISTEN on ``port`` (and ``address`` when two families listen there)."""
        matches = self.find(netid=netid, state="LISTEN", port=port, address=address)
        if len(matches) == 1:
            return matches[0]
        where = f"port {port}" + (f" address {address}" if address else "")
        if not matches:
            known = ", ".join(str(s.local) for s in self.listeners(netid)) or "none"
            raise StatsLookupError(f"{self.vm}: no {netid} listener on {where}; listeners: {known}")
        raise StatsLookupError(f"{self.vm}: {len(matches)} {netid} listeners on {where} "
                               f"({', '.join(str(s.local) for s in matches)}); pass address= to pick one")

    def socket(self, *, inode: int | None = None, cookie: int | None = None) -> Socket:
        """The socket with this inode (as /proc/PID/fd shows it) or this ``sk:`` cookie."""
        if (inode is None) == (cookie is None):
            raise TypeError("socket() takes exactly one of inode= or cookie=")
        if inode == 0:
            raise StatsLookupError("inode 0 is shared by every socket without a file (accept queue, TIME-WAIT); "
                                   "look those up by cookie")
        for sock in self.sockets:
            if (inode is not None and sock.inode == inode) or (cookie is not None and sock.cookie == cookie):
                return sock
        what = f"inode {inode}" if inode is not None else f"cookie {cookie:x}"
        raise StatsLookupError(f"{self.vm}: no socket with {what} among {len(self.sockets)}")

    # -- counters, NICs, sysctls

    def counter(self, name: str) -> int:
        """A MIB counter such as ``TcpExt.ListenDrops``."""
        return _lookup_counter(self.vm, self.counters, name)

    def nic(self, name: str) -> Nic:
        try:
            return self.nics[name]
        except KeyError:
            raise StatsLookupError(f"{self.vm}: no NIC {name!r}; it has {', '.join(self.nics) or 'none'}") from None

    def sysctl(self, name: str) -> object:
        return self.sysctls.get(name)

    def __sub__(self, before: "Snapshot") -> "Delta":
        if not isinstance(before, Snapshot):
            return NotImplemented
        return Delta.between(before, self)


def _lookup_counter(vm: str, counters: Mapping[str, int], name: str) -> int:
    try:
        return counters[name]
    except KeyError:
        pass
    group, _, short = name.partition(".")
    if not short:
        raise StatsLookupError(f"counter names are Group.Name, e.g. TcpExt.ListenOverflows; got {name!r}")
    similar = [key for key in counters if key.lower() == name.lower() or key.endswith("." + short)]
    groups = sorted({key.split(".")[0] for key in counters})
    hint = f"; did you mean {', '.join(similar)}?" if similar else f"; groups: {', '.join(groups)}"
    # ICMP message-type counters (IcmpMsg.InType3) appear only once non-zero; say so.
    if group in ("IcmpMsg", "Icmp6Msg") and not similar:
        hint = f"; {group} lines list only types seen at least once, so it reads as absent until then"
    raise StatsLookupError(f"{vm}: no counter {name!r}{hint}")


@dataclass(frozen=True)
class Delta:
    """``after - before`` for one VM: how much every counter moved in between.

    Counters present only in ``after`` count from 0 (the kernel prints
    ``IcmpMsg`` types only once seen). Gauges such as ``Tcp.CurrEstab`` give
    their change. NIC counters are per NIC, keyed as ``ethtool -S`` prints them.
    """

    vm: str
    seconds: float
    counters: FrozenDict[str, int]
    nic_counters: FrozenDict[str, FrozenDict[str, int]]

    @classmethod
    def between(cls, before: Snapshot, after: Snapshot) -> "Delta":
        if before.vm != after.vm:
            raise StatsError(f"cannot subtract a snapshot of {before.vm} from one of {after.vm}")
        if before.boot_id != after.boot_id:
            raise StatsError(f"{after.vm} rebooted between the two snapshots (boot id {before.boot_id} → "
                             f"{after.boot_id}); their counters do not subtract")
        counters = {name: value - before.counters.get(name, 0) for name, value in after.counters.items()}
        nics: dict[str, FrozenDict[str, int]] = {}
        for name, nic in after.nics.items():
            old = before.nics.get(name)
            if old is None or not (nic.counters_collected and old.counters_collected):
                continue
            nics[name] = FrozenDict({key: value - old.counters.get(key, 0) for key, value in nic.counters.items()})
        return cls(after.vm, after.taken_at - before.taken_at, FrozenDict(counters), FrozenDict(nics))

    def counter(self, name: str) -> int:
        return _lookup_counter(self.vm, self.counters, name)

    def changed(self) -> dict[str, int]:
        """Only the counters that moved, for printing."""
        return {name: value for name, value in self.counters.items() if value}

    def nic(self, name: str) -> FrozenDict[str, int]:
        try:
            return self.nic_counters[name]
        except KeyError:
            raise StatsLookupError(f"{self.vm}: no NIC counters for {name!r} in this delta; "
                                   f"it has {', '.join(self.nic_counters) or 'none'}") from None


class LabSnapshot(Mapping[str, Snapshot]):
    """Snapshots of several VMs taken in parallel: ``snaps["server"]``; ``after - before`` per VM."""

    __slots__ = ("_snapshots", "_elapsed_ms")

    def __init__(self, snapshots: Mapping[str, Snapshot], elapsed_ms: float) -> None:
        self._snapshots = dict(snapshots)
        self._elapsed_ms = elapsed_ms

    @property
    def elapsed_ms(self) -> float:
        """Wall time for all of them together, host side."""
        return self._elapsed_ms

    def __getitem__(self, vm: str) -> Snapshot:
        try:
            return self._snapshots[vm]
        except KeyError:
            raise StatsLookupError(f"no snapshot of {vm!r}; taken: {', '.join(self._snapshots)}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._snapshots)

    def __len__(self) -> int:
        return len(self._snapshots)

    def __sub__(self, before: "LabSnapshot") -> dict[str, Delta]:
        if not isinstance(before, LabSnapshot):
            return NotImplemented
        missing = set(self) - set(before)
        if missing:
            raise StatsError(f"the earlier snapshot has no {', '.join(sorted(missing))}")
        return {vm: self[vm] - before[vm] for vm in self}

    def __repr__(self) -> str:
        return f"LabSnapshot({', '.join(self._snapshots)}, {self.elapsed_ms:.0f} ms)"
