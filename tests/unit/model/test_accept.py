"""accept()/accept4(): EINVAL, EAGAIN, EOPNOTSUPP, flags on the new fd only, new socket state (§5)."""

from harness.model.constants import SOCK_CLOEXEC, SOCK_NONBLOCK

from model_helpers import listener, tcp, udp


def test_accept_on_non_listener_is_einval(a):
    """Rule: inet_csk_accept: sk_state != TCP_LISTEN -> EINVAL."""
    r = a.call("accept", {"fd": tcp(a)})
    assert r.errno == "EINVAL" and r.kernel_fn == "inet_csk_accept"


def test_accept_on_udp_is_eopnotsupp(a):
    """Rule: inet_dgram_ops.accept = sock_no_accept -> EOPNOTSUPP."""
    r = a.call("accept", {"fd": udp(a)})
    assert r.errno == "EOPNOTSUPP" and r.kernel_fn == "sock_no_accept"


def test_empty_nonblocking_accept_is_eagain(a):
    """Rule: inet_csk_accept: empty queue and O_NONBLOCK -> EAGAIN."""
    fd = tcp(a, flags=SOCK_NONBLOCK)
    assert a.call("bind", {"fd": fd, "addr": ("0.0.0.0", 7000)}).ok
    assert a.call("listen", {"fd": fd, "backlog": 1}).ok
    assert a.call("accept", {"fd": fd}).errno == "EAGAIN"


def test_empty_blocking_accept_blocks(a):
    """Rule: a blocking accept on an empty queue sleeps (the model reports blocked)."""
    r = a.call("accept", {"fd": listener(a, 7000)})
    assert r.blocked and not r.ok and r.errno is None


def test_accept4_flags_apply_to_new_fd_only(a, b):
    """Rule: __sys_accept4_file: SOCK_NONBLOCK/SOCK_CLOEXEC go to the new file, not the listener."""
    lfd = listener(a, 7000)
    assert b.call("connect", {"fd": tcp(b), "addr": ("198.51.100.1", 7000)}).ok
    r = a.call("accept4", {"fd": lfd, "flags": SOCK_NONBLOCK | SOCK_CLOEXEC})
    assert r.ok
    new = a.socket(r.ret)
    assert new.nonblock and new.cloexec
    old = a.socket(lfd)
    assert not old.nonblock and not old.cloexec


def test_accept_inherits_nothing_from_listener_flags(a, b):
    """Rule: plain accept() never sets O_NONBLOCK on the new fd, even from a non-blocking listener."""
    lfd = tcp(a, flags=SOCK_NONBLOCK)
    a.call("bind", {"fd": lfd, "addr": ("0.0.0.0", 7000)})
    a.call("listen", {"fd": lfd, "backlog": 4})
    b.call("connect", {"fd": tcp(b), "addr": ("198.51.100.1", 7000)})
    r = a.call("accept", {"fd": lfd})
    assert not a.socket(r.ret).nonblock


def test_accept4_bad_flags(a):
    """Rule: __sys_accept4_file: flags beyond SOCK_NONBLOCK|SOCK_CLOEXEC -> EINVAL."""
    assert a.call("accept4", {"fd": listener(a, 7000), "flags": 1}).errno == "EINVAL"


def test_accepted_socket_state_and_backlog(a, b):
    """Rule: __inet_accept sets SS_CONNECTED; the child is ESTABLISHED; sk_ack_backlog drops by one."""
    lfd = listener(a, 7000, backlog=4)
    cfd = tcp(b)
    b.call("connect", {"fd": cfd, "addr": ("198.51.100.1", 7000)})
    b.call("connect", {"fd": tcp(b), "addr": ("198.51.100.1", 7000)})
    assert a.ss_listener(7000) == (2, 4)
    r = a.call("accept", {"fd": lfd})
    child = a.socket(r.ret)
    assert child.ss_state == "SS_CONNECTED" and child.sk_state == "ESTABLISHED"
    assert child.local == ("198.51.100.1", 7000)
    assert child.peer == b.socket(cfd).local
    assert a.ss_listener(7000) == (1, 4)
    assert a.call("getpeername", {"fd": r.ret}).ret == b.socket(cfd).local


def test_accept_returns_connections_in_order(a, b):
    """The accept queue is FIFO (reqsk_queue_remove takes the head)."""
    lfd = listener(a, 7000)
    clients = [tcp(b) for _ in range(3)]
    for fd in clients:
        b.call("connect", {"fd": fd, "addr": ("198.51.100.1", 7000)})
    peers = [a.socket(a.call("accept", {"fd": lfd}).ret).peer for _ in clients]
    assert peers == [b.socket(fd).local for fd in clients]
