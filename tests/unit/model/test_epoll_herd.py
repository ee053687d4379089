"""The model of the guest agent's epoll herd: how many waiters one wakeup of a listener reaches."""

from harness.model.constants import EPOLLEXCLUSIVE, EPOLLIN, EPOLLONESHOT

from model_helpers import listener, tcp


def herd(host, fd, waiters=4, events=EPOLLIN, **extra):
    return host.call("epoll_herd", {"fd": fd, "waiters": waiters, "events": events, **extra})


def test_a_connection_wakes_every_shared_waiter_and_one_exclusive_waiter(a, b):
    """Rule: __wake_up_common: all non-exclusive entries, then exclusive ones until one wakes a waiter."""
    lfd = listener(a, 7000)
    assert herd(a, lfd, 5).ret == 0
    b.call("connect", {"fd": tcp(b), "addr": ("198.51.100.1", 7000)})
    shared = a.call("epoll_herd_wakeups", {"fd": lfd})
    assert shared.ret == 5 and shared.kernel_fn == "ep_poll_callback" and "thundering herd" in shared.rule
    a.call("accept", {"fd": lfd})
    assert herd(a, lfd, 5, EPOLLIN | EPOLLEXCLUSIVE).ret == 0
    b.call("connect", {"fd": tcp(b), "addr": ("198.51.100.1", 7000)})
    assert a.call("epoll_herd_wakeups", {"fd": lfd}).ret == 1


def test_nothing_wakes_an_idle_herd_and_a_collected_one_is_gone(a):
    lfd = listener(a, 7000)
    herd(a, lfd, 3, EPOLLIN | EPOLLEXCLUSIVE)
    assert herd(a, lfd, 3).errno == "EBUSY"
    assert a.call("epoll_herd_wakeups", {"fd": lfd}).ret == 0
    assert a.call("epoll_herd_wakeups", {"fd": lfd}).errno == "ENOENT"


def test_the_agent_s_limits_and_epoll_ctl_s_rules_hold(a):
    lfd = listener(a, 7000)
    assert herd(a, lfd, 0).errno == "EINVAL" and herd(a, lfd, 65).errno == "EINVAL"
    assert herd(a, lfd, 2, timeout=0).errno == "EINVAL"
    assert herd(a, lfd, 2, EPOLLIN | EPOLLEXCLUSIVE | EPOLLONESHOT).errno == "EINVAL"
    assert herd(a, 99).errno == "EBADF"


def test_herds_of_two_hosts_are_their_own(a, b):
    """The herd belongs to one process's descriptor: the same number on another host has none."""
    la, lb = listener(a, 7000), listener(b, 7000)
    assert la == lb
    herd(a, la, 2)
    assert b.call("epoll_herd_wakeups", {"fd": lb}).errno == "ENOENT"
    assert a.call("epoll_herd_wakeups", {"fd": la}).ret == 0
