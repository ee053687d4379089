"""connect(): blocking vs non-blocking outcomes, sock->state machine, refusals, timeouts, UDP connect."""

from harness.model.constants import AF_INET6, AF_UNSPEC, MSG_DONTWAIT, MSG_OOB, MSG_PEEK, SOCK_NONBLOCK

from model_helpers import listener, tcp, udp


def connect(host, fd, addr, **extra):
    return host.call("connect", {"fd": fd, "addr": addr, **extra})


def test_blocking_connect_succeeds(a, b):
    """Rule: __inet_stream_connect: a completed handshake gives 0 and SS_CONNECTED."""
    listener(a, 7000)
    fd = tcp(b)
    r = connect(b, fd, ("198.51.100.1", 7000))
    assert r.ok and r.ret == 0
    view = b.socket(fd)
    assert view.ss_state == "SS_CONNECTED" and view.sk_state == "ESTABLISHED"
    assert view.local[0] == "198.51.100.2" and view.local[1] % 2 == 0  # __inet_hash_connect: even ports


def test_nonblocking_connect_is_einprogress_then_connected(a, b):
    """Rule: non-blocking TCP connect returns EINPROGRESS; a second connect returns 0, a third EISCONN."""
    listener(a, 7000)
    fd = tcp(b, flags=SOCK_NONBLOCK)
    assert connect(b, fd, ("198.51.100.1", 7000)).errno == "EINPROGRESS"
    assert b.socket(fd).ss_state == "SS_CONNECTING"
    assert b.call("getsockopt", {"fd": fd, "level": 1, "optname": 4}).ret == 0
    assert connect(b, fd, ("198.51.100.1", 7000)).ret == 0
    assert b.socket(fd).ss_state == "SS_CONNECTED"
    assert connect(b, fd, ("198.51.100.1", 7000)).errno == "EISCONN"


def test_pending_nonblocking_connect_is_ealready(a, b):
    """Rule: SS_CONNECTING while still in SYN_SENT -> EALREADY."""
    listener(a, 7000, backlog=0)
    connect(b, tcp(b, flags=SOCK_NONBLOCK), ("198.51.100.1", 7000))
    fd = tcp(b, flags=SOCK_NONBLOCK)
    assert connect(b, fd, ("198.51.100.1", 7000)).errno == "EINPROGRESS"
    assert connect(b, fd, ("198.51.100.1", 7000)).errno == "EALREADY"


def test_connect_refused(a, b):
    """Rule: no listener -> RST -> ECONNREFUSED (tcp_reset in SYN_SENT)."""
    r = connect(b, tcp(b), ("198.51.100.1", 7999))
    assert r.errno == "ECONNREFUSED"
    assert a.predict_counters()["Tcp.OutRsts"] == 1


def test_nonblocking_refused_reports_through_so_error(a, b):
    """Rule: the refused non-blocking connect leaves sk_err; SO_ERROR reads and clears it."""
    fd = tcp(b, flags=SOCK_NONBLOCK)
    assert connect(b, fd, ("198.51.100.1", 7999)).errno == "EINPROGRESS"
    assert b.call("getsockopt", {"fd": fd, "level": 1, "optname": 4}).ret == 111
    assert b.call("getsockopt", {"fd": fd, "level": 1, "optname": 4}).ret == 0


def test_blocking_connect_to_full_queue_sleeps_until_the_syn_retries_run_out(a, b, net):
    """Rule: inet_wait_for_connect: a SYN dropped by a full accept queue leaves a blocking connect asleep;
    the retries (1+6) run as model time passes and end in ETIMEDOUT (SO_ERROR)."""
    listener(a, 7000, backlog=0)
    connect(b, tcp(b, flags=SOCK_NONBLOCK), ("198.51.100.1", 7000))
    fd = tcp(b)
    r = connect(b, fd, ("198.51.100.1", 7000))
    assert r.blocked and r.kernel_fn == "__inet_stream_connect" and "accept queue full" in r.rule
    assert b.socket(fd).sk_state == "SYN_SENT"
    net.advance(200)
    assert a.predict_counters()["TcpExt.ListenOverflows"] >= 7
    assert b.socket(fd).sk_state == "CLOSE"
    assert b.call("getsockopt", {"fd": fd, "level": 1, "optname": 4}).ret == 110  # ETIMEDOUT


def test_connect_to_nobody_is_ehostunreach(b, net):
    """Model rule: an address nobody owns fails ARP after ~3 s: a blocking connect sleeps, then EHOSTUNREACH."""
    blocking = tcp(b)
    assert connect(b, blocking, ("198.51.100.77", 80)).blocked
    fd = tcp(b, flags=SOCK_NONBLOCK)
    assert connect(b, fd, ("198.51.100.77", 80)).errno == "EINPROGRESS"
    net.advance(5)
    assert b.call("getsockopt", {"fd": fd, "level": 1, "optname": 4}).ret == 113
    assert b.call("getsockopt", {"fd": blocking, "level": 1, "optname": 4}).ret == 113


def test_no_route_is_enetunreach(net):
    """Rule: ip_route_connect fails on a host with only loopback -> ENETUNREACH."""
    lonely = net.add_host("lonely")
    assert connect(lonely, tcp(lonely), ("198.51.100.1", 80)).errno == "ENETUNREACH"


def test_connect_on_listener_is_eisconn(a):
    """Rule: SS_UNCONNECTED but sk_state LISTEN -> EISCONN."""
    assert connect(a, listener(a, 7000), ("127.0.0.1", 7000)).errno == "EISCONN"


def test_connect_bad_family_and_length(a):
    """Rule: tcp_v4_connect: addr_len < sizeof(sockaddr_in) -> EINVAL; wrong family -> EAFNOSUPPORT."""
    assert connect(a, tcp(a), ("127.0.0.1", 80), addrlen=8).errno == "EINVAL"
    assert connect(a, tcp(a), ("::1", 80)).errno == "EAFNOSUPPORT"


def test_connect_af_unspec_disconnects(a):
    """Rule: AF_UNSPEC connect runs tcp_disconnect and returns to SS_UNCONNECTED."""
    listener(a, 7000)
    fd = tcp(a)
    assert connect(a, fd, ("127.0.0.1", 7000)).ok
    assert connect(a, fd, {"family": AF_UNSPEC, "host": "0.0.0.0", "port": 0}).ok
    view = a.socket(fd)
    assert view.ss_state == "SS_UNCONNECTED" and view.sk_state == "CLOSE"


def test_loopback_connect_and_route_source(a):
    """Loopback connections use 127.0.0.1 as source; connecting to the host's own address stays local."""
    listener(a, 7000)
    fd = tcp(a)
    assert connect(a, fd, ("127.0.0.1", 7000)).ok
    assert a.socket(fd).local[0] == "127.0.0.1"
    fd2 = tcp(a)
    assert connect(a, fd2, ("198.51.100.1", 7000)).ok
    assert a.socket(fd2).local[0] == "198.51.100.1"


def test_ipv6_connect_and_dual_stack_listener(a, b):
    """A [::] listener without IPV6_V6ONLY accepts IPv4 clients as v4-mapped peers."""
    lfd = tcp(a, family=AF_INET6)
    assert a.call("bind", {"fd": lfd, "addr": ("::", 7000)}).ok
    assert a.call("listen", {"fd": lfd, "backlog": 4}).ok
    assert connect(b, tcp(b), ("198.51.100.1", 7000)).ok
    assert connect(b, tcp(b, family=AF_INET6), ("2001:db8::1", 7000)).ok
    first = a.socket(a.call("accept", {"fd": lfd}).ret)
    second = a.socket(a.call("accept", {"fd": lfd}).ret)
    assert first.peer[0] == "::ffff:198.51.100.2" and second.peer[0] == "2001:db8::2"


def test_getpeername_unconnected_is_enotconn(a):
    """Rule: inet_getname: no peer -> ENOTCONN; getsockname of an unbound socket is 0.0.0.0:0."""
    fd = tcp(a)
    assert a.call("getpeername", {"fd": fd}).errno == "ENOTCONN"
    assert a.call("getsockname", {"fd": fd}).ret == ("0.0.0.0", 0)


def test_udp_connect_autobinds_and_keeps_ss_unconnected(a, b):
    """Rule: inet_dgram_connect autobinds first; ip4_datagram_connect sets the peer, sock->state stays."""
    fd = udp(b)
    r = connect(b, fd, ("198.51.100.1", 5000))
    assert r.ok
    view = b.socket(fd)
    assert view.ss_state == "SS_UNCONNECTED" and view.sk_state == "ESTABLISHED"
    assert view.local[0] == "198.51.100.2" and view.local[1] >= 32768
    assert b.call("getpeername", {"fd": fd}).ret == ("198.51.100.1", 5000)


def test_udp_connect_bad_family_still_autobinds(a):
    """Rule: inet_dgram_connect binds a port before ip4_datagram_connect rejects the family."""
    fd = udp(a)
    assert connect(a, fd, ("::1", 53)).errno == "EAFNOSUPPORT"
    assert a.socket(fd).local[1] != 0


def test_udp_connect_af_unspec(a):
    """Rule: AF_UNSPEC dissolves a UDP association (udp_disconnect)."""
    fd = udp(a)
    connect(a, fd, ("127.0.0.1", 53))
    assert connect(a, fd, {"family": AF_UNSPEC, "host": "0.0.0.0", "port": 0}).ok
    assert a.call("getpeername", {"fd": fd}).errno == "ENOTCONN"


def test_a_connect_to_its_own_address_and_port_is_a_simultaneous_open_with_itself(a):
    """Rule: tcp_rcv_synsent_state_process: the SYN meets the socket itself; established, it reads what it sends.

    Measured on the 6.1 guests (tests/corpus/fuzz-7-62.yaml): connect 0, send 5, recv 5, getpeername itself.
    """
    for family, addr in ((AF_INET6, ("::ffff:127.0.0.1", 7100)), (None, ("127.0.0.1", 7101))):
        fd = tcp(a, family=family) if family else tcp(a)
        assert a.call("bind", {"fd": fd, "addr": addr}).ok
        assert connect(a, fd, addr).ret == 0
        assert a.call("send", {"fd": fd, "data": b"hello"}).ret == 5
        assert a.call("recv", {"fd": fd, "length": 64, "flags": 0x40}).data == b"hello"
        assert a.call("getpeername", {"fd": fd}).ret[:2] == addr
    other = tcp(a)
    assert a.call("bind", {"fd": other, "addr": ("127.0.0.1", 7102)}).ok
    assert connect(a, other, ("127.0.0.1", 7103)).errno == "ECONNREFUSED"  # another closed port: still refused


def test_a_freebind_source_that_is_not_local_has_no_route(a):
    """Rule: ip_route_output_key_hash_rcu: a non-local source without IP_TRANSPARENT -> ENETUNREACH (TCP and UDP)."""
    fd = tcp(a, flags=SOCK_NONBLOCK)
    assert a.call("setsockopt", {"fd": fd, "level": 0, "optname": 15, "value": 1}).ok  # SOL_IP, IP_FREEBIND
    assert a.call("bind", {"fd": fd, "addr": ("198.51.100.77", 25032)}).ok
    for dst in ("0.0.0.0", "127.0.0.1", "198.51.100.2"):
        refused = a.call("connect", {"fd": fd, "addr": (dst, 25034)})
        assert (refused.errno, refused.kernel_fn) == ("ENETUNREACH", "ip_route_output_key_hash_rcu"), dst
    dgram = udp(a)
    assert a.call("setsockopt", {"fd": dgram, "level": 0, "optname": 15, "value": 1}).ok
    assert a.call("bind", {"fd": dgram, "addr": ("198.51.100.77", 25033)}).ok
    assert a.call("sendto", {"fd": dgram, "length": 1, "addr": ("198.51.100.2", 9)}).errno == "ENETUNREACH"
    local = tcp(a, flags=SOCK_NONBLOCK)
    assert a.call("bind", {"fd": local, "addr": ("198.51.100.1", 25035)}).ok
    assert a.call("connect", {"fd": local, "addr": ("198.51.100.2", 25034)}).errno == "EINPROGRESS"


def test_tcp_urgent_byte_is_read_with_msg_oob_and_stepped_over_by_normal_reads(a):
    """Rule: tcp_recvmsg_locked/tcp_recv_urg/tcp_poll: without SO_OOBINLINE the urgent byte is no data
    (reads stop before it and step over it, poll gives POLLPRI and no POLLIN for it alone); MSG_OOB reads it once."""
    lfd = listener(a, 7100)
    cfd = tcp(a)
    assert connect(a, cfd, ("127.0.0.1", 7100)).ok
    afd = a.call("accept", {"fd": lfd}).ret
    assert a.call("send", {"fd": cfd, "data": b"x", "flags": MSG_OOB}).ret == 1
    assert a.call("poll", {"fds": [[afd, 3]]}).ret == {afd: 2}  # POLLPRI only
    assert a.call("recv", {"fd": afd, "length": 10, "flags": MSG_DONTWAIT | MSG_PEEK}).errno == "EAGAIN"
    oob = a.call("recv", {"fd": afd, "length": 10, "flags": MSG_OOB})
    assert (oob.ret, oob.data, oob.kernel_fn) == (1, b"x", "tcp_recv_urg")
    assert a.call("recv", {"fd": afd, "length": 10, "flags": MSG_OOB}).errno == "EINVAL"
    assert a.call("send", {"fd": cfd, "data": b"abcd", "flags": MSG_OOB}).ret == 4  # the old byte is dropped
    assert a.call("recv", {"fd": afd, "length": 10, "flags": MSG_DONTWAIT}).data == b"abc"  # stops at the mark
    assert a.call("send", {"fd": cfd, "data": b"ef"}).ok
    assert a.call("recv", {"fd": afd, "length": 10, "flags": MSG_DONTWAIT}).data == b"ef"  # "d" stepped over
    assert a.call("recv", {"fd": afd, "length": 10, "flags": MSG_OOB}).errno == "EINVAL"  # and lost to MSG_OOB
    assert a.call("setsockopt", {"fd": afd, "level": 1, "optname": 10, "value": 1}).ok  # SO_OOBINLINE
    assert a.call("send", {"fd": cfd, "data": b"ghij", "flags": MSG_OOB}).ok
    assert a.call("recv", {"fd": afd, "length": 10, "flags": MSG_DONTWAIT}).data == b"ghi"
    assert a.call("recv", {"fd": afd, "length": 10, "flags": MSG_OOB}).errno == "EINVAL"
    assert a.call("recv", {"fd": afd, "length": 10, "flags": MSG_DONTWAIT}).data == b"j"  # inline data
