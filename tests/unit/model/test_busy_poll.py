"""SO_BUSY_POLL and friends: what a socket stores, who may raise it, inheritance, SO_INCOMING_NAPI_ID."""

import pytest

from harness.model import Network
from harness.model.constants import (
    SO_BUSY_POLL, SO_BUSY_POLL_BUDGET, SO_INCOMING_NAPI_ID, SO_PREFER_BUSY_POLL, SOL_SOCKET,
)

from model_helpers import listener, tcp


def setopt(host, fd, name, value, user="root"):
    return host.call("setsockopt", {"fd": fd, "level": SOL_SOCKET, "optname": name, "value": value}, user=user)


def getopt(host, fd, name, user="root"):
    return host.call("getsockopt", {"fd": fd, "level": SOL_SOCKET, "optname": name}, user=user)


@pytest.fixture
def busy():
    """A host whose net.core.busy_read is 20, and a peer left at 0."""
    net = Network(strict=True)
    return (net.add_host("s", addrs=["198.51.100.2"], sysctls={"net.core.busy_read": 20}),
            net.add_host("c", addrs=["198.51.100.1"]))


def test_a_new_socket_starts_from_busy_read_and_only_cap_net_admin_raises_it(busy):
    """Rule: sock_init_data copies sysctl_net_busy_read; sk_setsockopt: raising needs CAP_NET_ADMIN."""
    s, c = busy
    assert getopt(s, tcp(s), SO_BUSY_POLL).ret == 20 and getopt(c, tcp(c), SO_BUSY_POLL).ret == 0
    mine = tcp(s, user="student")
    assert setopt(s, mine, SO_BUSY_POLL, 50, user="student").errno == "EPERM"
    assert setopt(s, mine, SO_BUSY_POLL, 5, user="student").ok
    assert getopt(s, mine, SO_BUSY_POLL, user="student").ret == 5
    assert setopt(s, mine, SO_BUSY_POLL, 5, user="student").ok  # not a raise
    assert setopt(s, mine, SO_PREFER_BUSY_POLL, 1, user="student").errno == "EPERM"
    assert setopt(s, mine, SO_BUSY_POLL_BUDGET, 8, user="student").errno == "EPERM"
    root = tcp(s)
    assert setopt(s, root, SO_BUSY_POLL, 50).ok and setopt(s, root, SO_BUSY_POLL, -1).errno == "EINVAL"
    assert setopt(s, root, SO_PREFER_BUSY_POLL, 1).ok and getopt(s, root, SO_PREFER_BUSY_POLL).ret == 1
    assert setopt(s, root, SO_BUSY_POLL_BUDGET, 1 << 16).errno == "EINVAL"
    assert setopt(s, root, SO_INCOMING_NAPI_ID, 1).errno == "ENOPROTOOPT"


def test_an_accepted_socket_inherits_the_listener_s_busy_poll_and_knows_its_napi_context(busy):
    """Rule: sk_clone_lock copies sk_ll_usec; sk_mark_napi_id: a NIC's NAPI has an id, loopback's none."""
    s, c = busy
    lfd = listener(s, 7000)
    assert setopt(s, lfd, SO_BUSY_POLL, 50).ok
    assert getopt(s, lfd, SO_INCOMING_NAPI_ID).ret == 0
    c.call("connect", {"fd": tcp(c), "addr": ("198.51.100.2", 7000)})
    conn = s.call("accept", {"fd": lfd}).ret
    assert getopt(s, conn, SO_BUSY_POLL).ret == 50
    napi = getopt(s, conn, SO_INCOMING_NAPI_ID)
    assert napi.ret >= 8193 and napi.approx
    loop = listener(s, 7001)
    s.call("connect", {"fd": tcp(s), "addr": ("127.0.0.1", 7001)})
    looped = s.call("accept", {"fd": loop}).ret
    assert getopt(s, looped, SO_INCOMING_NAPI_ID).ret == 0
