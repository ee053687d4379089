"""Read-only snapshots of model state: socket views, ss rows, port owners."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .constants import (
    AF_INET6, AF_UNIX, S_IFSOCK, SOCK_DGRAM, SOCK_STREAM, SS_STATE_NAMES, TCP_CLOSE, TCP_LISTEN, TCP_STATE_NAMES,
    TCP_TIME_WAIT,
)
from .sock import OpenFile, Sock, TimeWaitSock

if TYPE_CHECKING:
    from .host import Host


@dataclass(frozen=True, slots=True)
class SocketView:
    """What /proc, ss and getsockopt would show about one socket."""

    inode: int
    proc_link: str  # readlink /proc/PID/fd/N
    st_mode: int
    family: int
    type: int
    protocol: int
    ss_state: str
    sk_state: str
    nonblock: bool
    cloexec: bool
    sndbuf: int
    rcvbuf: int
    ack_backlog: int
    max_ack_backlog: int
    local: Any
    peer: Any
    reuseaddr: bool
    reuseport: bool
    zerocopy: bool
    zerocopy_next_id: int
    zerocopy_pending: tuple[dict[str, int], ...]
    zerocopy_inflight: int
    omem: int
    error: str | None
    recv_queued: int
    send_queued: int
    drops: int

    @property
    def state(self) -> str:
        """The TCP state name (sk_state), as ss prints it without dashes."""
        return self.sk_state


@dataclass(frozen=True, slots=True)
class SsRow:
    """One `ss -tuanm` line: state, queues, endpoints and the skmem buffer sizes."""

    proto: str
    state: str
    recv_q: int
    send_q: int
    local: Any
    peer: Any
    skmem_rb: int | None
    skmem_tb: int | None
    inode: int
    sndbuf_locked: bool = True  # False: autotuning may still grow tb (tcp_sndbuf_expand), so it is an estimate


@dataclass(frozen=True, slots=True)
class PortOwner:
    """A socket holding a port, and the descriptor (if any) that reaches it."""

    user: str | None
    fd: int | None
    state: str
    local: Any
    reuseaddr: bool
    reuseport: bool
    uid: int


def endpoint(sk: Sock | TimeWaitSock, peer: bool) -> Any:
    """The address tuple Python's socket module would return for this end."""
    if isinstance(sk, Sock) and sk.family == AF_UNIX:
        target = sk.peer if peer else sk
        return None if target is None or target.unix_path is None else target.unix_path
    if peer:
        if sk.peer_addr is None:
            return None
        addr, port = sk.peer_addr, sk.peer_port
    else:
        addr = sk.rcv_addr or ("::" if sk.family == AF_INET6 else "0.0.0.0")
        port = sk.port or getattr(sk, "sport", 0)
    return (addr, port, 0, 0) if sk.family == AF_INET6 else (addr, port)


def ep_text(sk: Sock | TimeWaitSock, peer: bool) -> str:
    """The same end as readable text (addr:port, [v6]:port or the AF_UNIX name), cheap to format."""
    if isinstance(sk, Sock) and sk.family == AF_UNIX:
        return str(endpoint(sk, peer))
    if peer:
        addr, port = sk.peer_addr, sk.peer_port
        if addr is None:
            return "-"
    else:
        addr = sk.rcv_addr or ("::" if sk.family == AF_INET6 else "0.0.0.0")
        port = sk.port or getattr(sk, "sport", 0)
    return f"[{addr}]:{port}" if sk.family == AF_INET6 else f"{addr}:{port}"


def socket_view(host: "Host", entry: OpenFile) -> SocketView:
    sk = entry.sock
    return SocketView(
        inode=sk.inode,
        proc_link=f"socket:[{sk.inode}]",
        st_mode=S_IFSOCK | 0o777,
        family=sk.family,
        type=sk.type,
        protocol=sk.protocol,
        ss_state=SS_STATE_NAMES[sk.ss_state],
        sk_state=TCP_STATE_NAMES[sk.sk_state],
        nonblock=entry.nonblock,
        cloexec=entry.cloexec,
        sndbuf=sk.sndbuf,
        rcvbuf=sk.rcvbuf,
        ack_backlog=len(sk.accept_queue),
        max_ack_backlog=sk.max_ack_backlog,
        local=endpoint(sk, False),
        peer=endpoint(sk, True),
        reuseaddr=sk.reuse,
        reuseport=sk.reuseport,
        zerocopy=sk.zerocopy,
        zerocopy_next_id=sk.zckey,
        zerocopy_pending=tuple({"code": c, "lo": lo, "hi": hi} for c, lo, hi, *_ in sk.errqueue),
        zerocopy_inflight=len(sk.zc_inflight),
        omem=sk.omem,
        error=sk.err,
        recv_queued=len(sk.rx) if sk.type == SOCK_STREAM else len(sk.datagrams),
        send_queued=len(sk.tx_pending),
        drops=sk.drops,
    )


def _owner_index(host: "Host") -> dict[int, tuple[str, int]]:
    index: dict[int, tuple[str, int]] = {}
    for user, proc in host.procs.items():
        for fd, entry in proc.fds.items():
            if isinstance(entry, OpenFile):
                index.setdefault(id(entry.sock), (user, fd))
    return index


def port_owners(host: "Host", port: int, proto: str) -> list[PortOwner]:
    table = host.tcp_ports if proto == "tcp" else host.udp_ports
    index = _owner_index(host)
    owners = []
    for sk in table.owners(port):
        user, fd = index.get(id(sk), (None, None))
        state = "TIME_WAIT" if sk.sk_state == TCP_TIME_WAIT else TCP_STATE_NAMES[sk.sk_state]
        owners.append(PortOwner(user, fd, state, endpoint(sk, False), sk.reuse, sk.reuseport, sk.uid))
    return owners


def ss_listener(host: "Host", port: int) -> tuple[int, int] | None:
    for sk in host.tcp_ports.owners(port):
        if isinstance(sk, Sock) and sk.sk_state == TCP_LISTEN:
            # inet_sk_diag_fill(): for listeners idiag_rqueue = sk_ack_backlog, idiag_wqueue = sk_max_ack_backlog
            return len(sk.accept_queue), sk.max_ack_backlog
    return None


SS_NAMES = {1: "ESTAB", 2: "SYN-SENT", 3: "SYN-RECV", 4: "FIN-WAIT-1", 5: "FIN-WAIT-2", 6: "TIME-WAIT",
            7: "UNCONN", 8: "CLOSE-WAIT", 9: "LAST-ACK", 10: "LISTEN", 11: "CLOSING"}  # ss's sstate_name


def _ss_row(proto: str, sk: Sock | TimeWaitSock, queued: frozenset[int] = frozenset()) -> SsRow:
    if isinstance(sk, TimeWaitSock):
        state = "TIME-WAIT" if sk.substate == TCP_TIME_WAIT else "FIN-WAIT-2"
        return SsRow(proto, state, 0, 0, endpoint(sk, False), endpoint(sk, True), None, None, 0)
    if sk.sk_state == TCP_LISTEN:
        recv_q, send_q = len(sk.accept_queue), sk.max_ack_backlog
    elif sk.type == SOCK_DGRAM:
        recv_q, send_q = sk.rmem_alloc, 0
    else:
        recv_q, send_q = len(sk.rx), len(sk.tx_pending)
    state = SS_NAMES.get(sk.sk_state, TCP_STATE_NAMES[sk.sk_state])
    if proto == "udp":
        state = "ESTAB" if sk.peer_addr else "UNCONN"
    # A child still in an accept queue has no struct socket and no file yet: ss shows inode 0 (sock_i_ino).
    inode = 0 if id(sk) in queued else sk.inode
    return SsRow(proto, state, recv_q, send_q, endpoint(sk, False), endpoint(sk, True), sk.rcvbuf, sk.sndbuf,
                 inode, bool(sk.sndbuf_locked) or proto != "tcp" or sk.sk_state == TCP_LISTEN)


def _bound_only(proto: str, sk: Sock | TimeWaitSock) -> bool:
    """A TCP socket that bind() put in the bind hash and nothing moved on (no listen, no connect)."""
    return proto == "tcp" and isinstance(sk, Sock) and sk.sk_state == TCP_CLOSE


def ss_rows(host: "Host") -> list[SsRow]:
    from .versions import RULES

    bound_listed = RULES["ss_lists_bound_only_tcp"].value(host.kernel)
    rows = []
    tables = (("tcp", host.tcp_ports), ("udp", host.udp_ports))
    queued = frozenset(id(child) for _proto, table in tables for port in table.buckets for sk in table.owners(port)
                       for child in getattr(sk, "accept_queue", ()))
    for proto, table in tables:
        for port in sorted(table.buckets):
            rows.extend(_ss_row(proto, sk, queued) for sk in table.owners(port)
                        if bound_listed or not _bound_only(proto, sk))
    return rows
