"""UDP: connect, datagram delivery into receive queues (sk_rcvbuf, NoPorts, ICMP errors), recv, zerocopy."""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

from . import zerocopy
from .binding import autobind, unbind
from .addr import ANY4, ANY6, SIN6_LEN_RFC2133, SOCKADDR_IN6_LEN, SOCKADDR_IN_LEN, SockAddr, canonical_ip, v4_of_v6
from .constants import (
    AF_INET, AF_INET6, AF_UNSPEC, MSG_DONTWAIT, MSG_ERRQUEUE, MSG_OOB, MSG_PEEK, MSG_TRUNC, TCP_CLOSE,
    TCP_ESTABLISHED,
)
from .kmem import udp_skb_truesize
from .ports import v4_rcv_saddr
from .result import Result, SyscallError, fail
from .sock import RCV_SHUTDOWN, SEND_SHUTDOWN, OpenFile, Sock
from .tcp import _v4_source, check_route_source

if TYPE_CHECKING:
    from .host import Host

UDP_MAX_PAYLOAD4 = 0xFFFF - 20 - 8
UDP_MAX_PAYLOAD6 = 0xFFFF - 8


def _autobind(host: "Host", sk: Sock) -> None:
    try:
        autobind(host, sk)
    except SyscallError:
        raise fail("EAGAIN", "no ephemeral port left for the implicit bind", "inet_autobind") from None


def _mapped(sa: SockAddr) -> SockAddr:
    """An AF_INET name as an AF_INET6 socket's IPv4 path sees it: the v4-mapped address."""
    host = "::ffff:" + (sa.host or "0.0.0.0")
    return SockAddr(AF_INET6, canonical_ip(host)[1] if canonical_ip(host) else host, sa.port, SOCKADDR_IN6_LEN)


def _check_mapped_source(sk: Sock, dst: str) -> None:
    """ip6_dst_lookup_tail() and __mkroute_output() on the socket's bound source (see tcp.check_route_source)."""
    check_route_source(sk, dst, "ip6_datagram_connect")


def _check_dest(sk: Sock, sa: SockAddr, fn: str) -> None:
    v6 = sk.family == AF_INET6
    if sa.addrlen < (SIN6_LEN_RFC2133 if v6 else SOCKADDR_IN_LEN):
        raise fail("EINVAL", f"addrlen {sa.addrlen} too short", fn)
    if v6:
        if sa.family == AF_INET and sk.v6only:
            raise fail("EAFNOSUPPORT", "IPv4 destination on an IPV6_V6ONLY socket", fn)
        if sa.family not in (AF_INET6, AF_INET):
            raise fail("EAFNOSUPPORT", f"sockaddr family {sa.family}", fn)
    elif sa.family not in (AF_INET, AF_UNSPEC):
        # udp_sendmsg(): AF_UNSPEC is read as AF_INET (measured: fuzz-1-83)
        raise fail("EAFNOSUPPORT", f"sockaddr family {sa.family} on an AF_INET socket", fn)


def connect(op: str, host: "Host", sk: Sock, sa: SockAddr) -> Result:
    """inet_dgram_connect(): AF_UNSPEC dissolves, else autobind then ip4_datagram_connect()."""
    if sa.addrlen < 2:
        raise fail("EINVAL", "addrlen shorter than sa_family", "inet_dgram_connect")
    if sa.family == AF_UNSPEC:
        sk.peer_addr, sk.peer_port = None, 0
        sk.sk_state = TCP_CLOSE
        if not sk.bindport_locked:
            unbind(host, sk)
            sk.rcv_addr = None
        return Result(op, 0, None, "AF_UNSPEC: default destination removed", "udp_disconnect")
    _autobind(host, sk)  # happens before the address is even checked
    fn = "ip6_datagram_connect" if sk.family == AF_INET6 else "ip4_datagram_connect"
    if sk.family == AF_INET6 and sa.family == AF_INET6 and sa.host == ANY6:
        # __ip6_datagram_connect(): "::" is the loopback, v4-mapped for a v4-mapped bound address
        # (measured: fuzz-1-429), as tcp_v6_connect() does.
        mapped_source = sk.rcv_addr is not None and v4_of_v6(sk.rcv_addr) is not None
        sa = sa._replace(host="::ffff:127.0.0.1" if mapped_source else "::1")
    if sk.family == AF_INET6 and sa.family == AF_INET:
        # __ip6_datagram_connect(): an AF_INET name takes the IPv4 path, then the ends read v4-mapped.
        if sk.v6only:
            raise fail("EAFNOSUPPORT", "IPv4 destination on an IPV6_V6ONLY socket", fn)
        if sa.addrlen < SOCKADDR_IN_LEN:
            raise fail("EINVAL", f"addrlen {sa.addrlen} < sizeof(struct sockaddr_in)", "__ip4_datagram_connect")
        sa = _mapped(sa)
    _check_dest(sk, sa, fn)
    if sk.family == AF_INET6 and sk.v6only and v4_of_v6(sa.host) is not None:
        raise fail("ENETUNREACH", "v4-mapped destination on an IPV6_V6ONLY socket", fn)
    _check_mapped_source(sk, sa.host)
    route = host.net.route(host, sa.host, sa.family == AF_INET6, _v4_source(sk))
    mapped = sk.family == AF_INET6 and ":" not in route.src
    src = f"::ffff:{route.src}" if mapped else route.src
    if sk.rcv_addr in (ANY4, ANY6, None):
        sk.rcv_addr = src
    # ip_route_connect() resolves a wildcard destination (to the loopback): the peer is what the route says.
    dst = f"::ffff:{route.dst}" if sk.family == AF_INET6 and ":" not in route.dst else route.dst
    sk.peer_addr, sk.peer_port = dst, sa.port
    sk.sk_state = TCP_ESTABLISHED
    sk.device = route.device
    sk.route_host = route.dst_host
    return Result(op, 0, None, f"default destination {dst}:{sa.port}; sock->state stays SS_UNCONNECTED", fn)


def _v4_destination(sk: Sock, dest: SockAddr | None, flags: int) -> tuple[str, int]:
    """udp_sendmsg(): MSG_OOB first, then the name (or the connected peer)."""
    if flags & MSG_OOB:
        raise fail("EOPNOTSUPP", "MSG_OOB on UDP", "udp_sendmsg")
    if dest is not None:
        _check_dest(sk, dest, "udp_sendmsg")
        if dest.port == 0:
            raise fail("EINVAL", "destination port 0", "udp_sendmsg")
        return dest.host, dest.port
    if sk.sk_state != TCP_ESTABLISHED:
        raise fail("EDESTADDRREQ", "no destination and not connected", "udp_sendmsg")
    return sk.peer_addr, sk.peer_port


def _v6_destination(sk: Sock, dest: SockAddr | None, flags: int) -> tuple[str, int]:
    """udpv6_sendmsg()'s destination checks in its order; a v4-mapped one goes on to udp_sendmsg()'s.

    The native IPv6 path has no MSG_OOB test at all (measured: fuzz-1-62); only udp_sendmsg(),
    reached for an AF_INET name or a v4-mapped destination, refuses it, and before it reads the
    port (fuzz-1-295). The IPv6-only test comes before either (fuzz-1-750). An AF_UNSPEC name
    clears the name but skips the v4-mapped test: a v4-mapped peer is then routed as IPv6, where
    ip6_dst_lookup_tail() finds no route (fuzz-1-752).
    """
    fn = "udpv6_sendmsg"
    if dest is not None and dest.addrlen < 2:
        raise fail("EINVAL", f"addrlen {dest.addrlen} shorter than sa_family", fn)
    if dest is not None and dest.family == AF_INET:
        # do_udp_sendmsg: the caller's sockaddr_in goes to udp_sendmsg() as it is
        if sk.v6only:
            raise fail("ENETUNREACH", "IPv4 destination on an IPV6_V6ONLY socket", fn)
        if flags & MSG_OOB:
            raise fail("EOPNOTSUPP", "MSG_OOB on UDP (udp_sendmsg, for the IPv4 name)", "udp_sendmsg")
        if dest.addrlen < SOCKADDR_IN_LEN:
            raise fail("EINVAL", f"addrlen {dest.addrlen} < sizeof(struct sockaddr_in)", "udp_sendmsg")
        if dest.port == 0:
            raise fail("EINVAL", "destination port 0", "udp_sendmsg")
        return _mapped(dest).host, dest.port
    check_mapped = True
    if dest is not None and dest.family == AF_UNSPEC:
        dest, check_mapped = None, False  # msg_name = NULL, daddr = NULL: the v4-mapped test is skipped
    elif dest is not None and dest.family != AF_INET6:
        raise fail("EINVAL", f"sockaddr family {dest.family}", fn)  # switch (sin6_family) default
    if dest is not None:
        if dest.addrlen < SIN6_LEN_RFC2133:
            raise fail("EINVAL", f"addrlen {dest.addrlen} < SIN6_LEN_RFC2133", fn)
        dst, dport = dest.host, dest.port
        if dst == ANY6 and sk.rcv_addr is not None and v4_of_v6(sk.rcv_addr) is not None:
            dst = "::ffff:127.0.0.1"  # "::" from a v4-mapped np->saddr is the v4-mapped loopback (fuzz-1-25)
    elif sk.sk_state != TCP_ESTABLISHED:
        raise fail("EDESTADDRREQ", "no destination and not connected", fn)
    else:
        dst, dport = sk.peer_addr, sk.peer_port
    if v4_of_v6(dst) is not None:
        if not check_mapped:
            raise fail("ENETUNREACH", f"no IPv6 route to the v4-mapped {dst} (AF_UNSPEC name: not handed to "
                       "udp_sendmsg)", "ip6_dst_lookup_tail")
        if sk.v6only:
            raise fail("ENETUNREACH", "v4-mapped destination on an IPV6_V6ONLY socket", fn)
        if flags & MSG_OOB:
            raise fail("EOPNOTSUPP", "MSG_OOB on UDP (udp_sendmsg, for the v4-mapped destination)", "udp_sendmsg")
        if dport == 0:
            raise fail("EINVAL", "port 0 of a v4-mapped destination", "udp_sendmsg")
        return dst, dport
    if dest is not None and dport == 0:
        raise fail("EINVAL", "destination port 0", fn)
    return dst, dport


def lookup(host: "Host", dst: str, dport: int, src: str, sport: int, v4_path: bool) -> Sock | None:
    """udp4_lib_lookup2() compute_score(): bound address and connected peer must match; best score wins."""
    best, best_score = None, -1
    for sk in host.udp_ports.owners(dport):
        if not isinstance(sk, Sock):
            continue
        local = sk.rcv_addr
        peer = sk.peer_addr
        if sk.family == AF_INET6:
            if v4_path:
                if sk.v6only:
                    continue
                local = ANY4 if local == ANY6 else v4_of_v6(local) or "-"
                peer = None if peer is None else v4_of_v6(peer) or "-"
            score = 1
        else:
            if not v4_path:
                continue
            score = 2
        if local not in (ANY4, ANY6):
            if local != dst:
                continue
            score += 4
        # compute_score(): a connected peer's address and port each count only where set, so a
        # socket connected to port 0 takes datagrams from any port of that address.
        if peer is not None:
            if peer != src:
                continue
            score += 4
        if sk.peer_port:
            if sk.peer_port != sport:
                continue
            score += 4
        if score > best_score:
            best, best_score = sk, score
    return best


def sendmsg(op: str, host: "Host", creds, f: OpenFile, payload: bytes, flags: int, dest: SockAddr | None) -> Result:
    """udp_sendmsg(): size and destination checks, autobind, route, zerocopy uarg, then delivery."""
    sk = f.sock
    # inet_sendmsg() -> inet_send_prepare(): the implicit bind comes before udp_sendmsg() looks at anything,
    # so a send that then fails (EDESTADDRREQ, EMSGSIZE) still leaves the socket bound.
    _autobind(host, sk)
    size = len(payload)
    v6 = sk.family == AF_INET6
    limit = UDP_MAX_PAYLOAD6 if v6 else UDP_MAX_PAYLOAD4
    if size > limit:
        raise fail("EMSGSIZE", f"{size} bytes exceed the largest datagram ({limit})", "ip_append_data")
    fn = "udpv6_sendmsg" if v6 else "udp_sendmsg"
    if v6:
        dst, dport = _v6_destination(sk, dest, flags)
    else:
        dst, dport = _v4_destination(sk, dest, flags)
    if v4_of_v6(dst) is None and ":" in dst:
        # ip6_dst_lookup_tail(): the route lookup (ENETUNREACH), then the v4-mapped source test (EAFNOSUPPORT)
        route = host.net.route(host, dst, True, _v4_source(sk))
        _check_mapped_source(sk, dst)
    else:
        _check_mapped_source(sk, dst)
        route = host.net.route(host, dst, ":" in dst, _v4_source(sk))
    if dst == "255.255.255.255" and not sk.broadcast:
        raise fail("EACCES", "broadcast destination without SO_BROADCAST", fn)
    try:
        uarg = zerocopy.alloc_notification(host, sk) if zerocopy.wants_zerocopy(sk, flags, size + 8) else None
    except SyscallError:
        host.bump("Udp.SndbufErrors")  # udp_sendmsg() counts ENOBUFS failures
        raise
    try:
        error = sk.take_error()
        if error:
            raise fail(error, "pending socket error reported (ICMP)", "sock_alloc_send_pskb")
        if sk.shutdown & SEND_SHUTDOWN:
            raise fail("EPIPE", "send side shut down", "sock_alloc_send_pskb")
    except SyscallError:
        if uarg is not None:
            zerocopy.abort_notification(sk)
        raise
    host.bump("Udp.OutDatagrams")
    header = 48 if ":" in route.dst else 28
    if uarg is not None:
        device = route.device
        zc = device.sg and device.csum and size + header <= device.mtu  # CHECKSUM_PARTIAL needs one fragment
        if not zc or device.loopback:
            zerocopy.mark_copied(uarg)
        zerocopy.finish_send(host, sk, uarg, in_flight=False)
    outcome = _deliver(host, sk, route, dport, payload)
    zc_note = ""
    if uarg is not None:
        zc_note = f"; zerocopy id {uarg[0]}{' (COPIED)' if not uarg[2] else ''}"
    elif flags & 0x4000000:
        zc_note = "; MSG_ZEROCOPY ignored: SO_ZEROCOPY not set"
    return Result(op, size, None, f"datagram of {size} bytes {outcome}{zc_note}", fn)


def _deliver(host: "Host", sk: Sock, route, dport: int, payload: bytes) -> str:
    receiver_host = route.dst_host
    if receiver_host is None:
        return "sent; nobody answers for that address"
    v4_path = ":" not in route.dst
    src = v4_of_v6(sk.rcv_addr) or sk.rcv_addr if v4_path else sk.rcv_addr
    if src in (ANY4, ANY6, None):
        src = route.src
    target = lookup(receiver_host, route.dst, dport, src, sk.port, v4_path)
    if target is None:
        receiver_host.bump("Udp.NoPorts")
        peer = v4_of_v6(sk.peer_addr) or sk.peer_addr if v4_path and sk.peer_addr else sk.peer_addr
        # __udp4_lib_err() finds the sender by the datagram's addresses, with the receive path's
        # compute_score(): its bound address must be the datagram's source (a v6 socket bound to a
        # native address has the IPv4 view 127.0.0.6, which no IPv4 datagram leaves from), and a
        # connected socket's peer must be where the datagram went (peer port 0 matches any port).
        local = v4_rcv_saddr(sk) if v4_path else (sk.rcv_addr or ANY6)
        if sk.sk_state == TCP_ESTABLISHED and peer == route.dst and sk.peer_port in (0, dport) \
                and local in (ANY4, ANY6, src):
            sk.err = "ECONNREFUSED"  # __udp4_lib_err(): port unreachable is a hard error for connected sockets
            return "sent; no socket on that port: ICMP port unreachable sets ECONNREFUSED on this socket"
        return "sent; no socket on that port (Udp.NoPorts on the receiver)"
    truesize = udp_skb_truesize(len(payload))
    if target.rmem_alloc > target.rcvbuf or target.shutdown & RCV_SHUTDOWN:
        target.drops += 1
        receiver_host.bump("Udp.RcvbufErrors")
        receiver_host.bump("Udp.InErrors")
        return f"sent; dropped at the receiver (sk_rmem_alloc {target.rmem_alloc} > sk_rcvbuf {target.rcvbuf})"
    target.rmem_alloc += truesize
    source = (src, sk.port) if target.family == AF_INET else (src if ":" in src else f"::ffff:{src}", sk.port, 0, 0)
    if not target.datagrams:
        target.datagrams = deque()
    target.datagrams.append((payload, source, truesize))
    receiver_host.bump("Udp.InDatagrams")
    return f"queued at the receiver (truesize ~{truesize})"


def recvmsg(op: str, host: "Host", f: OpenFile, length: int, flags: int) -> Result:
    """udp_recvmsg() -> __skb_recv_udp(): a pending sk_err wins, then one datagram, else EAGAIN."""
    sk = f.sock
    if flags & MSG_ERRQUEUE:
        note = zerocopy.read_notification(sk)
        return Result(op, [note], None, f"one notification: ids {note['lo']}..{note['hi']}, code {note['code']}",
                      "ip_recv_error")
    error = sk.take_error()
    if error:
        raise fail(error, "pending socket error reported (ICMP)", "__skb_recv_udp")
    if sk.datagrams:
        payload, source, truesize = sk.datagrams[0]
        if not flags & MSG_PEEK:
            sk.datagrams.popleft()
            sk.rmem_alloc -= truesize
        count = min(length, len(payload))
        ret = len(payload) if flags & MSG_TRUNC else count
        return Result(op, ret, None, f"one datagram of {len(payload)} bytes from {source[0]}:{source[1]}", "udp_recvmsg",
                      data=payload[:count])
    if sk.shutdown & RCV_SHUTDOWN and not (f.nonblock or flags & MSG_DONTWAIT):
        return Result(op, 0, None, "receive side shut down", "__skb_wait_for_more_packets")
    if f.nonblock or flags & MSG_DONTWAIT:
        raise fail("EAGAIN", "receive queue empty", "__skb_recv_udp")
    return Result(op, None, None, "receive queue empty: sleeps", "__skb_wait_for_more_packets", blocked=True)
