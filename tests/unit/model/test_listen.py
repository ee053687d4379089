"""listen(): somaxconn clamp (unsigned), EINVAL/EOPNOTSUPP cases, re-listen, autobind, backlog+1 (§4.2)."""

from harness.model.constants import AF_UNIX, SOCK_NONBLOCK, SOCK_STREAM

from model_helpers import listener, tcp, udp


def listen(host, fd, backlog, user="root"):
    return host.call("listen", {"fd": fd, "backlog": backlog}, user=user)


def connect_nb(host, addr, port):
    fd = tcp(host, flags=SOCK_NONBLOCK)
    return fd, host.call("connect", {"fd": fd, "addr": (addr, port)})


def test_backlog_clamped_to_somaxconn(a):
    """Rule: __sys_listen: backlog above net.core.somaxconn (4096) is clamped."""
    fd = tcp(a)
    assert a.call("bind", {"fd": fd, "addr": ("0.0.0.0", 7000)}).ok
    assert listen(a, fd, 100000).ok
    assert a.socket(fd).max_ack_backlog == 4096
    assert a.ss_listener(7000) == (0, 4096)


def test_negative_backlog_becomes_somaxconn(a):
    """Rule: __sys_listen compares (unsigned int)backlog > somaxconn, so -1 means somaxconn."""
    fd = tcp(a)
    assert listen(a, fd, -1).ok
    assert a.socket(fd).max_ack_backlog == 4096


def test_custom_somaxconn(net):
    """Rule: the clamp uses the host's own somaxconn sysctl."""
    c = net.add_host("c", addrs=["198.51.100.3"], sysctls={"somaxconn": 128})
    fd = tcp(c)
    assert listen(c, fd, 1000).ok and c.socket(fd).max_ack_backlog == 128


def test_listen_on_udp_is_eopnotsupp(a):
    """Rule: inet_dgram_ops.listen = sock_no_listen -> EOPNOTSUPP."""
    r = listen(a, udp(a), 5)
    assert r.errno == "EOPNOTSUPP" and r.kernel_fn == "sock_no_listen"


def test_listen_on_connected_socket_is_einval(a, b):
    """Rule: inet_listen: sock->state != SS_UNCONNECTED -> EINVAL."""
    listener(a, 7000)
    fd = tcp(b)
    assert b.call("connect", {"fd": fd, "addr": ("198.51.100.1", 7000)}).ok
    r = listen(b, fd, 5)
    assert r.errno == "EINVAL" and r.kernel_fn == "inet_listen"


def test_listen_after_nonblocking_connect_is_einval(a, b):
    """Rule: inet_listen: SS_CONNECTING (non-blocking connect) is not SS_UNCONNECTED either."""
    listener(a, 7000)
    fd, r = connect_nb(b, "198.51.100.1", 7000)
    assert r.errno == "EINPROGRESS"
    assert listen(b, fd, 5).errno == "EINVAL"


def test_relisten_only_changes_backlog(a):
    """Rule: inet_listen on a LISTEN socket only updates sk_max_ack_backlog."""
    fd = listener(a, 7000, backlog=3)
    port = a.socket(fd).local
    r = listen(a, fd, 10)
    assert r.ok and "already listening" in r.rule
    assert a.socket(fd).max_ack_backlog == 10 and a.socket(fd).local == port


def test_unbound_listener_is_autobound(a):
    """Rule: inet_csk_listen_start -> get_port(0): an unbound listener gets an ephemeral port."""
    fd = tcp(a)
    assert listen(a, fd, 5).ok
    addr, port = a.socket(fd).local
    assert addr == "0.0.0.0" and 32768 <= port <= 60999


def test_queue_admits_backlog_plus_one(a, b):
    """Rule: sk_acceptq_is_full uses '>', so backlog N queues N + 1 connections; more SYNs are dropped."""
    listener(a, 7000, backlog=2)
    outcomes = [connect_nb(b, "198.51.100.1", 7000)[0] for _ in range(5)]
    states = [b.socket(fd).sk_state for fd in outcomes]
    assert states == ["ESTABLISHED"] * 3 + ["SYN_SENT"] * 2
    assert a.ss_listener(7000) == (3, 2)


def test_backlog_zero_still_admits_one(a, b):
    """Rule: backlog 0: 0 > 0 is false, so one connection is queued."""
    listener(a, 7000, backlog=0)
    first, _ = connect_nb(b, "198.51.100.1", 7000)
    second, _ = connect_nb(b, "198.51.100.1", 7000)
    assert b.socket(first).sk_state == "ESTABLISHED"
    assert b.socket(second).sk_state == "SYN_SENT"


def test_overflow_counters_lower_bounds(a, b):
    """Rule: tcp_conn_request: each SYN dropped on a full queue adds 1 to ListenOverflows and ListenDrops."""
    lfd = listener(a, 7000, backlog=1)
    for _ in range(5):
        connect_nb(b, "198.51.100.1", 7000)
    counters = a.predict_counters()
    assert counters["TcpExt.ListenOverflows"] >= 3 and counters["TcpExt.ListenDrops"] >= 3
    assert a.socket(lfd).drops == 3


def test_retransmitted_syns_count_again(a, b, net):
    """Rule: every retransmitted SYN that meets a full queue is another overflow and drop."""
    listener(a, 7000, backlog=0)
    connect_nb(b, "198.51.100.1", 7000)
    fd, _ = connect_nb(b, "198.51.100.1", 7000)
    net.advance(3.5)  # SYN retransmits at 1 s and 3 s
    assert a.predict_counters()["TcpExt.ListenOverflows"] == 3
    assert b.socket(fd).sk_state == "SYN_SENT"


def test_retransmitted_syn_gets_in_after_accept(a, b, net):
    """A dropped SYN is retried; once accept() frees a slot the retry completes the handshake."""
    lfd = listener(a, 7000, backlog=0)
    connect_nb(b, "198.51.100.1", 7000)
    fd, _ = connect_nb(b, "198.51.100.1", 7000)
    assert a.call("accept", {"fd": lfd}).ok
    net.advance(1)
    assert b.socket(fd).sk_state == "ESTABLISHED"


def test_syncookies_zero_backlog_zero_pre_6_1_125(net):
    """Rule (6.1 < .125): inet_csk_reqsk_queue_is_full used >=, so backlog 0 without syncookies drops every SYN."""
    old = net.add_host("old", addrs=["198.51.100.7"], sysctls={"tcp_syncookies": 0}, kernel_sublevel=100)
    client = net.add_host("cl", addrs=["198.51.100.8"])
    listener(old, 7000, backlog=0)
    fd, _ = connect_nb(client, "198.51.100.7", 7000)
    assert client.socket(fd).sk_state == "SYN_SENT"
    assert old.predict_counters()["TcpExt.TCPReqQFullDrop"] == 1
    assert "TcpExt.ListenOverflows" not in old.predict_counters()


def test_listen_on_unix_needs_bind(a):
    """Rule: unix_listen: no listens on an unbound AF_UNIX socket -> EINVAL."""
    fd = a.call("socket", {"family": AF_UNIX, "type": SOCK_STREAM}).ret
    assert listen(a, fd, 5).errno == "EINVAL"


def test_a_poll_with_a_timeout_sleeps_until_the_retransmitted_syn_gets_in(a, b, net):
    """do_poll() sleeps until an event: model time runs to the SYN retransmit (1 s), not to the timeout."""
    lfd = listener(a, 7000, backlog=0)
    connect_nb(b, "198.51.100.1", 7000)
    fd, _ = connect_nb(b, "198.51.100.1", 7000)
    assert a.call("accept", {"fd": lfd}).ok
    started = net.now
    polled = b.call("poll", {"fds": [fd], "events": 4, "timeout": 8000})  # POLLOUT
    assert polled.ret == {fd: 4} and b.socket(fd).sk_state == "ESTABLISHED"
    assert abs(net.now - started - 1.0) < 0.01


def test_a_poll_with_a_timeout_and_nothing_coming_sleeps_the_whole_timeout(a, net):
    lfd = listener(a, 7000)
    started = net.now
    assert a.call("poll", {"fds": [lfd], "events": 1, "timeout": 1500}).ret == {lfd: 0}  # POLLIN: no connection
    assert abs(net.now - started - 1.5) < 0.01
    assert a.call("poll", {"fds": [lfd], "events": 1, "timeout": 0}).ret == {lfd: 0} and net.now == started + 1.5


def test_an_epoll_wait_with_a_timeout_sleeps_until_the_retransmitted_syn_gets_in(a, b, net):
    """ep_poll() sleeps until an event as do_poll() does: model time runs to the SYN retransmit (1 s)."""
    lfd = listener(a, 7000, backlog=0)
    connect_nb(b, "198.51.100.1", 7000)
    fd, _ = connect_nb(b, "198.51.100.1", 7000)
    assert a.call("accept", {"fd": lfd}).ok
    ep = b.call("epoll_create1", {}).ret
    assert b.call("epoll_ctl", {"epfd": ep, "op": 1, "fd": fd, "events": 4}).ok  # EPOLL_CTL_ADD, EPOLLOUT
    started = net.now
    waited = b.call("epoll_wait", {"epfd": ep, "timeout": 8000})
    assert waited.ret == {fd: 4} and b.socket(fd).sk_state == "ESTABLISHED"
    assert abs(net.now - started - 1.0) < 0.01


def test_an_epoll_wait_with_a_timeout_and_nothing_coming_sleeps_the_whole_timeout(a, net):
    lfd = listener(a, 7000)
    ep = a.call("epoll_create1", {}).ret
    assert a.call("epoll_ctl", {"epfd": ep, "op": 1, "fd": lfd, "events": 1}).ok  # EPOLLIN: no connection comes
    started = net.now
    assert a.call("epoll_wait", {"epfd": ep, "timeout": 1500}).ret == {}
    assert abs(net.now - started - 1.5) < 0.01
    assert a.call("epoll_wait", {"epfd": ep, "timeout": 0}).ret == {} and net.now == started + 1.5
