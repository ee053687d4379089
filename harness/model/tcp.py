"""TCP lifecycle: SYN against the accept queue, handshake, FIN/RST teardown, TIME_WAIT, and stream data."""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING

from . import zerocopy
from .addr import ANY4, ANY6, SIN6_LEN_RFC2133, SOCKADDR_IN_LEN, SockAddr, v4_of_v6
from .constants import (
    AF_INET, AF_INET6, MSG_DONTWAIT, MSG_ERRQUEUE, MSG_NOSIGNAL, MSG_OOB, MSG_PEEK, MSG_WAITALL, MSG_ZEROCOPY, SOCK_STREAM, TCP_CLOSE,
    TCP_CLOSE_WAIT, TCP_ESTABLISHED, TCP_FIN_WAIT1, TCP_FIN_WAIT2, TCP_LAST_ACK, TCP_LISTEN, TCP_SYN_RECV,
    TCP_STATE_NAMES, TCP_SYN_SENT, TCP_TIME_WAIT,
)
from .kmem import tcp_mss, tcp_sndbuf_expand
from .result import Result, SyscallError, fail
from .sock import RCV_SHUTDOWN, SEND_SHUTDOWN, SHUTDOWN_MASK, OpenFile, Sock, TimeWaitSock

if TYPE_CHECKING:
    from .host import Host

TCP_TIMEWAIT_LEN = 60.0
TCP_TIMEOUT_INIT = 1.0
ARP_FAILURE_DELAY = 3.0  # neighbour resolution gives up after 3 probes, 1 s apart


# -- connection set-up ---------------------------------------------------------------------------

def _multicast_or_broadcast4(addr: str) -> bool:
    return addr == "255.255.255.255" or 224 <= int(addr.split(".", 1)[0]) <= 239


def check_route_source(sk: Sock, dst: str, fn: str) -> None:
    """Source-address rules of the route lookup a connect or send makes from a bound socket.

    - ip6_dst_lookup_tail(): an IPv6 route from a v4-mapped source is refused (EAFNOSUPPORT);
    - ip_route_output_key_hash_rcu(): an IPv4 route from a source that is no address of this host is
      refused (ENETUNREACH) unless FLOWI_FLAG_ANYSRC, which only IP_TRANSPARENT (or IP_HDRINCL) sets:
      IP_FREEBIND and ip_nonlocal_bind let bind() take the address, not a route use it (measured: fuzz-1-839);
    - __mkroute_output(): an IPv4 route from a loopback source leaves only through loopback (EINVAL).
    """
    src = sk.rcv_addr
    if src is None or src in ("0.0.0.0", "::", "::ffff:0.0.0.0"):
        return
    src4 = v4_of_v6(src) if sk.family == AF_INET6 else src
    dst4 = v4_of_v6(dst) if ":" in dst else dst
    if sk.family == AF_INET6 and src4 is not None and dst4 is None and dst != "::":
        raise fail("EAFNOSUPPORT", f"IPv6 destination {dst} from the v4-mapped source {src}", "ip6_dst_lookup_tail")
    if src4 is not None and dst4 is not None and not sk.host.is_local4(src4) and not _multicast_or_broadcast4(src4):
        raise fail("ENETUNREACH", f"source {src4} is not an address of {sk.host.name} (a freebind bind; no "
                   "IP_TRANSPARENT)", "ip_route_output_key_hash_rcu")
    if src4 is not None and dst4 is not None and src4.startswith("127.") and not (
            dst4 == "0.0.0.0" or sk.host.is_local4(dst4)):  # the host's own addresses route through lo
        raise fail("EINVAL", f"loopback source {src4} towards {dst4}", "__mkroute_output")


def connect(host: "Host", sk: Sock, sa: SockAddr) -> None:
    """tcp_v4_connect()/tcp_v6_connect(): validate, route, bind a source port, send the SYN."""
    v6 = sk.family == AF_INET6
    fn = "tcp_v6_connect" if v6 else "tcp_v4_connect"
    if sa.addrlen < (SIN6_LEN_RFC2133 if v6 else SOCKADDR_IN_LEN):
        raise fail("EINVAL", f"addrlen {sa.addrlen} too short for this family", fn)
    if sa.family != (AF_INET6 if v6 else AF_INET):
        raise fail("EAFNOSUPPORT", f"sockaddr family {sa.family} does not match the socket", fn)
    if not v6 and (sa.host == "255.255.255.255" or 224 <= int(sa.host.split(".", 1)[0]) <= 239):
        raise fail("ENETUNREACH", "TCP cannot connect to a multicast or broadcast address", fn)
    if v6 and sa.host == "::" and sk.rcv_addr and v4_of_v6(sk.rcv_addr) is not None:
        sa = sa._replace(host="::ffff:127.0.0.1")  # tcp_v6_connect(): "::" means loopback, v4-mapped for a mapped source
    mapped = v6 and v4_of_v6(sa.host) is not None
    if mapped and sk.v6only:
        # tcp_v6_connect(): a v4-mapped destination on an IPv6-only socket (a specific IPv6 bind makes
        # one) is refused before any route lookup (measured: fuzz-1-92, fuzz-1-57).
        raise fail("ENETUNREACH", "v4-mapped destination on an IPV6_V6ONLY socket", fn)
    check_route_source(sk, sa.host, fn)
    route = host.net.route(host, sa.host, v6, _v4_source(sk))
    src = f"::ffff:{route.src}" if mapped else route.src
    dst = f"::ffff:{route.dst}" if mapped else route.dst
    if not sk.bound:
        sk.rcv_addr = src
        low, high = host.sysctls["net.ipv4.ip_local_port_range"]
        port = host.tcp_ports.pick_ephemeral(sk, low, high, host.rng, 0)
        if not port:
            sk.rcv_addr = None
            raise fail("EADDRNOTAVAIL", f"no free port in ip_local_port_range {low}-{high}", "__inet_hash_connect")
        sk.port, sk.bound, sk.autobound_by_connect = port, True, True
        host.tcp_ports.add(sk, port)
    elif sk.rcv_addr in (ANY4, ANY6):
        sk.rcv_addr = src  # the wildcard bind becomes the route's source address
    sk.peer_addr, sk.peer_port = dst, sa.port
    sk.device = route.device
    sk.route_host = route.dst_host
    sk.sk_state = TCP_SYN_SENT
    host.bump("Tcp.ActiveOpens")
    sk.syn_rto = TCP_TIMEOUT_INIT
    sk.syn_retries_left = host.sysctls["net.ipv4.tcp_syn_retries"]
    sk.syn_next = host.net.now + TCP_TIMEOUT_INIT
    if route.dst_host is None:
        sk.syn_retries_left = -1
        sk.syn_next = host.net.now + ARP_FAILURE_DELAY
    # tcp_v6_connect() switches icsk_af_ops to ipv6_mapped for a v4-mapped destination and only
    # switches back when tcp_v4_connect() fails at once; after an asynchronous failure the socket
    # keeps them, so a later connect to a native IPv6 address sends its SYN down the IPv4 path with
    # stale IPv4 addresses, and no answer ever finds the socket (measured: fuzz-1-44, fuzz-1-55).
    if mapped:
        sk.mapped_ops = True
        sk.syn_lost = False
    else:
        sk.syn_lost = v6 and sk.mapped_ops
    _send_syn(sk)
    if sk.sk_state == TCP_SYN_SENT:
        # Only a SYN still unanswered needs its retransmit timer (an answered one would find the
        # socket out of SYN_SENT and drop the timer anyway).
        host.net.syn_sent.add(sk)
        host.net.schedule(sk.syn_next, sk)


def _dst_v4(sk: Sock) -> tuple[str, bool]:
    """(destination as the wire carries it, whether it is an IPv4 path)."""
    if sk.family == AF_INET:
        return sk.peer_addr, True
    mapped = v4_of_v6(sk.peer_addr)
    return (mapped, True) if mapped is not None else (sk.peer_addr, False)


def lookup_listener(host: "Host", dst: str, port: int, v4_path: bool) -> Sock | None:
    """__inet_lookup_listener()/inet6_lookup_listener(): exact address beats wildcard, same family beats v6."""
    best, best_score = None, -1
    for sk in host.tcp_listeners.get(port, ()):
        addr = sk.rcv_addr
        if v4_path:
            if sk.family == AF_INET:
                score = 6 if addr == dst else 2 if addr == ANY4 else -1
            elif sk.v6only:
                score = -1
            else:
                score = 5 if v4_of_v6(addr) == dst else 1 if addr == ANY6 else -1
        else:
            score = -1 if sk.family != AF_INET6 else 6 if addr == dst else 2 if addr == ANY6 else -1
        if score > best_score:
            best, best_score = sk, score
    return best


def set_listening(sk: Sock, listening: bool) -> None:
    """Enter or leave TCP_LISTEN, keeping the host's listening hash (inet_hash/inet_unhash) in step."""
    table = sk.host.tcp_listeners
    if listening:
        sk.sk_state = TCP_LISTEN
        table.setdefault(sk.port, []).append(sk)
        return
    if sk.sk_state == TCP_LISTEN:
        bucket = table.get(sk.port)
        if bucket is not None and sk in bucket:
            bucket.remove(sk)
            if not bucket:
                del table[sk.port]
    sk.sk_state = TCP_CLOSE


def conn_request(listener: Sock) -> tuple[bool, str]:
    """tcp_conn_request(): request-queue/syncookie gate, then sk_acceptq_is_full() drops the SYN."""
    host = listener.host
    syncookies = host.sysctls["net.ipv4.tcp_syncookies"]
    request_queue = 0  # the model completes handshakes at once, so no request sock lingers
    # 6.1-stable took the fix at 6.1.125; 6.12.118 and 7.2 have it too (measured: same backlog results).
    if host.kernel != "6.1" or host.kernel_sublevel >= 125:
        reqsk_full = request_queue > listener.max_ack_backlog
    else:
        reqsk_full = request_queue >= listener.max_ack_backlog  # before 6.1.125 the test was >=
    if syncookies == 2 or reqsk_full:
        if syncookies:
            host.bump("TcpExt.TCPReqQFullDoCookies")  # tcp_syn_flood_action()
        else:
            host.bump("TcpExt.TCPReqQFullDrop")
            _listendrop(listener)
            return False, "request queue full and tcp_syncookies=0: SYN dropped"
    queued = len(listener.accept_queue)
    if queued > listener.max_ack_backlog:
        host.bump("TcpExt.ListenOverflows")
        _listendrop(listener)
        return False, (f"accept queue full (sk_ack_backlog {queued} > sk_max_ack_backlog {listener.max_ack_backlog}):"
                       f" SYN dropped, ListenOverflows and ListenDrops +1")
    return True, "SYN accepted"


def _listendrop(listener: Sock) -> None:
    """tcp_listendrop(): sk_drops and TcpExt.ListenDrops."""
    listener.drops += 1
    listener.host.bump("TcpExt.ListenDrops")


def _send_syn(sk: Sock) -> None:
    host = sk.host
    dst_host = sk.route_host
    if dst_host is None or sk.syn_lost:
        return  # nobody answers ARP (syn_timer() fails the connect), or the SYN left on the wrong path
    dst, v4_path = _dst_v4(sk)
    listener = lookup_listener(dst_host, dst, sk.peer_port, v4_path)
    if listener is None and dst_host is host and sk.peer_port == sk.port and _own_address(sk, dst, v4_path):
        # A SYN to the socket's own address and port meets the socket itself in SYN_SENT:
        # tcp_rcv_synsent_state_process() takes it as a simultaneous open, and the
        # connection is established with itself (what it sends, it reads back).
        sk.sk_state = TCP_ESTABLISHED
        sk.peer = sk
        host.net.syn_sent.discard(sk)
        _init_buffer_space(sk)
        return
    if listener is None:
        dst_host.bump("Tcp.OutRsts")
        host.bump("Tcp.AttemptFails")
        receive_reset(sk)
        return
    admitted, _ = conn_request(listener)
    if admitted:
        _establish(sk, listener)


def _v4_source(sk: Sock) -> str | None:
    """The socket's specific IPv4 source (its bound or connected address), if it has one."""
    src = sk.rcv_addr
    if src is None:
        return None
    return (v4_of_v6(src) if ":" in src else src) or None


def _own_address(sk: Sock, dst: str, v4_path: bool) -> bool:
    """Whether ``dst`` (as the wire carries it) is the address the socket sends from."""
    src = sk.rcv_addr
    if src is None:
        return False
    if v4_path and sk.family == AF_INET6:
        src = v4_of_v6(src) or src
    return src == dst


def _establish(client: Sock, listener: Sock) -> None:
    """Three-way handshake done: tcp_v4_syn_recv_sock() clones the listener, inet_csk_reqsk_queue_add() queues it."""
    server = listener.host
    child = Sock(server, server.next_inode(), listener.family, SOCK_STREAM, listener.protocol, listener.ops,
                 listener.uid)
    # sk_clone_lock() copies the listener's options and buffer settings
    child.reuse, child.reuseport, child.freebind = listener.reuse, listener.reuseport, listener.freebind
    child.oobinline = listener.oobinline  # sk_clone_lock() copies sk_flags (SOCK_URGINLINE)
    child.v6only, child.zerocopy = listener.v6only, listener.zerocopy
    child.ll_usec, child.prefer_busy_poll = listener.ll_usec, listener.prefer_busy_poll
    child.sndbuf, child.rcvbuf = listener.sndbuf, listener.rcvbuf
    child.sndbuf_locked, child.rcvbuf_locked = listener.sndbuf_locked, listener.rcvbuf_locked
    dst, v4_path = _dst_v4(client)
    # tcp_v6_syn_recv_sock() sets ipv6_mapped on a v4-mapped child only; a native IPv6 child keeps
    # what sk_clone_lock() copied, so a listener whose refused v4-mapped connect left it ipv6_mapped
    # (see connect) has children that transmit through ip_queue_xmit() with the IPv4 addresses
    # LOOPBACK4_IPV6: the RST inet_child_forget() -> tcp_disconnect() sends when that listener
    # closes never reaches the peer (measured: fuzz-1-953). Their data and FIN would go the same
    # way; only the RST is modelled.
    child.rst_lost = listener.mapped_ops and child.family == AF_INET6 and not v4_path
    src = client.rcv_addr if client.family == AF_INET else (v4_of_v6(client.rcv_addr) or client.rcv_addr)
    if child.family == AF_INET6 and ":" not in dst:
        dst, src = f"::ffff:{dst}", f"::ffff:{src}"
    child.rcv_addr, child.port, child.bound = dst, listener.port, True
    server.tcp_ports.add(child, listener.port)  # __inet_inherit_port()
    child.peer_addr, child.peer_port = src, client.port
    child.sk_state = TCP_ESTABLISHED
    child.parent = listener
    child.device = server.lo if server is client.host else server.nic
    listener.accept_queue.append(child)
    server.bump("Tcp.PassiveOpens")
    client.sk_state = TCP_ESTABLISHED
    client.peer, child.peer = child, client
    client.host.net.syn_sent.discard(client)
    _init_buffer_space(client)
    _init_buffer_space(child)
    if listener.shutdown:
        # sk_clone_lock() copies the listener's sk_shutdown (a shutdown() before listen() records
        # it, ENOTCONN or not); the child's tcp_rcv_state_process() then finishes a SHUT_WR as it
        # becomes ESTABLISHED, so its FIN follows the handshake (measured: fuzz-1-120), and a
        # SHUT_RD stays (poll says POLLHUP with both: fuzz-1-611).
        child.shutdown |= listener.shutdown
        if listener.shutdown & SEND_SHUTDOWN:
            _send_fin(child)


def _init_buffer_space(sk: Sock) -> None:
    """tcp_init_buffer_space(): grow sk_sndbuf for the path MSS unless SO_SNDBUF locked it."""
    _, v4_path = _dst_v4(sk)
    clamp, cache, sndbuf = _buffer_space(sk.device.mtu, not v4_path, sk.host.sysctls["net.ipv4.tcp_wmem"][2],
                                         sk.sndbuf)
    sk.mss_clamp, sk.mss_cache = clamp, cache
    if not sk.sndbuf_locked:
        sk.sndbuf = sndbuf


@lru_cache(maxsize=256)
def _buffer_space(mtu: int, ipv6: bool, wmem_max_tcp: int, current: int) -> tuple[int, int, int]:
    clamp, cache = tcp_mss(mtu, ipv6=ipv6)
    return clamp, cache, tcp_sndbuf_expand(clamp, cache, wmem_max_tcp, current)


def syn_timer(sk: Sock) -> None:
    """tcp_retransmit_timer() for a SYN: resend with doubling RTO, give up after tcp_syn_retries."""
    net = sk.host.net
    if sk.sk_state != TCP_SYN_SENT:
        net.syn_sent.discard(sk)
        return
    if sk.syn_retries_left <= 0:
        net.syn_sent.discard(sk)
        error = "EHOSTUNREACH" if sk.syn_retries_left < 0 else "ETIMEDOUT"
        _fail_connect(sk, error)
        return
    sk.syn_retries_left -= 1
    sk.syn_rto *= 2
    sk.syn_next = net.now + sk.syn_rto
    net.schedule(sk.syn_next, sk)
    _send_syn(sk)


def _fail_connect(sk: Sock, error: str) -> None:
    """tcp_write_err()/tcp_done(): the connect attempt ends with sk_err set."""
    sk.err = error
    _done(sk)


def pending_reason(sk: Sock) -> str:
    if sk.syn_lost:
        return "SYN sent down the stale ipv6_mapped path: no answer will find this socket; ETIMEDOUT after tcp_syn_retries"
    if sk.route_host is None:
        return f"no host answers for {sk.peer_addr}; EHOSTUNREACH after ~{ARP_FAILURE_DELAY:.0f} s"
    return (f"SYN to {sk.peer_addr}:{sk.peer_port} dropped (accept queue full); retransmit in "
            f"{sk.syn_next - sk.host.net.now:.0f} s, {sk.syn_retries_left} retries left")


def progress_note(sk: Sock) -> str:
    """What the model already knows about a connect that returned EINPROGRESS."""
    if sk.sk_state == TCP_ESTABLISHED:
        return "handshake completed: poll reports POLLOUT, SO_ERROR 0"
    if sk.sk_state == TCP_CLOSE:
        return f"attempt already failed: SO_ERROR will report {sk.err}"
    return pending_reason(sk)


def failure_reason(error: str) -> str:
    return {
        "ECONNREFUSED": "RST in reply to the SYN: no listener on that port",
        "ETIMEDOUT": "every SYN retransmission was dropped (model clock advanced through tcp_syn_retries)",
        "EHOSTUNREACH": "neighbour resolution failed: no host has that address",
        "ECONNRESET": "connection reset",
        "ECONNABORTED": "connection closed while connecting",
    }.get(error, error)


# -- teardown ------------------------------------------------------------------------------------

def _unbind(sk: Sock) -> None:
    if sk.bound:
        sk.host.tcp_ports.remove(sk, sk.port)
        sk.bound = False
        # inet_put_port() clears inet_num but not inet_sport: getsockname() still shows the old port.
        sk.sport = sk.port
        sk.port = 0


def _done(sk: Sock) -> None:
    """tcp_done(): CLOSE, both directions shut; tcp_set_state() drops the port unless bind() pinned it."""
    sk.sk_state = TCP_CLOSE
    sk.shutdown = SHUTDOWN_MASK
    sk.tx_pending.clear()
    sk.host.net.syn_sent.discard(sk)
    if sk.orphan or not sk.bindport_locked:
        _unbind(sk)
    if sk.zc_inflight:
        zerocopy.complete_acked(sk)
    else:
        sk.zc_tail = None  # what complete_acked() does when nothing is in flight
    if sk.orphan:
        sk.peer = None  # a destroyed socket lets go of its peer (no reference cycle left for the GC)


def receive_reset(sk: Sock) -> None:
    """tcp_reset(): ECONNREFUSED in SYN_SENT, EPIPE in CLOSE_WAIT, ECONNRESET otherwise."""
    if sk.sk_state == TCP_CLOSE:
        return
    sk.err = {TCP_SYN_SENT: "ECONNREFUSED", TCP_CLOSE_WAIT: "EPIPE"}.get(sk.sk_state, "ECONNRESET")
    sk.peer = None
    _done(sk)


def _send_reset(sk: Sock) -> None:
    peer = sk.peer
    sk.peer = None
    sk.host.bump("Tcp.OutRsts")
    if sk.rst_lost:
        return  # left on the stale IPv4 path (_establish): the peer stays ESTABLISHED, its next segment meets no socket
    if isinstance(peer, Sock):
        receive_reset(peer)
    elif isinstance(peer, TimeWaitSock):
        timewait_expire(peer)  # RST kills a TIME_WAIT minisock (tcp_rfc1337 = 0)


def _to_timewait(sk: Sock, substate: int, timeout: float) -> None:
    """tcp_time_wait(): a minisock takes over the port; the full socket is done."""
    net = sk.host.net
    tw = TimeWaitSock(sk, net.now + timeout, substate)
    if sk.bound:
        sk.host.tcp_ports.add(tw, sk.port)
    if isinstance(sk.peer, Sock):
        sk.peer.peer = tw
    net.timewaits.add(tw)
    net.schedule(tw.expires, tw)
    sk.peer = None
    _done(sk)


def timewait_expire(tw: TimeWaitSock) -> None:
    """inet_twsk_kill(): the TIME_WAIT (or orphaned FIN_WAIT2) minisock frees the port."""
    tw.host.tcp_ports.remove(tw, tw.port)
    tw.host.net.timewaits.discard(tw)


def _send_fin(sk: Sock) -> None:
    """tcp_close_state() + tcp_send_fin(): the FIN leaves once queued data has gone."""
    if sk.sk_state == TCP_ESTABLISHED:
        sk.sk_state = TCP_FIN_WAIT1
    elif sk.sk_state == TCP_CLOSE_WAIT:
        sk.sk_state = TCP_LAST_ACK
    else:
        return
    if not sk.tx_pending:
        _fin_acked(sk)


def _fin_acked(sk: Sock) -> None:
    """The peer receives our FIN (tcp_fin) and ACKs it."""
    host = sk.host
    peer = sk.peer
    if sk.sk_state == TCP_FIN_WAIT1:
        if isinstance(peer, Sock):
            peer.fin_received = True
            peer.shutdown |= RCV_SHUTDOWN
            if peer.sk_state == TCP_ESTABLISHED:
                peer.sk_state = TCP_CLOSE_WAIT
        sk.sk_state = TCP_FIN_WAIT2
        if sk.orphan:
            _to_timewait(sk, TCP_FIN_WAIT2, float(host.sysctls["net.ipv4.tcp_fin_timeout"]))
    elif sk.sk_state == TCP_LAST_ACK:
        if isinstance(peer, TimeWaitSock):
            peer.substate = TCP_TIME_WAIT
            peer.expires = host.net.now + TCP_TIMEWAIT_LEN
            host.net.schedule(peer.expires, peer)
        elif isinstance(peer, Sock) and peer.sk_state == TCP_FIN_WAIT2:
            peer.fin_received = True
            peer.shutdown |= RCV_SHUTDOWN
            _to_timewait(peer, TCP_TIME_WAIT, TCP_TIMEWAIT_LEN)
        sk.peer = None
        _done(sk)


def shutdown_send(host: "Host", sk: Sock) -> None:
    """tcp_shutdown(SEND_SHUTDOWN): FIN in ESTABLISHED or CLOSE_WAIT."""
    if sk.sk_state in (TCP_ESTABLISHED, TCP_CLOSE_WAIT):
        _send_fin(sk)


def _abort_children(sk: Sock) -> int:
    """inet_csk_listen_stop(): queued, never-accepted connections are reset."""
    count = 0
    while sk.accept_queue:
        child = sk.accept_queue.popleft()
        child.parent = None
        child.orphan = True
        _send_reset(child)
        _done(child)
        count += 1
    return count


def disconnect(host: "Host", sk: Sock) -> None:
    """tcp_disconnect(): back to CLOSE from any state, resetting a live peer."""
    old = sk.sk_state
    if old == TCP_LISTEN:
        _abort_children(sk)
        set_listening(sk, False)
    elif old in (TCP_ESTABLISHED, TCP_CLOSE_WAIT, TCP_FIN_WAIT1, TCP_FIN_WAIT2, TCP_SYN_RECV, TCP_LAST_ACK):
        _send_reset(sk)
        sk.err = "ECONNRESET"
    elif old == TCP_SYN_SENT:
        sk.err = "ECONNRESET"
    host.net.syn_sent.discard(sk)
    sk.sk_state = TCP_CLOSE
    sk.peer = None
    sk.peer_addr, sk.peer_port = None, 0
    sk.rx.clear()
    sk.urg_mark, sk.urg_pending = None, None
    sk.tx_pending.clear()
    sk.shutdown = 0
    sk.fin_received = False
    if not sk.bindport_locked:
        _unbind(sk)
    if not sk.bindaddr_locked:
        # inet_reset_saddr() unless SOCK_BINDADDR_LOCK, whether or not the port stays (fuzz-1-162, 1-200)
        sk.rcv_addr = (ANY6 if sk.family == AF_INET6 else ANY4) if sk.bound else None


def close(host: "Host", sk: Sock) -> str:
    """tcp_close(): listeners reset their queue, unread data means RST, otherwise FIN and (maybe) TIME_WAIT."""
    state = sk.sk_state
    sk.orphan = True
    if state == TCP_LISTEN:
        reset = _abort_children(sk)
        set_listening(sk, False)
        _unbind(sk)
        return f"listener closed (inet_csk_listen_stop), {reset} queued connection(s) reset"
    if state in (TCP_ESTABLISHED, TCP_CLOSE_WAIT):
        if sk.rx:
            host.bump("TcpExt.TCPAbortOnClose")
            unread = len(sk.rx)
            sk.rx.clear()
            _send_reset(sk)
            _done(sk)
            return f"{unread} unread byte(s): RST instead of FIN (tcp_close, TCPAbortOnClose)"
        _send_fin(sk)
        return f"FIN sent; now {_state_name(sk)}"
    if state == TCP_FIN_WAIT2:
        _to_timewait(sk, TCP_FIN_WAIT2, float(host.sysctls["net.ipv4.tcp_fin_timeout"]))
        return "orphaned FIN_WAIT2 becomes a timewait minisock (tcp_fin_timeout)"
    if state == TCP_FIN_WAIT1:
        return "FIN still queued behind unsent data; orphan keeps the port"
    host.net.syn_sent.discard(sk)
    sk.sk_state = TCP_CLOSE
    _unbind(sk)
    return "socket destroyed, port released"


def _state_name(sk: Sock) -> str:
    return TCP_STATE_NAMES[sk.sk_state] if sk.bound or sk.sk_state != TCP_CLOSE else "closed"


# -- data ----------------------------------------------------------------------------------------

def receive_window(sk: Sock) -> int:
    """tcp_win_from_space(): the share of sk_rcvbuf offered as window (tcp_adv_win_scale)."""
    scale = sk.host.sysctls["net.ipv4.tcp_adv_win_scale"]
    space = sk.rcvbuf
    return space >> -scale if scale <= 0 else space - (space >> scale)


def _flush(sender: Sock) -> None:
    """Move queued bytes into the peer's receive queue as its window allows; finish a pending FIN."""
    peer = sender.peer
    if not sender.tx_pending:
        return
    if isinstance(peer, TimeWaitSock) or (isinstance(peer, Sock) and peer.shutdown & RCV_SHUTDOWN and (
            peer.orphan or peer.sk_state in (TCP_FIN_WAIT1, TCP_FIN_WAIT2))):
        # tcp_rcv_state_process(): new data for a FIN_WAIT socket whose receive side is shut is reset
        # data for a socket that has closed its read side: it answers with RST (TCPAbortOnData)
        if isinstance(peer, Sock):
            peer.host.bump("TcpExt.TCPAbortOnData")
            receive_reset(peer)
        elif isinstance(peer, TimeWaitSock):
            timewait_expire(peer)
        sender.peer = None
        receive_reset(sender)
        return
    if not isinstance(peer, Sock):
        return
    room = receive_window(peer) - len(peer.rx)
    if room <= 0:
        return
    chunk = sender.tx_pending[:room]
    del sender.tx_pending[:room]
    peer.rx += chunk
    if sender.urg_pending is not None:
        if sender.urg_pending < len(chunk):
            _mark_urgent(peer, len(peer.rx) - len(chunk) + sender.urg_pending)
            sender.urg_pending = None
        else:
            sender.urg_pending -= len(chunk)
    if not sender.tx_pending:
        zerocopy.complete_acked(sender)
        if sender.sk_state in (TCP_FIN_WAIT1, TCP_LAST_ACK):
            _fin_acked(sender)


def _zerocopy_copied(sk: Sock) -> bool:
    """Whether the completion will say COPIED: loopback always (skb_orphan_frags_rx); see docs for no-SG NICs."""
    device = sk.device
    if device is None or device.loopback:
        return True
    return not device.sg and sk.host.net.tcp_zerocopy_copied_without_sg


def sendmsg(op: str, host: "Host", creds, f: OpenFile, payload: bytes, flags: int, dest=None) -> Result:
    """tcp_sendmsg_locked(): zerocopy uarg first, then the connection-state wait, then queueing (dest ignored)."""
    sk = f.sock
    nonblock = f.nonblock or bool(flags & MSG_DONTWAIT)
    size = len(payload)
    uarg, extended = None, False
    if zerocopy.wants_zerocopy(sk, flags, size):
        uarg, extended = zerocopy.realloc_notification(host, sk, size)
    try:
        result = _send_checked(op, host, sk, payload, flags, nonblock, uarg, extended)
    except SyscallError:
        if uarg is not None:
            zerocopy.abort_notification(sk, uarg, extended)
        raise
    return result


def _send_checked(op, host, sk: Sock, payload: bytes, flags: int, nonblock: bool, uarg, extended: bool = False) -> Result:
    if sk.sk_state not in (TCP_ESTABLISHED, TCP_CLOSE_WAIT):
        # sk_stream_wait_connect()
        error = sk.take_error()
        if error:
            raise fail(error, "pending socket error reported", "sk_stream_wait_connect")
        if sk.sk_state not in (TCP_SYN_SENT, TCP_SYN_RECV):
            raise _epipe(flags, "not connected", "sk_stream_wait_connect")
        if nonblock:
            raise fail("EAGAIN", "handshake still in progress", "sk_stream_wait_connect")
        return Result(op, None, None, "waits for the handshake to finish", "sk_stream_wait_connect", blocked=True)
    if sk.err or sk.shutdown & SEND_SHUTDOWN:
        error = sk.take_error()
        if error:
            raise fail(error, "pending socket error reported", "sk_stream_error")
        raise _epipe(flags, "send side shut down", "sk_stream_error")
    size = len(payload)
    if size == 0:
        return Result(op, 0, None, "nothing to send", "tcp_sendmsg_locked")
    peer = sk.peer
    if (uarg is None and not sk.tx_pending and type(peer) is Sock and not peer.orphan
            and not peer.shutdown & RCV_SHUTDOWN and receive_window(peer) - len(peer.rx) >= size):
        peer.rx += payload  # common case: the whole write fits the peer's window and is acked at once
        if flags & MSG_OOB:
            _mark_urgent(peer, len(peer.rx) - 1)
        if flags & MSG_ZEROCOPY:
            return Result(op, size, None, f"sent {size} bytes; {_ZC_IGNORED}", "tcp_sendmsg_locked")
        return Result(op, size, None, f"sent {size} bytes", "tcp_sendmsg_locked")
    _flush(sk)
    peer_room = receive_window(sk.peer) - len(sk.peer.rx) if isinstance(sk.peer, Sock) else 0
    room = max(0, peer_room) + max(0, sk.sndbuf - len(sk.tx_pending))
    if room <= 0:
        if nonblock:
            raise fail("EAGAIN", f"peer window and sk_sndbuf {sk.sndbuf} full", "sk_stream_wait_memory")
        return Result(op, None, None, "send buffer full: sleeps in sk_stream_wait_memory", "sk_stream_wait_memory",
                      blocked=True, approx=True)
    taken = min(size, room)
    if taken < size and not nonblock:
        sk.tx_pending += payload[:taken]
        _flush(sk)
        _attach(host, sk, uarg, extended, taken)
        return Result(op, None, None, f"queued {taken} of {size} bytes, then sleeps for buffer space",
                      "sk_stream_wait_memory", blocked=True, approx=True)
    sk.tx_pending += payload[:taken]
    if flags & MSG_OOB:
        sk.urg_pending = len(sk.tx_pending) - 1  # tcp_mark_urg(): snd_up = write_seq, after the last byte
    _flush(sk)
    _attach(host, sk, uarg, extended, taken)
    zc = ""
    if extended:
        zc = (f"; zerocopy id {(sk.zckey - 1) % zerocopy.U32} joins the unsent tail's notification "
              f"(ids {uarg[0]}..{(uarg[0] + uarg[1] - 1) % zerocopy.U32}; msg_zerocopy_realloc)")
    elif uarg is not None:
        zc = f"; zerocopy id {uarg[0]}{' (will report COPIED)' if not uarg[2] else ''}"
    elif flags & MSG_ZEROCOPY:
        zc = "; " + _ZC_IGNORED
    partial = taken < size
    rule = f"queued {taken} of {size} bytes{zc}" if partial else f"sent {taken} bytes{zc}"
    return Result(op, taken, None, rule, "tcp_sendmsg_locked", approx=partial)


_ZC_IGNORED = "MSG_ZEROCOPY ignored: SO_ZEROCOPY not set, data copied, no notification"


def _attach(host: "Host", sk: Sock, uarg, extended: bool, taken: int) -> None:
    """Hand the send's uarg on; remember it while its data sits unsent at the tail (a later send may join it).

    Over a NIC without scatter-gather, ``taken`` decides the code: a send of at most one MSS that
    went out at once is one segment, not a GSO skb, so validate_xmit_skb() linearises it and the
    copy is marked (COPIED, see zerocopy.uncertain_code); anything larger is segmented by copy,
    unmarked, and only mostly code 0.
    """
    if uarg is None:
        if sk.tx_pending:
            sk.zc_tail = None  # copied data now ends the write queue: the next zerocopy send allocates
        return
    if _zerocopy_copied(sk):
        zerocopy.mark_copied(uarg)
    elif sk.device is not None and not sk.device.sg:
        if not extended and 0 < taken <= sk.mss_cache and not sk.tx_pending:
            zerocopy.mark_copied(uarg)
        else:
            zerocopy.uncertain_code(uarg)
    if sk.tx_pending:
        sk.zc_tail = uarg
    if extended:
        return  # already in flight (or already completed with the data it joined)
    zerocopy.finish_send(host, sk, uarg, in_flight=bool(sk.tx_pending))


def _epipe(flags: int, why: str, fn: str):
    signal = None if flags & MSG_NOSIGNAL else "SIGPIPE"
    return fail("EPIPE", why, fn, signal=signal)


def _mark_urgent(peer: Sock, offset: int) -> None:
    """tcp_check_urg() and tcp_urg(): the byte at ``offset`` of rx is urgent; a newer pointer replaces the old.

    An old urgent byte that the reader stands at (and would step over) is dropped first, as
    tcp_check_urg() advances copied_seq past it; further back it simply becomes data.
    """
    if peer.urg_mark == 0 and not peer.oobinline and offset > 0:
        del peer.rx[0]
        offset -= 1
    peer.urg_mark, peer.urg_read = offset, False


def _readable_span(sk: Sock) -> tuple[int, int]:
    """(start, end) in rx of what one read copies: tcp_recvmsg_locked() stops before the urgent mark and,
    without SO_OOBINLINE, steps over the urgent byte itself when it stands at it."""
    mark = sk.urg_mark
    if mark is None:
        return 0, len(sk.rx)
    if mark > 0:
        return 0, mark
    return (0 if sk.oobinline else 1), len(sk.rx)


def _consume(sk: Sock, count: int) -> None:
    """Bytes read off rx; once copied_seq passes urg_seq, tp->urg_data is cleared."""
    del sk.rx[:count]
    if sk.urg_mark is not None:
        if sk.urg_mark < count:
            sk.urg_mark, sk.urg_read = None, False
        else:
            sk.urg_mark -= count
    if isinstance(sk.peer, Sock):
        _flush(sk.peer)


def _recv_urgent(op: str, sk: Sock, length: int, flags: int) -> Result:
    """tcp_recv_urg(): EINVAL without an unread urgent byte (or with SO_OOBINLINE), else that one byte."""
    if sk.oobinline or sk.urg_mark is None or sk.urg_read:
        why = "SO_OOBINLINE set" if sk.oobinline else "urgent byte already read" if sk.urg_read else "no urgent data"
        raise fail("EINVAL", f"recv(MSG_OOB): {why}", "tcp_recv_urg")
    if sk.sk_state == TCP_CLOSE and not sk.fin_received:
        raise fail("ENOTCONN", "recv(MSG_OOB) on a closed socket", "tcp_recv_urg")
    byte = bytes(sk.rx[sk.urg_mark:sk.urg_mark + 1])
    if not flags & MSG_PEEK:
        sk.urg_read = True  # TCP_URG_READ: the byte stays in the queue, skipped by normal reads
    count = 1 if length > 0 else 0
    return Result(op, count, None, "the urgent byte (tp->urg_data); it stays in the queue", "tcp_recv_urg",
                  data=byte[:count])


def _recv_waitall(op: str, sk: Sock, length: int, data: bytes) -> Result:
    """A blocking MSG_WAITALL read goes on after the first copy: each read opens the window, the peer's
    queued bytes arrive, and tcp_recvmsg_locked() copies them, until ``length`` bytes, the urgent mark,
    or an empty queue; then it returns at FIN, an error or a shutdown, and otherwise sleeps for the rest."""
    while len(data) < length and sk.urg_mark != 0:
        start, end = _readable_span(sk)
        if end <= start:
            break
        count = min(length - len(data), end - start)
        data += bytes(sk.rx[start:start + count])
        _consume(sk, start + count)
    copied = len(data)
    if copied == length or sk.urg_mark == 0 or sk.fin_received or sk.err or sk.shutdown & RCV_SHUTDOWN \
            or sk.sk_state == TCP_CLOSE:
        return Result(op, copied, None, f"MSG_WAITALL: read {copied} byte(s), {len(sk.rx)} left queued",
                      "tcp_recvmsg_locked", data=data)
    return Result(op, copied, None, f"MSG_WAITALL: read {copied} of {length} byte(s); sleeps in sk_wait_data for "
                  "the rest", "tcp_recvmsg_locked", blocked=True, data=data)


def recvmsg(op: str, host: "Host", f: OpenFile, length: int, flags: int) -> Result:
    """tcp_recvmsg_locked(): data first, then FIN (0), sk_err, RCV_SHUTDOWN, CLOSE (ENOTCONN), EAGAIN."""
    sk = f.sock
    if flags & MSG_ERRQUEUE:
        note = zerocopy.read_notification(sk)
        uncertain = note.pop("uncertain", False)
        return Result(op, [note], None, f"one notification: ids {note['lo']}..{note['hi']}, code {note['code']}"
                      + (" (no SG on the NIC: a few such sends complete COPIED)" if uncertain else ""),
                      "ip_recv_error", approx=uncertain)
    if sk.sk_state == TCP_LISTEN:
        raise fail("ENOTCONN", "recv on a listening socket", "tcp_recvmsg_locked")
    if flags & MSG_OOB:
        return _recv_urgent(op, sk, length, flags)
    start, end = _readable_span(sk)
    if end > start:
        count = min(length, end - start)
        data = bytes(sk.rx[start:start + count])
        if not flags & MSG_PEEK:
            _consume(sk, start + count)
            if flags & MSG_WAITALL and count < length and not (f.nonblock or flags & MSG_DONTWAIT):
                return _recv_waitall(op, sk, length, data)
        note = "; the urgent byte before them stepped over" if start else ""
        return Result(op, count, None, f"read {count} byte(s), {len(sk.rx)} left queued{note}", "tcp_recvmsg_locked",
                      data=data)
    if start and not flags & MSG_PEEK:
        _consume(sk, start)  # only the urgent byte was queued: stepped over (and lost to MSG_OOB), nothing copied
    if sk.fin_received:
        return Result(op, 0, None, "peer sent FIN: end of stream", "tcp_recvmsg_locked")
    error = sk.take_error()
    if error:
        raise fail(error, failure_reason(error), "tcp_recvmsg_locked")
    if sk.shutdown & RCV_SHUTDOWN:
        return Result(op, 0, None, "receive side shut down", "tcp_recvmsg_locked")
    if sk.sk_state == TCP_CLOSE:
        raise fail("ENOTCONN", "socket not connected", "tcp_recvmsg_locked")
    if f.nonblock or flags & MSG_DONTWAIT:
        raise fail("EAGAIN", "no data queued", "tcp_recvmsg_locked")
    return Result(op, None, None, "no data: sleeps in sk_wait_data", "tcp_recvmsg_locked", blocked=True)

