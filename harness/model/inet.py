"""AF_INET/AF_INET6 proto_ops bodies: bind, listen, accept, connect, getname, shutdown, send/recv dispatch."""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

from . import tcp, udp
from .binding import get_port, port_table, unbind
from .addr import ANY4, ANY6, SIN6_LEN_RFC2133, SOCKADDR_IN_LEN, SockAddr, v4_of_v6
from .config import Creds
from .constants import (
    AF_INET, AF_INET6, AF_UNSPEC, CAP_NET_BIND_SERVICE, SOCK_CLOEXEC, SOCK_NONBLOCK, SOCK_STREAM, SS_CONNECTED,
    SS_CONNECTING, SS_DISCONNECTING, SS_UNCONNECTED, TCP_CLOSE, TCP_LISTEN, TCP_SYN_RECV, TCP_SYN_SENT,
)
from .result import Result, fail
from .sock import OpenFile, SHUTDOWN_MASK, Sock
from .views import endpoint, ep_text

if TYPE_CHECKING:
    from .host import Host, Process


def _is_multicast_or_broadcast4(addr: str) -> bool:
    first = int(addr.split(".", 1)[0])
    return 224 <= first <= 239 or addr == "255.255.255.255"


def _check_bind_address(host: "Host", creds: Creds, sk: Sock, sa: SockAddr) -> str:
    """Family/length/address checks in the order inet_bind()/__inet_bind() or inet6_bind()/__inet6_bind() run them."""
    if sk.family == AF_INET:
        if sa.addrlen < SOCKADDR_IN_LEN:
            raise fail("EINVAL", f"addrlen {sa.addrlen} < sizeof(struct sockaddr_in)", "inet_bind")
        if sa.family != AF_INET and not (sa.family == AF_UNSPEC and sa.host == ANY4):
            raise fail("EAFNOSUPPORT", f"sockaddr family {sa.family} on an AF_INET socket", "__inet_bind")
        addr = sa.host if sa.family == AF_INET else ANY4
        if ":" in addr:
            raise fail("EAFNOSUPPORT", "IPv6 address on an AF_INET socket", "__inet_bind")
        _check_local4(host, sk, addr, "__inet_bind")
        _check_bind_service(host, creds, sa.port, "__inet_bind")
        return addr
    if sa.addrlen < SIN6_LEN_RFC2133:
        raise fail("EINVAL", f"addrlen {sa.addrlen} < SIN6_LEN_RFC2133", "inet6_bind")
    if sa.family != AF_INET6:
        raise fail("EAFNOSUPPORT", f"sockaddr family {sa.family} on an AF_INET6 socket", "__inet6_bind")
    addr = sa.host
    if addr.startswith("ff") and sk.type == SOCK_STREAM:
        raise fail("EINVAL", "multicast address on a stream socket", "__inet6_bind")
    _check_bind_service(host, creds, sa.port, "__inet6_bind")
    # __inet6_bind() checks the double bind before the address, unlike __inet_bind()
    _check_unbound(sk, "__inet6_bind")
    mapped = v4_of_v6(addr)
    if mapped is not None:
        if sk.v6only:
            raise fail("EINVAL", "v4-mapped address on an IPV6_V6ONLY socket", "__inet6_bind")
        _check_local4(host, sk, mapped, "__inet6_bind")
    elif addr != ANY6 and not host.is_local6(addr) and not _nonlocal_ok(host, sk, v6=True):
        raise fail("EADDRNOTAVAIL", f"{addr} is not an address of {host.name} (no freebind/ip_nonlocal_bind)",
                   "__inet6_bind")
    return addr


def _nonlocal_ok(host: "Host", sk: Sock, v6: bool) -> bool:
    """inet_can_nonlocal_bind()/ipv6_can_nonlocal_bind(): sysctl, IP_FREEBIND or IP_TRANSPARENT."""
    key = "net.ipv6.ip_nonlocal_bind" if v6 else "net.ipv4.ip_nonlocal_bind"
    return bool(host.sysctls[key]) or sk.freebind


def _check_local4(host: "Host", sk: Sock, addr: str, fn: str) -> None:
    if addr == ANY4 or host.is_local4(addr) or _is_multicast_or_broadcast4(addr):
        return
    if _nonlocal_ok(host, sk, v6=False):
        return
    raise fail("EADDRNOTAVAIL", f"{addr} is not an address of {host.name} (no IP_FREEBIND, ip_nonlocal_bind=0)", fn)


def _check_bind_service(host: "Host", creds: Creds, port: int, fn: str) -> None:
    """inet_port_requires_bind_service(): ports below ip_unprivileged_port_start need the capability."""
    start = host.sysctls["net.ipv4.ip_unprivileged_port_start"]
    if port and port < start and not creds.capable(CAP_NET_BIND_SERVICE):
        raise fail("EACCES", f"port {port} < ip_unprivileged_port_start {start} needs CAP_NET_BIND_SERVICE", fn)


def _check_unbound(sk: Sock, fn: str) -> None:
    if sk.sk_state != TCP_CLOSE or sk.bound:
        state = "already bound" if sk.bound else "not in CLOSE state"
        raise fail("EINVAL", f"socket {state} (port {sk.port})", fn)


def inet_bind(op: str, host: "Host", creds: Creds, f: OpenFile, sa: SockAddr) -> Result:
    """inet_bind()/inet6_bind() -> __inet_bind(): checks, then get_port."""
    sk = f.sock
    addr = _check_bind_address(host, creds, sk, sa)
    fn = "__inet_bind" if sk.family == AF_INET else "__inet6_bind"
    _check_unbound(sk, fn)
    sk.rcv_addr = addr
    saved_v6only = sk.v6only
    if sk.family == AF_INET6 and addr != ANY6 and v4_of_v6(addr) is None:
        sk.v6only = True  # __inet6_bind(): a specific IPv6 address makes the socket IPv6-only, before get_port
    try:
        port, rule = get_port(host, sk, sa.port, fn)
    except Exception:
        sk.rcv_addr = None
        sk.v6only = saved_v6only
        raise
    sk.port = port
    sk.bound = True
    sk.bindport_locked = sa.port != 0
    sk.bindaddr_locked = addr not in (ANY4, ANY6)  # SOCK_BINDADDR_LOCK: tcp_disconnect() keeps the address
    port_table(host, sk).add(sk, port)
    kernel_fn = "inet_csk_get_port" if sk.type == SOCK_STREAM else "udp_lib_get_port"
    return Result(op, 0, None, f"bound {ep_text(sk, False)}; {rule}", kernel_fn)


def inet_listen(op: str, host: "Host", creds: Creds, f: OpenFile, backlog: int) -> Result:
    """inet_listen(): EINVAL unless an unconnected stream socket in CLOSE or LISTEN; re-listen only resizes."""
    sk = f.sock
    if sk.ss_state != SS_UNCONNECTED or sk.type != SOCK_STREAM:
        raise fail("EINVAL", "listen() needs an unconnected SOCK_STREAM socket (sock->state is not SS_UNCONNECTED)",
                   "inet_listen")
    if sk.sk_state not in (TCP_CLOSE, TCP_LISTEN):
        raise fail("EINVAL", f"sk_state {sk.sk_state} is neither CLOSE nor LISTEN", "inet_listen")
    old = sk.max_ack_backlog
    sk.max_ack_backlog = backlog
    if sk.sk_state == TCP_LISTEN:
        return Result(op, 0, None, f"already listening: sk_max_ack_backlog {old} -> {backlog}", "inet_listen")
    # inet_csk_listen_start(): announce LISTEN first, then re-validate the port in that state
    sk.sk_state = TCP_LISTEN
    was_bound = sk.bound
    try:
        if was_bound:
            _, rule = get_port(host, sk, sk.port, "inet_csk_listen_start")
        else:
            sk.rcv_addr = ANY6 if sk.family == AF_INET6 else ANY4
            port, rule = get_port(host, sk, 0, "inet_csk_listen_start")
            sk.port, sk.bound = port, True
            host.tcp_ports.add(sk, port)
    except Exception:
        sk.sk_state = TCP_CLOSE
        if not was_bound:
            sk.rcv_addr = None
        raise
    sk.accept_queue = deque()
    tcp.set_listening(sk, True)  # inet_csk_listen_start() -> sk->sk_prot->hash()
    capacity = backlog + 1
    return Result(op, 0, None,
                  f"listening on {ep_text(sk, False)}, sk_max_ack_backlog {backlog} (queue admits {capacity}: "
                  f"sk_acceptq_is_full uses >); {rule}", "inet_csk_listen_start")


def inet_accept(op: str, host: "Host", proc: "Process", f: OpenFile, flags: int) -> Result:
    """inet_accept() -> inet_csk_accept(): EINVAL unless listening, EAGAIN when empty and non-blocking."""
    sk = f.sock
    if sk.sk_state != TCP_LISTEN:
        raise fail("EINVAL", "accept() on a socket that is not listening", "inet_csk_accept")
    if not sk.accept_queue:
        if f.nonblock:
            raise fail("EAGAIN", "accept queue empty and O_NONBLOCK set", "inet_csk_accept")
        return Result(op, None, None, "accept queue empty: sleeps in inet_csk_wait_for_connect", "inet_csk_accept",
                      blocked=True)
    child = sk.accept_queue.popleft()
    child.parent = None
    child.ss_state = SS_CONNECTED  # __inet_accept() -> sock_graft
    nonblock = bool(flags & SOCK_NONBLOCK)
    cloexec = bool(flags & SOCK_CLOEXEC)
    fd = proc.install(OpenFile(child, nonblock, cloexec))
    peer = ep_text(child, True)
    return Result(op, fd, None,
                  f"fd {fd} = socket:[{child.inode}] from {peer}; sk_ack_backlog now {len(sk.accept_queue)}; "
                  f"new fd {'O_NONBLOCK ' if nonblock else ''}{'O_CLOEXEC' if cloexec else ''}".rstrip(),
                  "inet_accept")


def inet_getname(op: str, host: "Host", f: OpenFile, peer: bool) -> Result:
    """inet_getname(): ENOTCONN for the peer of an unconnected socket (or one in CLOSE/SYN_SENT)."""
    sk = f.sock
    if peer:
        # inet_getname(): no inet_dport (a UDP connect to port 0 included) is no peer.
        if sk.peer_addr is None or not sk.peer_port or sk.sk_state in (TCP_CLOSE, TCP_SYN_SENT) and sk.type == SOCK_STREAM:
            raise fail("ENOTCONN", "no peer: not connected", "inet_getname")
        return Result(op, endpoint(sk, True), None, "inet_daddr/inet_dport", "inet_getname")
    return Result(op, endpoint(sk, False), None, "inet_rcv_saddr (or inet_saddr) and inet_sport", "inet_getname")


def inet_shutdown(op: str, host: "Host", f: OpenFile, how: int) -> Result:
    """inet_shutdown(): how 0..2 becomes a 1..3 mask; ENOTCONN in CLOSE but the flags still apply."""
    sk = f.sock
    mask = (how + 1) & 0xFFFFFFFF
    if mask & ~SHUTDOWN_MASK or not mask:
        raise fail("EINVAL", f"how {how} is not SHUT_RD, SHUT_WR or SHUT_RDWR", "inet_shutdown")
    if sk.ss_state == SS_CONNECTING:
        sk.ss_state = SS_DISCONNECTING if sk.sk_state in (TCP_SYN_SENT, TCP_SYN_RECV, TCP_CLOSE) else SS_CONNECTED
    state = sk.sk_state
    if state == TCP_LISTEN:
        if mask & 1:
            tcp.disconnect(host, sk)
            sk.ss_state = SS_UNCONNECTED
            return Result(op, 0, None, "SHUT_RD on a listener: tcp_disconnect() stops listening", "inet_shutdown")
        return Result(op, 0, None, "SHUT_WR on a listener does nothing", "inet_shutdown")
    if state == TCP_SYN_SENT:
        tcp.disconnect(host, sk)
        sk.ss_state = SS_UNCONNECTED
        return Result(op, 0, None, "shutdown during SYN_SENT disconnects", "inet_shutdown")
    sk.shutdown |= mask
    if state == TCP_CLOSE:
        raise fail("ENOTCONN", "socket not connected (shutdown flags recorded anyway, poll sees EPOLLHUP)",
                   "inet_shutdown")
    if sk.type == SOCK_STREAM and mask & 2:
        tcp.shutdown_send(host, sk)
    return Result(op, 0, None, f"sk_shutdown |= {mask}", "inet_shutdown")


def inet_stream_connect(op: str, host: "Host", creds: Creds, f: OpenFile, sa: SockAddr) -> Result:
    """__inet_stream_connect(): the sock->state switch, then wait (or not) for the handshake."""
    sk = f.sock
    if sa.addrlen < 2:
        raise fail("EINVAL", "addrlen shorter than sa_family", "__inet_stream_connect")
    if sa.family == AF_UNSPEC:
        tcp.disconnect(host, sk)
        sk.ss_state = SS_UNCONNECTED
        return Result(op, 0, None, "AF_UNSPEC: tcp_disconnect()", "__inet_stream_connect")
    state = sk.ss_state
    if state == SS_CONNECTED:
        raise fail("EISCONN", "already connected", "__inet_stream_connect")
    if state == SS_CONNECTING:
        err = "EALREADY"
    elif state == SS_UNCONNECTED:
        if sk.sk_state != TCP_CLOSE:
            raise fail("EISCONN", "sk_state is not CLOSE (listening or still closing)", "__inet_stream_connect")
        tcp.connect(host, sk, sa)
        sk.ss_state = SS_CONNECTING
        err = "EINPROGRESS"
    else:
        raise fail("EINVAL", "socket is disconnecting", "__inet_stream_connect")
    if err == "EINPROGRESS" and f.nonblock:
        # the reply (SYN-ACK or RST) is processed from the socket backlog after release_sock(),
        # so a non-blocking connect reports EINPROGRESS even when the answer is already known
        raise fail("EINPROGRESS", f"SYN sent; {tcp.progress_note(sk)}", "__inet_stream_connect")
    if sk.sk_state in (TCP_SYN_SENT, TCP_SYN_RECV):
        if f.nonblock:
            raise fail(err, f"handshake still pending ({tcp.pending_reason(sk)})", "__inet_stream_connect")
        # inet_wait_for_connect() sleeps until the state changes. The model answers a SYN at once, so a
        # handshake still pending here waits for a timer (a retransmission at 1 s at the earliest, an ARP
        # failure at ~3 s) and no caller sees it return soon: it sleeps (measured: fuzz-1-326, a full
        # accept queue; ETIMEDOUT only after tcp_syn_retries, about 127 s). The timers still run when
        # model time passes, and SO_ERROR then tells how the attempt ended.
        return Result(op, None, None, f"sleeps in inet_wait_for_connect: {tcp.pending_reason(sk)}",
                      "__inet_stream_connect", blocked=True)
    if sk.sk_state == TCP_CLOSE:
        error = sk.take_error() or "ECONNABORTED"
        sk.ss_state = SS_UNCONNECTED
        tcp.disconnect(host, sk)
        raise fail(error, tcp.failure_reason(error), "__inet_stream_connect")
    sk.ss_state = SS_CONNECTED
    return Result(op, 0, None, f"connected {ep_text(sk, False)} -> {ep_text(sk, True)}", "__inet_stream_connect")


def inet_dgram_connect(op: str, host: "Host", creds: Creds, f: OpenFile, sa: SockAddr) -> Result:
    """inet_dgram_connect(): AF_UNSPEC disconnects; otherwise autobind and set the default peer."""
    return udp.connect(op, host, f.sock, sa)


def udp_release(host: "Host", sk: Sock) -> str:
    sk.orphan = True
    unbind(host, sk)
    sk.sk_state = TCP_CLOSE
    return "udp_lib_close: port released"

