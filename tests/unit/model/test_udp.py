"""UDP data path: delivery, EDESTADDRREQ, EMSGSIZE, NoPorts/ECONNREFUSED, rcvbuf drops."""

from harness.model.constants import AF_INET6, AF_UNSPEC, MSG_OOB, MSG_TRUNC

from model_helpers import udp


def bound_udp(host, addr, port):
    fd = udp(host)
    assert host.call("bind", {"fd": fd, "addr": (addr, port)}).ok
    return fd


def test_datagram_round_trip_between_hosts(a, b):
    """A datagram reaches the socket bound to the destination port; the source is reported."""
    rfd = bound_udp(a, "0.0.0.0", 5000)
    sfd = udp(b)
    assert b.call("sendto", {"fd": sfd, "data": b"ping", "addr": ("198.51.100.1", 5000)}).ret == 4
    r = a.call("recvfrom", {"fd": rfd, "length": 100})
    assert r.data == b"ping" and r.ret == 4
    assert a.predict_counters()["Udp.InDatagrams"] == 1


def test_unconnected_send_without_destination(a):
    """Rule: udp_sendmsg: no destination and not connected -> EDESTADDRREQ."""
    assert a.call("send", {"fd": udp(a), "data": b"x"}).errno == "EDESTADDRREQ"


def test_oversized_datagram(a):
    """Rule: ip_append_data: more than 65507 bytes of IPv4 payload -> EMSGSIZE."""
    fd = udp(a)
    assert a.call("sendto", {"fd": fd, "length": 65508, "addr": ("127.0.0.1", 9)}).errno == "EMSGSIZE"
    assert a.call("sendto", {"fd": fd, "length": 65507, "addr": ("127.0.0.1", 9)}).ok


def test_port_unreachable_reaches_connected_socket(a):
    """Rule: __udp4_lib_err: ICMP port unreachable sets ECONNREFUSED on a connected socket only."""
    fd = udp(a)
    a.call("connect", {"fd": fd, "addr": ("127.0.0.1", 9)})
    assert a.call("send", {"fd": fd, "data": b"x"}).ok
    assert a.call("recv", {"fd": fd, "flags": 0x40}).errno == "ECONNREFUSED"
    assert a.predict_counters()["Udp.NoPorts"] == 1
    free = udp(a)
    a.call("sendto", {"fd": free, "data": b"x", "addr": ("127.0.0.1", 9)})
    assert a.call("recv", {"fd": free, "flags": 0x40}).errno == "EAGAIN"


def test_truncation(a):
    """Short reads truncate a datagram; MSG_TRUNC returns the real length."""
    rfd = bound_udp(a, "127.0.0.1", 5000)
    a.call("sendto", {"fd": udp(a), "data": b"abcdef", "addr": ("127.0.0.1", 5000)})
    a.call("sendto", {"fd": udp(a), "data": b"abcdef", "addr": ("127.0.0.1", 5000)})
    assert a.call("recv", {"fd": rfd, "length": 2}).data == b"ab"
    assert a.call("recv", {"fd": rfd, "length": 2, "flags": MSG_TRUNC}).ret == 6


def test_rcvbuf_overflow_drops(a):
    """Rule: __udp_enqueue_schedule_skb drops once sk_rmem_alloc exceeds sk_rcvbuf (RcvbufErrors)."""
    rfd = bound_udp(a, "127.0.0.1", 5000)
    a.call("setsockopt", {"fd": rfd, "level": 1, "optname": 8, "value": 1})  # rcvbuf -> 2304
    sender = udp(a)
    for _ in range(5):
        a.call("sendto", {"fd": sender, "length": 100, "addr": ("127.0.0.1", 5000)})
    assert a.socket(rfd).drops >= 1
    assert a.predict_counters()["Udp.RcvbufErrors"] >= 1


def test_exact_address_beats_wildcard(a):
    """Rule: compute_score prefers a socket bound to the exact address."""
    wild = udp(a)
    a.call("setsockopt", {"fd": wild, "level": 1, "optname": 2, "value": 1})
    a.call("bind", {"fd": wild, "addr": ("0.0.0.0", 5000)})
    exact = udp(a)
    a.call("setsockopt", {"fd": exact, "level": 1, "optname": 2, "value": 1})
    a.call("bind", {"fd": exact, "addr": ("127.0.0.1", 5000)})
    a.call("sendto", {"fd": udp(a), "data": b"x", "addr": ("127.0.0.1", 5000)})
    assert a.call("recv", {"fd": exact, "flags": 0x40}).ok
    assert a.call("recv", {"fd": wild, "flags": 0x40}).errno == "EAGAIN"


def test_broadcast_needs_so_broadcast(a):
    """Rule: udp_sendmsg: a broadcast route without SO_BROADCAST -> EACCES."""
    fd = udp(a)
    assert a.call("sendto", {"fd": fd, "data": b"x", "addr": ("255.255.255.255", 9)}).errno == "EACCES"
    assert a.call("setsockopt", {"fd": fd, "level": 1, "optname": 6, "value": 1}).ok
    assert a.call("sendto", {"fd": fd, "data": b"x", "addr": ("255.255.255.255", 9)}).ok


def test_zerocopy_enobufs_counts_sndbuf_errors():
    """Rule: udp_sendmsg counts an ENOBUFS failure in Udp.SndbufErrors."""
    from harness.model import Network, ZEROCOPY_DEFERRED

    net = Network(strict=True, zerocopy=ZEROCOPY_DEFERRED)
    host = net.add_host("h", addrs=["198.51.100.1"], sysctls={"optmem_max": 600})
    fd = udp(host)
    host.call("setsockopt", {"fd": fd, "level": 1, "optname": 60, "value": 1})
    assert host.call("sendto", {"fd": fd, "length": 1, "flags": 0x4000000, "addr": ("127.0.0.1", 9)}).ok
    assert host.call("sendto", {"fd": fd, "length": 1, "flags": 0x4000000, "addr": ("127.0.0.1", 9)}).errno == "ENOBUFS"
    assert host.predict_counters()["Udp.SndbufErrors"] == 1


def test_udpv6_native_path_takes_msg_oob(a):
    """Rule: udpv6_sendmsg has no MSG_OOB test; only udp_sendmsg (the v4-mapped path) refuses it."""
    fd = udp(a, family=AF_INET6)
    assert a.call("connect", {"fd": fd, "addr": ("::", 21924)}).ok  # "::" is ::1
    assert a.call("send", {"fd": fd, "length": 1, "flags": MSG_OOB}).ret == 1
    mapped = udp(a, family=AF_INET6)
    refused = a.call("sendto", {"fd": mapped, "length": 1, "flags": MSG_OOB, "addr": ("::ffff:127.0.0.1", 0)})
    assert (refused.errno, refused.kernel_fn) == ("EOPNOTSUPP", "udp_sendmsg")  # before udp_sendmsg reads port 0


def test_udpv6_ipv6_only_comes_before_the_mapped_port_check(a):
    """Rule: udpv6_sendmsg: __ipv6_only_sock() -> ENETUNREACH before udp_sendmsg sees port 0 (EINVAL)."""
    fd = udp(a, family=AF_INET6)
    assert a.call("bind", {"fd": fd, "addr": ("::1", 0)}).ok  # a specific IPv6 address: IPv6-only
    assert a.call("sendto", {"fd": fd, "length": 0, "addr": ("::ffff:198.51.100.2", 0)}).errno == "ENETUNREACH"
    assert a.call("sendto", {"fd": fd, "length": 0, "addr": ("::1", 0)}).errno == "EINVAL"


def test_udpv6_af_unspec_name_routes_a_mapped_peer_as_ipv6(a):
    """Rule: udpv6_sendmsg: an AF_UNSPEC name skips the v4-mapped hand-off; ip6_dst_lookup_tail has no route."""
    fd = udp(a, family=AF_INET6)
    assert a.call("connect", {"fd": fd, "addr": ("::ffff:127.0.0.1", 24686)}).ok
    assert a.call("send", {"fd": fd, "length": 1}).ok  # without a name: the IPv4 path
    unspec = a.call("sendto", {"fd": fd, "length": 10, "addr": ("::", 24684), "family": AF_UNSPEC})
    assert (unspec.errno, unspec.kernel_fn) == ("ENETUNREACH", "ip6_dst_lookup_tail")


def test_udpv6_any_from_a_mapped_source_is_the_mapped_loopback(a):
    """Rule: udpv6_sendmsg: "::" from a v4-mapped np->saddr becomes ::ffff:127.0.0.1, sent by udp_sendmsg."""
    rfd = bound_udp(a, "127.0.0.1", 5001)
    fd = udp(a, family=AF_INET6)
    assert a.call("bind", {"fd": fd, "addr": ("::ffff:127.0.0.1", 0)}).ok
    assert a.call("sendto", {"fd": fd, "data": b"hi", "addr": ("::", 5001)}).ret == 2
    assert a.call("recv", {"fd": rfd, "length": 10}).data == b"hi"
    # toward ::1 the IPv6 route exists, then ip6_dst_lookup_tail refuses the v4-mapped source
    native = a.call("sendto", {"fd": fd, "data": b"hi", "addr": ("::1", 5001)})
    assert (native.errno, native.kernel_fn) == ("EAFNOSUPPORT", "ip6_dst_lookup_tail")
