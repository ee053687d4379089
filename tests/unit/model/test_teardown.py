"""close()/shutdown() and data: FIN vs RST, CLOSE_WAIT, TIME_WAIT on the active closer, EPIPE/SIGPIPE."""

from harness.model.constants import MSG_DONTWAIT, MSG_NOSIGNAL

from model_helpers import listener, tcp


def pair(a, b):
    lfd = listener(a, 7000)
    cfd = tcp(b)
    assert b.call("connect", {"fd": cfd, "addr": ("198.51.100.1", 7000)}).ok
    return lfd, a.call("accept", {"fd": lfd}).ret, cfd


def test_data_round_trip(a, b):
    """Bytes sent arrive in order; MSG_PEEK leaves them queued."""
    _, sfd, cfd = pair(a, b)
    assert b.call("send", {"fd": cfd, "data": b"hello world"}).ret == 11
    peek = a.call("recv", {"fd": sfd, "length": 5, "flags": 2})
    assert peek.data == b"hello"
    got = a.call("recv", {"fd": sfd, "length": 100})
    assert got.ret == 11 and got.data == b"hello world"
    assert a.call("recv", {"fd": sfd, "flags": MSG_DONTWAIT}).errno == "EAGAIN"


def test_recv_blocks_without_data(a, b):
    """A blocking recv with nothing queued sleeps (model: blocked)."""
    _, sfd, _ = pair(a, b)
    assert a.call("recv", {"fd": sfd}).blocked


def test_recv_on_listener_and_unconnected(a):
    """Rule: tcp_recvmsg_locked: LISTEN and CLOSE give ENOTCONN."""
    assert a.call("recv", {"fd": listener(a, 7000)}).errno == "ENOTCONN"
    assert a.call("recv", {"fd": tcp(a)}).errno == "ENOTCONN"


def test_send_unconnected_is_epipe_with_sigpipe(a):
    """Rule: sk_stream_wait_connect -> EPIPE, and sk_stream_error raises SIGPIPE unless MSG_NOSIGNAL."""
    fd = tcp(a)
    r = a.call("send", {"fd": fd, "data": b"x"})
    assert r.errno == "EPIPE" and r.signal == "SIGPIPE" and "[SIGPIPE]" in str(r)
    assert a.call("send", {"fd": fd, "data": b"x", "flags": MSG_NOSIGNAL}).signal is None


def test_orderly_close_active_closer_gets_time_wait(a, b):
    """Rule: FIN exchange: the first closer ends in TIME_WAIT, the other in CLOSE_WAIT then LAST_ACK/closed."""
    lfd, sfd, cfd = pair(a, b)
    assert b.call("close", {"fd": cfd}).ok
    assert a.socket(sfd).sk_state == "CLOSE_WAIT"
    assert a.call("recv", {"fd": sfd}).ret == 0
    assert [r.state for r in b.ss() if r.proto == "tcp"] == ["FIN-WAIT-2"]
    assert a.call("close", {"fd": sfd}).ok
    assert [r.state for r in b.ss() if r.proto == "tcp"] == ["TIME-WAIT"]
    assert [r.state for r in a.ss() if r.proto == "tcp"] == ["LISTEN"]


def test_close_with_unread_data_sends_rst(a, b):
    """Rule: tcp_close: unread receive data -> RST instead of FIN; the peer sees ECONNRESET, no TIME_WAIT."""
    _, sfd, cfd = pair(a, b)
    b.call("send", {"fd": cfd, "data": b"unread"})
    r = a.call("close", {"fd": sfd})
    assert "RST" in r.rule
    assert a.predict_counters()["TcpExt.TCPAbortOnClose"] == 1
    assert b.call("recv", {"fd": cfd}).errno == "ECONNRESET"
    assert b.call("recv", {"fd": cfd}).ret == 0
    assert not any(r.state == "TIME-WAIT" for r in a.ss())


def test_shutdown_wr_then_peer_close(a, b):
    """Rule: shutdown(SHUT_WR) sends FIN; the peer reads EOF; after the peer closes the socket is done."""
    _, sfd, cfd = pair(a, b)
    assert b.call("shutdown", {"fd": cfd, "how": 1}).ok
    assert b.socket(cfd).sk_state == "FIN_WAIT2"
    assert a.call("recv", {"fd": sfd}).ret == 0
    assert a.call("send", {"fd": sfd, "data": b"late"}).ret == 4  # half-close: the other way still works
    assert b.call("recv", {"fd": cfd}).data == b"late"
    a.call("close", {"fd": sfd})
    assert b.socket(cfd).sk_state == "CLOSE"  # tcp_time_wait(): a minisock takes over, the socket is done
    assert [r.state for r in b.ss() if r.proto == "tcp"] == ["TIME-WAIT"]


def test_send_after_shutdown_wr_is_epipe(a, b):
    """Rule: SEND_SHUTDOWN -> EPIPE (sk_stream_error)."""
    _, _, cfd = pair(a, b)
    b.call("shutdown", {"fd": cfd, "how": 1})
    assert b.call("send", {"fd": cfd, "data": b"x", "flags": MSG_NOSIGNAL}).errno == "EPIPE"


def test_closing_listener_resets_queued_connections(a, b):
    """Rule: inet_csk_listen_stop resets never-accepted connections: clients read ECONNRESET."""
    lfd = listener(a, 7000)
    cfd = tcp(b)
    b.call("connect", {"fd": cfd, "addr": ("198.51.100.1", 7000)})
    r = a.call("close", {"fd": lfd})
    assert "1 queued" in r.rule
    assert b.call("recv", {"fd": cfd}).errno == "ECONNRESET"
    assert a.port_owners(7000) == []


def test_write_to_closed_peer_eventually_epipe(a, b):
    """Data to a peer that closed gets RST back: the writer is reset and later writes are EPIPE."""
    _, sfd, cfd = pair(a, b)
    a.call("close", {"fd": sfd})
    assert b.call("send", {"fd": cfd, "data": b"x"}).ok
    r = b.call("send", {"fd": cfd, "data": b"x", "flags": MSG_NOSIGNAL})
    assert r.errno in ("EPIPE", "ECONNRESET")


def test_close_releases_bound_port(a):
    """Closing an unconnected socket frees its port."""
    fd = tcp(a)
    a.call("bind", {"fd": fd, "addr": ("0.0.0.0", 7000)})
    a.call("close", {"fd": fd})
    assert a.port_owners(7000) == []
    assert a.call("close", {"fd": fd}).errno == "EBADF"


def test_shutdown_rd_on_listener_stops_listening(a):
    """Rule: inet_shutdown(SHUT_RD) on a listener runs tcp_disconnect."""
    lfd = listener(a, 7000)
    assert a.call("shutdown", {"fd": lfd, "how": 0}).ok
    assert a.socket(lfd).sk_state == "CLOSE"
    assert a.call("accept", {"fd": lfd}).errno == "EINVAL"


def test_fin_waits_behind_unsent_data(a, b):
    """The FIN queues behind data the peer's window has not taken: FIN_WAIT1 until the reader drains it."""
    lfd = listener(a, 7000)
    cfd = tcp(b, flags=0o4000)
    b.call("connect", {"fd": cfd, "addr": ("198.51.100.1", 7000)})
    sfd = a.call("accept", {"fd": lfd}).ret
    while b.call("send", {"fd": cfd, "length": 65536}).ok:
        pass
    assert not b.call("poll", {"fds": [cfd], "events": 4}).ret[cfd] & 4  # no POLLOUT while full
    b.call("close", {"fd": cfd})
    assert [r.state for r in b.ss()] == ["FIN-WAIT-1"]
    while a.call("recv", {"fd": sfd, "length": 1 << 20}).ret:
        pass
    assert a.socket(sfd).sk_state == "CLOSE_WAIT"
    assert [r.state for r in b.ss()] == ["FIN-WAIT-2"]
    a.call("close", {"fd": sfd})
    assert [r.state for r in b.ss()] == ["TIME-WAIT"]


def test_a_listener_left_ipv6_mapped_by_a_refused_connect_loses_the_reset_of_its_queued_ipv6_child(a):
    """Rule: tcp_v6_syn_recv_sock keeps a native child's cloned ipv6_mapped ops; its RST goes down IPv4 (fuzz-1-953)."""
    stale = tcp(a, family=10)
    assert a.call("connect", {"fd": stale, "addr": ("::ffff:127.0.0.1", 0)}).errno == "ECONNREFUSED"
    assert a.call("listen", {"fd": stale, "backlog": 8}).ok
    port = a.call("getsockname", {"fd": stale}).ret[1]
    client = tcp(a, family=10)
    assert a.call("connect", {"fd": client, "addr": ("::1", port)}).ret == 0
    assert a.call("close", {"fd": stale}).ok
    assert a.call("poll", {"fds": [client], "events": 1, "timeout": 0}).ret == {client: 0}  # no RST arrived
    # The same without the refused connect first: the queued child's RST resets the client.
    clean = tcp(a, family=10)
    assert a.call("listen", {"fd": clean, "backlog": 8}).ok
    port = a.call("getsockname", {"fd": clean}).ret[1]
    other = tcp(a, family=10)
    assert a.call("connect", {"fd": other, "addr": ("::1", port)}).ret == 0
    assert a.call("close", {"fd": clean}).ok
    assert a.call("poll", {"fds": [other], "events": 1, "timeout": 0}).ret == {other: 25}  # POLLIN|POLLERR|POLLHUP
