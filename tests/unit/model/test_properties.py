"""Hypothesis invariants: no conflicting port owners, accept queue <= backlog + 1, completion ranges sane."""

from __future__ import annotations

import pytest

pytest.importorskip("hypothesis")

from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from harness.model import Network, ZEROCOPY_DEFERRED, ZEROCOPY_IMMEDIATE  # noqa: E402
from harness.model.constants import MSG_ERRQUEUE, MSG_ZEROCOPY, SOCK_NONBLOCK, TCP_LISTEN  # noqa: E402
from harness.model.ports import rcv_saddr_equal  # noqa: E402
from harness.model.sock import Sock  # noqa: E402

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

socket_spec = st.tuples(
    st.sampled_from(["root", "student"]),  # user
    st.booleans(),  # SO_REUSEADDR
    st.booleans(),  # SO_REUSEPORT
    st.sampled_from([("0.0.0.0", 2), ("127.0.0.1", 2), ("::", 10), ("::1", 10), ("::ffff:127.0.0.1", 10)]),
    st.sampled_from([7000, 7000, 7000, 0]),
)
# each step moves one socket to its next lifecycle stage: bind, then listen, then close
actions = st.lists(st.integers(0, 3), min_size=6, max_size=12)
LIFECYCLE = ("bind", "listen", "close")


def _pair_allowed(x: Sock, y: Sock, udp: bool) -> bool:
    if x.reuseport and y.reuseport and x.uid == y.uid:
        return True
    if udp:
        return x.reuse and y.reuse
    return x.reuse and y.reuse and not (x.sk_state == TCP_LISTEN and y.sk_state == TCP_LISTEN)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(["tcp", "udp"]), st.lists(socket_spec, min_size=2, max_size=3), actions)
def test_no_two_conflicting_owners_of_a_port(proto, specs, steps):
    """Invariant: any two live owners of a port with overlapping addresses are allowed to share it
    (both SO_REUSEADDR and not both listening, or both SO_REUSEPORT with one uid; UDP: no listen rule)."""
    net = Network(strict=True)
    host = net.add_host("h", addrs=["198.51.100.1", "2001:db8::1"])
    fds: list[tuple[str, int]] = []
    for user, reuse, reuseport, (_addr, family), _port in specs:
        fd = host.call("socket", {"family": family, "type": 1 if proto == "tcp" else 2}, user=user).ret
        for optname, on in ((2, reuse), (15, reuseport)):
            if on:
                assert host.call("setsockopt", {"fd": fd, "level": 1, "optname": optname, "value": 1}, user=user).ok
        fds.append((user, fd))
    stage = [0] * len(specs)
    for index in steps:
        slot = index % len(specs)
        if stage[slot] >= len(LIFECYCLE):
            continue
        action = LIFECYCLE[stage[slot]]
        stage[slot] += 1
        user, fd = fds[slot]
        addr, port = specs[slot][3][0], specs[slot][4]
        if action == "bind":
            host.call("bind", {"fd": fd, "addr": (addr, port)}, user=user)
        elif action == "listen":
            host.call("listen", {"fd": fd, "backlog": 1}, user=user)
        else:
            host.call("close", {"fd": fd}, user=user)
        for table in (host.tcp_ports, host.udp_ports):
            for bucket_port, owners in table.buckets.items():
                live = [o for o in owners if isinstance(o, Sock)]
                for i, x in enumerate(live):
                    for y in live[i + 1:]:
                        # inet_rcv_saddr_equal() is asymmetric for a v6 unicast vs a v4 wildcard
                        # (the v6 socket's sk_rcv_saddr is 127.0.0.6): only judge pairs overlapping both ways
                        if rcv_saddr_equal(x, y) and rcv_saddr_equal(y, x):
                            assert _pair_allowed(x, y, table.udp), (bucket_port, x, y)


queue_ops = st.lists(st.one_of(
    st.tuples(st.just("connect"), st.sampled_from(["127.0.0.1", "198.51.100.1"])),
    st.tuples(st.just("accept"), st.just(0)),
    st.tuples(st.just("advance"), st.floats(0.1, 20)),
    st.tuples(st.just("close_client"), st.integers(0, 30)),
), max_size=50)


@SETTINGS
@given(st.integers(-1, 5), st.booleans(), queue_ops)
def test_accept_queue_never_exceeds_backlog_plus_one(backlog, remote, ops):
    """Invariant: sk_ack_backlog <= sk_max_ack_backlog + 1 after every step."""
    net = Network(strict=True)
    srv = net.add_host("srv", addrs=["198.51.100.1"], sysctls={"somaxconn": 4})
    cli = net.add_host("cli", addrs=["198.51.100.2"]) if remote else srv
    lfd = srv.call("socket", {"family": 2, "type": 1 | SOCK_NONBLOCK}).ret
    srv.call("bind", {"fd": lfd, "addr": ("0.0.0.0", 7000)})
    assert srv.call("listen", {"fd": lfd, "backlog": backlog}).ok
    limit = srv.socket(lfd).max_ack_backlog + 1
    clients: list[int] = []
    for op, arg in ops:
        if op == "connect":
            fd = cli.call("socket", {"family": 2, "type": 1 | SOCK_NONBLOCK}).ret
            cli.call("connect", {"fd": fd, "addr": ("198.51.100.1" if remote else arg, 7000)})
            clients.append(fd)
        elif op == "accept":
            srv.call("accept", {"fd": lfd})
        elif op == "advance":
            net.advance(arg)
        elif clients:
            cli.call("close", {"fd": clients.pop(arg % len(clients))})
        assert srv.socket(lfd).ack_backlog <= limit
        assert srv.ss_listener(7000)[0] <= limit


zc_ops = st.lists(st.one_of(
    st.tuples(st.just("send"), st.sampled_from(["127.0.0.1", "198.51.100.2"]), st.integers(0, 3000)),
    st.tuples(st.just("read"), st.just(None), st.just(0)),
    st.tuples(st.just("complete"), st.sampled_from(["fifo", "reverse"]), st.just(0)),
), max_size=60)


@SETTINGS
@given(st.sampled_from([ZEROCOPY_IMMEDIATE, ZEROCOPY_DEFERRED]), zc_ops)
def test_completion_ranges_disjoint_and_increasing(mode, ops):
    """Invariant: notifications cover exactly the successful sends' ids, never overlap, and (in-order
    completion) arrive with increasing ranges; ENOBUFS sends consume no id."""
    net = Network(strict=True, zerocopy=mode)
    host = net.add_host("h", addrs=["198.51.100.1"])
    net.add_host("p", addrs=["198.51.100.2"])
    fd = host.call("socket", {"family": 2, "type": 2}).ret
    assert host.call("setsockopt", {"fd": fd, "level": 1, "optname": 60, "value": 1}).ok
    sent = 0
    seen: list[tuple[int, int]] = []
    in_order = True
    for op, arg, size in ops:
        if op == "send":
            r = host.call("sendto", {"fd": fd, "length": size, "flags": MSG_ZEROCOPY, "addr": (arg, 9)})
            if r.ok:
                sent += 1
            else:
                assert r.errno == "ENOBUFS"
            assert host.socket(fd).zerocopy_next_id == sent
        elif op == "read":
            r = host.call("recvmsg", {"fd": fd, "flags": MSG_ERRQUEUE})
            if r.ok:
                [note] = r.ret
                seen.append((note["lo"], note["hi"]))
        else:
            in_order &= arg == "fifo" or not host.socket(fd).zerocopy_inflight
            net.complete_zerocopy(arg)
        assert host.socket(fd).omem <= host.sysctls["net.core.optmem_max"] + 768
    net.complete_zerocopy()
    while True:
        r = host.call("recvmsg", {"fd": fd, "flags": MSG_ERRQUEUE})
        if not r.ok:
            break
        seen.append((r.ret[0]["lo"], r.ret[0]["hi"]))
    covered = sorted(i for lo, hi in seen for i in range(lo, hi + 1))
    assert covered == list(range(sent))
    if in_order:
        assert all(prev[1] < cur[0] for prev, cur in zip(seen, seen[1:]))
    assert host.socket(fd).omem == 0
