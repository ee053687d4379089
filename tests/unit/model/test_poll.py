"""poll(): readiness of listeners and connected sockets, POLLNVAL, POLLHUP, revents masking."""

from harness.model.constants import (
    POLLERR, POLLHUP, POLLIN, POLLNVAL, POLLOUT, POLLRDHUP, SOCK_NONBLOCK,
)

from model_helpers import listener, tcp, udp


def poll(host, fds, events=POLLIN | POLLOUT):
    r = host.call("poll", {"fds": fds, "events": events})
    assert r.ok, r
    return r.ret


def test_listener_readable_only_with_pending_connection(a, b):
    """Rule: inet_csk_listen_poll: POLLIN iff the accept queue is non-empty; never POLLOUT."""
    lfd = listener(a, 7000)
    assert poll(a, [lfd])[lfd] == 0
    b.call("connect", {"fd": tcp(b), "addr": ("198.51.100.1", 7000)})
    assert poll(a, [lfd])[lfd] & POLLIN
    assert not poll(a, [lfd])[lfd] & POLLOUT


def test_fresh_tcp_socket_is_pollout_pollhup(a):
    """Rule: tcp_poll: TCP_CLOSE gives EPOLLHUP, and a non-SYN_SENT socket with space is writable."""
    fd = tcp(a)
    assert poll(a, [fd]) == {fd: POLLOUT | POLLHUP}


def test_connecting_socket_not_writable(a, b):
    """Rule: tcp_poll: SYN_SENT is neither readable nor writable."""
    listener(a, 7000, backlog=0)
    b.call("connect", {"fd": tcp(b, flags=SOCK_NONBLOCK), "addr": ("198.51.100.1", 7000)})
    fd = tcp(b, flags=SOCK_NONBLOCK)
    b.call("connect", {"fd": fd, "addr": ("198.51.100.1", 7000)})
    assert poll(b, [fd])[fd] == 0


def test_connected_socket_readiness(a, b):
    """Rule: tcp_poll: POLLOUT when connected; POLLIN once data is queued."""
    lfd = listener(a, 7000)
    cfd = tcp(b)
    b.call("connect", {"fd": cfd, "addr": ("198.51.100.1", 7000)})
    sfd = a.call("accept", {"fd": lfd}).ret
    assert poll(a, [sfd])[sfd] == POLLOUT
    b.call("send", {"fd": cfd, "data": b"hello"})
    assert poll(a, [sfd])[sfd] == POLLIN | POLLOUT


def test_peer_fin_gives_pollin_and_rdhup(a, b):
    """Rule: tcp_poll: RCV_SHUTDOWN (peer FIN) gives POLLIN|POLLRDHUP; recv then returns 0."""
    lfd = listener(a, 7000)
    cfd = tcp(b)
    b.call("connect", {"fd": cfd, "addr": ("198.51.100.1", 7000)})
    sfd = a.call("accept", {"fd": lfd}).ret
    b.call("shutdown", {"fd": cfd, "how": 1})
    revents = poll(a, [sfd], POLLIN | POLLOUT | POLLRDHUP)[sfd]
    assert revents & POLLIN and revents & POLLRDHUP
    assert a.call("recv", {"fd": sfd}).ret == 0


def test_reset_gives_pollerr_and_pollhup(a, b):
    """Rule: a reset sets sk_err and SHUTDOWN_MASK: POLLERR|POLLHUP even when not asked for."""
    lfd = listener(a, 7000)
    cfd = tcp(b)
    b.call("connect", {"fd": cfd, "addr": ("198.51.100.1", 7000)})
    a.call("close", {"fd": lfd})  # queued connection reset
    revents = poll(b, [cfd], 0)[cfd]
    assert revents & POLLERR and revents & POLLHUP


def test_unknown_fd_is_pollnval_and_negative_fd_ignored(a):
    """Rule: do_pollfd: a closed descriptor reports POLLNVAL; negative fds are skipped (revents 0)."""
    assert poll(a, [42, -1]) == {42: POLLNVAL, -1: 0}


def test_udp_poll(a):
    """Rule: datagram_poll: always writable; readable with queued datagrams."""
    fd = udp(a)
    a.call("bind", {"fd": fd, "addr": ("127.0.0.1", 5000)})
    assert poll(a, [fd]) == {fd: POLLOUT}
    a.call("send", {"fd": udp(a), "data": b"x", "addr": ("127.0.0.1", 5000)})
    assert poll(a, [fd]) == {fd: POLLIN | POLLOUT}


def test_per_fd_events_and_blocking_poll(a):
    """revents are masked by each fd's events; nothing ready with timeout -1 blocks."""
    lfd = listener(a, 7000)
    fd = tcp(a)
    assert a.call("poll", {"fds": [(fd, POLLIN)]}).ret == {fd: POLLHUP}
    r = a.call("poll", {"fds": [lfd], "events": POLLIN, "timeout": -1})
    assert r.blocked
