"""bind(): length/family/address/privilege/double-bind checks and the 6.1 port-conflict rules (§4.1)."""

import pytest

from harness.model.constants import AF_INET6, AF_UNSPEC

from model_helpers import listener, tcp, udp

REUSEADDR, REUSEPORT = 2, 15


def bind(host, fd, addr, user="root", **extra):
    return host.call("bind", {"fd": fd, "addr": addr, **extra}, user=user)


def setopt(host, fd, opt, value=1, user="root", level=1):
    r = host.call("setsockopt", {"fd": fd, "level": level, "optname": opt, "value": value}, user=user)
    assert r.ok, r
    return r


def test_short_addrlen_is_einval_before_family(a):
    """Rule: inet_bind: addr_len < sizeof(sockaddr_in) -> EINVAL, even with a wrong family."""
    fd = tcp(a)
    r = bind(a, fd, ("::1", 80), addrlen=8)
    assert r.errno == "EINVAL" and r.kernel_fn == "inet_bind"


def test_wrong_family_is_eafnosupport(a):
    """Rule: __inet_bind: sin_family other than AF_INET -> EAFNOSUPPORT."""
    fd = tcp(a)
    r = bind(a, fd, ("0.0.0.0", 7000), family=AF_INET6, addrlen=16)
    assert r.errno == "EAFNOSUPPORT"


def test_af_unspec_with_any_is_accepted(a):
    """Rule: __inet_bind accepts AF_UNSPEC only with INADDR_ANY (compatibility)."""
    fd = tcp(a)
    assert bind(a, fd, {"family": AF_UNSPEC, "host": "0.0.0.0", "port": 7000}).ok
    fd2 = tcp(a)
    assert bind(a, fd2, {"family": AF_UNSPEC, "host": "198.51.100.1", "port": 7001}).errno == "EAFNOSUPPORT"


def test_nonlocal_address_is_eaddrnotavail(a):
    """Rule: __inet_bind: an address the host does not own -> EADDRNOTAVAIL."""
    fd = tcp(a)
    r = bind(a, fd, ("198.51.100.2", 7000))
    assert r.errno == "EADDRNOTAVAIL"


def test_freebind_allows_nonlocal(a):
    """Rule: inet_can_nonlocal_bind: IP_FREEBIND lifts EADDRNOTAVAIL."""
    fd = tcp(a)
    setopt(a, fd, 15, level=0)
    assert bind(a, fd, ("203.0.113.9", 7000)).ok
    assert a.call("getsockopt", {"fd": fd, "level": 0, "optname": 15}).ret == 1


def test_ip_nonlocal_bind_sysctl(net):
    """Rule: inet_can_nonlocal_bind: net.ipv4.ip_nonlocal_bind=1 lifts EADDRNOTAVAIL."""
    c = net.add_host("c", addrs=["198.51.100.3"], sysctls={"ipv4.ip_nonlocal_bind": 1})
    assert bind(c, tcp(c), ("203.0.113.9", 7000)).ok


def test_loopback_range_and_multicast_are_local(a):
    """Rule: RTN_LOCAL covers 127/8; multicast/broadcast addresses are accepted by __inet_bind."""
    assert bind(a, udp(a), ("127.0.0.53", 5353)).ok
    assert bind(a, udp(a), ("224.0.0.251", 5353)).ok


def test_privileged_port_needs_capability(a):
    """Rule: inet_port_requires_bind_service: port < ip_unprivileged_port_start needs CAP_NET_BIND_SERVICE."""
    r = bind(a, tcp(a, user="student"), ("0.0.0.0", 80), user="student")
    assert r.errno == "EACCES"
    assert bind(a, tcp(a), ("0.0.0.0", 80)).ok
    a.add_user("web", 33, {10})
    assert bind(a, tcp(a, user="web"), ("0.0.0.0", 81), user="web").ok


def test_unprivileged_port_start_sysctl(net):
    """Rule: the threshold is net.ipv4.ip_unprivileged_port_start."""
    c = net.add_host("c", addrs=["198.51.100.3"], sysctls={"ip_unprivileged_port_start": 80})
    assert bind(c, tcp(c, user="student"), ("0.0.0.0", 80), user="student").ok


def test_eaddrnotavail_comes_before_eacces(a):
    """Rule: __inet_bind checks the address before the port privilege."""
    assert bind(a, tcp(a, user="student"), ("203.0.113.1", 80), user="student").errno == "EADDRNOTAVAIL"


def test_already_bound_is_einval(a):
    """Rule: __inet_bind: inet_num already set -> EINVAL."""
    fd = tcp(a)
    assert bind(a, fd, ("0.0.0.0", 7000)).ok
    r = bind(a, fd, ("0.0.0.0", 7001))
    assert r.errno == "EINVAL"


def test_double_bind_checked_after_privilege(a):
    """Rule: in __inet_bind the EACCES check runs before the double-bind EINVAL."""
    fd = tcp(a, user="student")
    assert bind(a, fd, ("0.0.0.0", 7000), user="student").ok
    assert bind(a, fd, ("0.0.0.0", 80), user="student").errno == "EACCES"


def test_plain_conflict_is_eaddrinuse(a):
    """Rule: overlapping addresses without reuse options -> EADDRINUSE, found by inet_csk_bind_conflict
    for the same address and by inet_bhash2_addr_any_conflict for a specific one beside a wildcard owner."""
    assert bind(a, tcp(a), ("0.0.0.0", 7000)).ok
    r = bind(a, tcp(a), ("198.51.100.1", 7000))
    assert r.errno == "EADDRINUSE" and r.kernel_fn == "inet_bhash2_addr_any_conflict"
    assert bind(a, tcp(a), ("0.0.0.0", 7000)).kernel_fn == "inet_csk_bind_conflict"
    assert "fd 3" in str(r)


def test_distinct_specific_addresses_do_not_conflict(a):
    """Rule: inet_rcv_saddr_equal: two different specific addresses never overlap."""
    assert bind(a, tcp(a), ("198.51.100.1", 7000)).ok
    assert bind(a, tcp(a), ("127.0.0.1", 7000)).ok
    assert bind(a, tcp(a), ("0.0.0.0", 7000)).errno == "EADDRINUSE"


def test_reuseaddr_on_both_when_owner_not_listening(a):
    """Rule: SO_REUSEADDR on both and the existing socket not listening -> shared."""
    first, second = tcp(a), tcp(a)
    setopt(a, first, REUSEADDR)
    setopt(a, second, REUSEADDR)
    assert bind(a, first, ("0.0.0.0", 7000)).ok
    assert bind(a, second, ("0.0.0.0", 7000)).ok


def test_reuseaddr_on_one_side_only_conflicts(a):
    """Rule: SO_REUSEADDR must be set on both sockets."""
    first, second = tcp(a), tcp(a)
    setopt(a, second, REUSEADDR)
    assert bind(a, first, ("0.0.0.0", 7000)).ok
    assert bind(a, second, ("0.0.0.0", 7000)).errno == "EADDRINUSE"


def test_reuseaddr_does_not_share_with_listener(a):
    """Rule: inet_bind_conflict: a listening owner blocks even with SO_REUSEADDR on both."""
    listener(a, 7000, reuse=True)
    second = tcp(a)
    setopt(a, second, REUSEADDR)
    r = bind(a, second, ("0.0.0.0", 7000))
    assert r.errno == "EADDRINUSE" and "listening" in r.rule


def test_listen_can_fail_with_eaddrinuse(a):
    """Rule: inet_csk_listen_start re-runs get_port in LISTEN state: the second listener fails in listen()."""
    first, second = tcp(a), tcp(a)
    for fd in (first, second):
        setopt(a, fd, REUSEADDR)
        assert bind(a, fd, ("0.0.0.0", 7000)).ok
    assert a.call("listen", {"fd": first, "backlog": 5}).ok
    r = a.call("listen", {"fd": second, "backlog": 5})
    assert r.errno == "EADDRINUSE" and r.kernel_fn == "inet_csk_bind_conflict"
    assert a.socket(second).sk_state == "CLOSE"


def test_reuseport_same_uid_shares_even_listeners(a):
    """Rule: SO_REUSEPORT on both with the same uid -> shared, listeners included."""
    first, second = tcp(a), tcp(a)
    for fd in (first, second):
        setopt(a, fd, REUSEPORT)
        assert bind(a, fd, ("0.0.0.0", 7000)).ok
        assert a.call("listen", {"fd": fd, "backlog": 5}).ok


def test_reuseport_different_uid_conflicts(a):
    """Rule: SO_REUSEPORT needs the same uid (unless the owner is TIME_WAIT)."""
    first = tcp(a)
    setopt(a, first, REUSEPORT)
    assert bind(a, first, ("0.0.0.0", 7000)).ok
    second = tcp(a, user="student")
    setopt(a, second, REUSEPORT, user="student")
    r = bind(a, second, ("0.0.0.0", 7000), user="student")
    assert r.errno == "EADDRINUSE" and "uids differ" in r.rule


def test_reuseport_on_one_side_only_conflicts(a):
    """Rule: SO_REUSEPORT must be set on both."""
    assert bind(a, tcp(a), ("0.0.0.0", 7000)).ok
    second = tcp(a)
    setopt(a, second, REUSEPORT)
    assert bind(a, second, ("0.0.0.0", 7000)).errno == "EADDRINUSE"


def _time_wait_on(a, b, port, reuse):
    """Server on a:port accepts a connection and closes first, leaving TIME_WAIT on a."""
    lfd = listener(a, port, reuse=reuse)
    cfd = tcp(b)
    assert b.call("connect", {"fd": cfd, "addr": ("198.51.100.1", port)}).ok
    sfd = a.call("accept", {"fd": lfd}).ret
    assert a.call("close", {"fd": sfd}).ok
    assert b.call("close", {"fd": cfd}).ok
    assert a.call("close", {"fd": lfd}).ok


def test_time_wait_blocks_rebind_without_reuseaddr(a, b):
    """Rule: a TIME_WAIT socket still owns the port; without SO_REUSEADDR on both -> EADDRINUSE."""
    _time_wait_on(a, b, 7000, reuse=False)
    assert [o.state for o in a.port_owners(7000)] == ["TIME_WAIT"]
    fd = tcp(a)
    setopt(a, fd, REUSEADDR)
    r = bind(a, fd, ("0.0.0.0", 7000))
    assert r.errno == "EADDRINUSE" and "TIME_WAIT" in str(r)


def test_time_wait_yields_to_reuseaddr_on_both(a, b):
    """Rule: SO_REUSEADDR on the new socket and on the TIME_WAIT one (inherited from the listener) -> shared."""
    _time_wait_on(a, b, 7000, reuse=True)
    fd = tcp(a)
    setopt(a, fd, REUSEADDR)
    assert bind(a, fd, ("0.0.0.0", 7000)).ok
    assert a.call("listen", {"fd": fd, "backlog": 5}).ok


def test_time_wait_expires(a, b, net):
    """Rule: TIME_WAIT lasts TCP_TIMEWAIT_LEN (60 s); afterwards the port is free."""
    _time_wait_on(a, b, 7000, reuse=False)
    net.advance(59)
    assert bind(a, tcp(a), ("0.0.0.0", 7000)).errno == "EADDRINUSE"
    net.advance(2)
    assert bind(a, tcp(a), ("0.0.0.0", 7000)).ok


def test_accepted_children_keep_the_port(a, b):
    """Rule: accepted sockets inherit the listener's bind bucket (__inet_inherit_port)."""
    lfd = listener(a, 7000)
    cfd = tcp(b)
    assert b.call("connect", {"fd": cfd, "addr": ("198.51.100.1", 7000)}).ok
    a.call("accept", {"fd": lfd})
    a.call("close", {"fd": lfd})
    assert bind(a, tcp(a), ("0.0.0.0", 7000)).errno == "EADDRINUSE"


def test_port_zero_picks_odd_port_in_range(a):
    """Rule: inet_csk_find_open_port: ephemeral from ip_local_port_range, odd offsets first for bind()."""
    fd = tcp(a)
    r = bind(a, fd, ("0.0.0.0", 0))
    port = a.socket(fd).local[1]
    assert r.ok and 32768 <= port <= 60999 and port % 2 == 1
    assert "ip_local_port_range" in r.rule


def test_port_zero_with_reuseaddr_prefers_lower_half(a):
    """Rule: inet_csk_find_open_port: SO_REUSEADDR sockets scan the lower half of the range first."""
    for _ in range(20):
        fd = tcp(a)
        setopt(a, fd, REUSEADDR)
        assert bind(a, fd, ("0.0.0.0", 0)).ok
        assert a.socket(fd).local[1] < 32768 + (((61000 - 32768) >> 2) << 1)


def test_port_zero_respects_custom_range_and_exhaustion(net):
    """Rule: a full ip_local_port_range gives EADDRINUSE from bind(port 0)."""
    c = net.add_host("c", addrs=["198.51.100.3"], sysctls={"ip_local_port_range": "40000 40001"})
    ports = set()
    for _ in range(2):
        fd = tcp(c)
        assert bind(c, fd, ("0.0.0.0", 0)).ok
        ports.add(c.socket(fd).local[1])
    assert ports == {40000, 40001}
    assert bind(c, tcp(c), ("0.0.0.0", 0)).errno == "EADDRINUSE"


def test_udp_conflicts_and_reuseaddr(a):
    """Rule: udp_lib_lport_inuse: UDP shares a port when both set SO_REUSEADDR (no listener exception)."""
    first, second, third = udp(a), udp(a), udp(a)
    setopt(a, first, REUSEADDR)
    setopt(a, second, REUSEADDR)
    assert bind(a, first, ("0.0.0.0", 5000)).ok
    assert bind(a, second, ("0.0.0.0", 5000)).ok
    r = bind(a, third, ("0.0.0.0", 5000))
    assert r.errno == "EADDRINUSE" and r.kernel_fn == "udp_lib_lport_inuse"


def test_tcp_and_udp_port_spaces_are_separate(a):
    """TCP and UDP have separate hash tables."""
    assert bind(a, tcp(a), ("0.0.0.0", 7000)).ok
    assert bind(a, udp(a), ("0.0.0.0", 7000)).ok


def test_ipv6_any_conflicts_with_ipv4_unless_v6only(a):
    """Rule: ipv6_rcv_saddr_equal: [::] without IPV6_V6ONLY covers every IPv4 address."""
    fd6 = tcp(a, family=AF_INET6)
    assert bind(a, fd6, ("::", 7000)).ok
    assert bind(a, tcp(a), ("0.0.0.0", 7000)).errno == "EADDRINUSE"
    fd6b = tcp(a, family=AF_INET6)
    setopt(a, fd6b, 26, level=41)
    assert bind(a, fd6b, ("::", 7001)).ok
    assert bind(a, tcp(a), ("0.0.0.0", 7001)).ok


def test_ipv6_checks_double_bind_before_address(a):
    """Rule: __inet6_bind checks the double bind before EADDRNOTAVAIL (order differs from IPv4)."""
    fd = tcp(a, family=AF_INET6)
    assert bind(a, fd, ("::1", 7000)).ok
    assert bind(a, fd, ("2001:db8::99", 7001)).errno == "EINVAL"
    assert bind(a, tcp(a, family=AF_INET6), ("2001:db8::99", 7001)).errno == "EADDRNOTAVAIL"


def test_ipv6_short_addrlen(a):
    """Rule: inet6_bind: addr_len < SIN6_LEN_RFC2133 (24) -> EINVAL."""
    assert bind(a, tcp(a, family=AF_INET6), ("::1", 7000), addrlen=20).errno == "EINVAL"


@pytest.mark.parametrize("addrlen", [-1, 129])
def test_addrlen_outside_sockaddr_storage(a, addrlen):
    """Rule: move_addr_to_kernel: addrlen < 0 or > sizeof(sockaddr_storage) -> EINVAL."""
    assert bind(a, tcp(a), ("0.0.0.0", 7000), addrlen=addrlen).errno == "EINVAL"


def test_port_zero_uses_every_port_odd_first(net):
    """Rule: inet_csk_find_open_port scans odd offsets, then even ones, before giving up."""
    c = net.add_host("c", addrs=["198.51.100.3"], sysctls={"ip_local_port_range": "40000 40004"})
    ports = []
    for _ in range(5):
        fd = tcp(c)
        assert bind(c, fd, ("0.0.0.0", 0)).ok
        ports.append(c.socket(fd).local[1])
    assert sorted(ports[:2]) == [40001, 40003] and sorted(ports) == list(range(40000, 40005))
