"""AF_UNIX: names, listen/accept/connect (queue backlog + 1, EAGAIN not EINPROGRESS), data, close."""

from harness.model.constants import AF_UNIX, SOCK_DGRAM, SOCK_NONBLOCK, SOCK_STREAM


def usock(host, type_=SOCK_STREAM):
    r = host.call("socket", {"family": AF_UNIX, "type": type_})
    assert r.ok
    return r.ret


def ulistener(host, path, backlog=1):
    fd = usock(host)
    assert host.call("bind", {"fd": fd, "addr": path}).ok
    assert host.call("listen", {"fd": fd, "backlog": backlog}).ok
    return fd


def test_bind_path_twice_is_eaddrinuse_even_after_close(a):
    """Rule: unix_bind_bsd: an existing path -> EADDRINUSE; the file outlives the socket until unlink()."""
    fd = usock(a)
    assert a.call("bind", {"fd": fd, "addr": "/tmp/s"}).ok
    assert a.call("bind", {"fd": usock(a), "addr": "/tmp/s"}).errno == "EADDRINUSE"
    a.call("close", {"fd": fd})
    assert a.call("bind", {"fd": usock(a), "addr": "/tmp/s"}).errno == "EADDRINUSE"
    assert a.call("connect", {"fd": usock(a), "addr": "/tmp/s"}).errno == "ECONNREFUSED"
    assert a.call("unlink", {"path": "/tmp/s"}).ok
    assert a.call("bind", {"fd": usock(a), "addr": "/tmp/s"}).ok


def test_abstract_names_vanish_on_close(a):
    """Rule: abstract names live only as long as the socket."""
    fd = usock(a)
    assert a.call("bind", {"fd": fd, "addr": "@lab"}).ok
    assert a.call("bind", {"fd": usock(a), "addr": "@lab"}).errno == "EADDRINUSE"
    a.call("close", {"fd": fd})
    assert a.call("bind", {"fd": usock(a), "addr": "@lab"}).ok


def test_wrong_family_is_einval_not_eafnosupport(a):
    """Rule: unix_validate_addr: sun_family other than AF_UNIX -> EINVAL."""
    r = a.call("bind", {"fd": usock(a), "addr": ("127.0.0.1", 80)})
    assert r.errno == "EINVAL"


def test_autobind_with_bare_family(a):
    """Rule: addrlen == sizeof(sun_family) autobinds to an abstract name of 5 hex digits."""
    fd = usock(a)
    assert a.call("bind", {"fd": fd, "addr": "", "addrlen": 2}).ok
    name = a.call("getsockname", {"fd": fd}).ret
    assert name.startswith("@") and len(name) == 6


def test_already_bound(a):
    """Rule: a bound socket cannot bind again -> EINVAL."""
    fd = usock(a)
    a.call("bind", {"fd": fd, "addr": "/tmp/one"})
    assert a.call("bind", {"fd": fd, "addr": "/tmp/two"}).errno == "EINVAL"


def test_connect_errors(a):
    """Rule: unix_find_other: missing path ENOENT, type clash EPROTOTYPE; not listening ECONNREFUSED."""
    assert a.call("connect", {"fd": usock(a), "addr": "/nope"}).errno == "ENOENT"
    ulistener(a, "/tmp/l")
    assert a.call("connect", {"fd": usock(a, SOCK_DGRAM), "addr": "/tmp/l"}).errno == "EPROTOTYPE"
    bound = usock(a)
    a.call("bind", {"fd": bound, "addr": "/tmp/b"})
    assert a.call("connect", {"fd": usock(a), "addr": "/tmp/b"}).errno == "ECONNREFUSED"


def test_queue_full_nonblocking_is_eagain(a):
    """Rule: unix_recvq_full uses '>', so backlog 1 admits 2; then EAGAIN (non-blocking) or sleep."""
    ulistener(a, "/tmp/l", backlog=1)
    results = []
    for _ in range(3):
        fd = a.call("socket", {"family": AF_UNIX, "type": SOCK_STREAM | SOCK_NONBLOCK}).ret
        results.append(a.call("connect", {"fd": fd, "addr": "/tmp/l"}).errno)
    assert results == [None, None, "EAGAIN"]
    assert a.call("connect", {"fd": usock(a), "addr": "/tmp/l"}).blocked


def test_accept_and_data(a):
    """Connected AF_UNIX stream sockets carry data; accept yields SS_CONNECTED sockets."""
    lfd = ulistener(a, "/tmp/l", backlog=4)
    cfd = usock(a)
    assert a.call("connect", {"fd": cfd, "addr": "/tmp/l"}).ok
    sfd = a.call("accept", {"fd": lfd}).ret
    assert a.socket(sfd).ss_state == "SS_CONNECTED"
    a.call("send", {"fd": cfd, "data": b"hi"})
    assert a.call("recv", {"fd": sfd}).data == b"hi"
    assert a.call("getpeername", {"fd": cfd}).ret == "/tmp/l"


def test_recv_on_unconnected_stream_is_einval(a):
    """Rule: unix_stream_read_generic: not ESTABLISHED -> EINVAL (TCP would say ENOTCONN)."""
    assert a.call("recv", {"fd": usock(a)}).errno == "EINVAL"


def test_accept_errors(a):
    """Rule: unix_accept: datagram socket EOPNOTSUPP, not listening EINVAL."""
    assert a.call("accept", {"fd": usock(a, SOCK_DGRAM)}).errno == "EOPNOTSUPP"
    assert a.call("accept", {"fd": usock(a)}).errno == "EINVAL"


def test_peer_close_gives_eof_or_reset(a):
    """Rule: unix_release_sock: the peer gets EOF, or ECONNRESET if data was left unread."""
    lfd = ulistener(a, "/tmp/l", backlog=4)
    cfd = usock(a)
    a.call("connect", {"fd": cfd, "addr": "/tmp/l"})
    sfd = a.call("accept", {"fd": lfd}).ret
    a.call("close", {"fd": sfd})
    assert a.call("recv", {"fd": cfd}).ret == 0
    r = a.call("send", {"fd": cfd, "data": b"x"})
    assert r.errno == "EPIPE" and r.signal == "SIGPIPE"


def test_listener_close_resets_pending(a):
    """Rule: closing a listener releases embryos; their clients see ECONNRESET."""
    lfd = ulistener(a, "/tmp/l", backlog=4)
    cfd = usock(a)
    a.call("connect", {"fd": cfd, "addr": "/tmp/l"})
    a.call("close", {"fd": lfd})
    assert a.call("recv", {"fd": cfd}).errno == "ECONNRESET"


def test_dgram_queue_limit(a):
    """Rule: unix_dgram_sendmsg: more than max_dgram_qlen (10) queued -> EAGAIN when non-blocking."""
    rfd = usock(a, SOCK_DGRAM)
    a.call("bind", {"fd": rfd, "addr": "/tmp/d"})
    sfd = usock(a, SOCK_DGRAM)
    errnos = [a.call("sendto", {"fd": sfd, "data": b"x", "addr": "/tmp/d", "flags": 0x40}).errno for _ in range(12)]
    assert errnos == [None] * 11 + ["EAGAIN"]
    assert a.call("recv", {"fd": rfd}).data == b"x"


def test_unix_sockopt_levels(a):
    """Rule: AF_UNIX has no setsockopt for other levels (EOPNOTSUPP); SO_REUSEPORT is inet only."""
    fd = usock(a)
    assert a.call("setsockopt", {"fd": fd, "level": 0, "optname": 15, "value": 1}).errno == "EOPNOTSUPP"
    assert a.call("setsockopt", {"fd": fd, "level": 1, "optname": 15, "value": 1}).errno == "EOPNOTSUPP"
    assert a.call("setsockopt", {"fd": fd, "level": 1, "optname": 15, "value": 0}).ok


def test_dgram_connect_to_a_socket_connected_elsewhere_is_eperm(a):
    """Rule: unix_dgram_connect -> unix_may_send: the receiver's own peer must be unset or this socket."""
    rfd = usock(a, SOCK_DGRAM)
    a.call("bind", {"fd": rfd, "addr": "@r"})
    assert a.call("connect", {"fd": rfd, "addr": "@r"}).ok  # connected to itself
    other = usock(a, SOCK_DGRAM)
    refused = a.call("connect", {"fd": other, "addr": "@r"})
    assert (refused.errno, refused.kernel_fn) == ("EPERM", "unix_may_send")
    # unix_our_peer(): a receiver connected to the connecting socket itself takes it
    assert a.call("bind", {"fd": other, "addr": "@o"}).ok
    back = usock(a, SOCK_DGRAM)
    assert a.call("bind", {"fd": back, "addr": "@b"}).ok
    assert a.call("connect", {"fd": back, "addr": "@o"}).ok
    assert a.call("connect", {"fd": other, "addr": "@b"}).ok


def test_unread_datagrams_stay_charged_to_their_sender(a):
    """Rule: unix_writable/sock_alloc_send_pskb: a datagram's truesize counts against its sender's sk_sndbuf
    until it is read (sock_wfree); poll drops EPOLLOUT at (sk_wmem_alloc << 2) > sk_sndbuf."""
    fd = usock(a, SOCK_DGRAM)
    assert a.call("setsockopt", {"fd": fd, "level": 1, "optname": 7, "value": 2048}).ok  # SO_SNDBUF -> 4608
    assert a.call("bind", {"fd": fd, "addr": "/tmp/self"}).ok
    assert a.call("connect", {"fd": fd, "addr": "/tmp/self"}).ok
    out = 0x4  # POLLOUT
    assert a.call("poll", {"fds": [[fd, out]]}).ret == {fd: out}
    assert a.call("send", {"fd": fd, "length": 1500, "flags": 0x40}).ret == 1500  # truesize 2304
    assert a.call("poll", {"fds": [[fd, out]]}).ret == {fd: 0}
    assert a.call("send", {"fd": fd, "length": 1500, "flags": 0x40}).ret == 1500  # 2304 < 4608: still room
    refused = a.call("send", {"fd": fd, "length": 1, "flags": 0x40})
    assert (refused.errno, refused.kernel_fn) == ("EAGAIN", "sock_alloc_send_pskb")
    assert a.call("recv", {"fd": fd, "length": 2000}).ret == 1500
    assert a.call("recv", {"fd": fd, "length": 2000}).ret == 1500
    assert a.call("poll", {"fds": [[fd, out]]}).ret == {fd: out}
