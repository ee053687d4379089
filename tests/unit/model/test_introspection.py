"""Teaching API: explanations on every result, readable state, ss/skmem/counter predictions, step runner."""

from harness.model import Network, Result, Step, errno_name, name_of, run_steps
from harness.model.constants import NAMES, resolve

from model_helpers import listener, tcp


def test_every_result_explains_itself(a, b):
    """Each Result carries a rule and the kernel function that decided it, and prints readably."""
    lfd = listener(a, 7000)
    results = [
        a.call("bind", {"fd": tcp(a), "addr": ("0.0.0.0", 7000)}),
        b.call("connect", {"fd": tcp(b), "addr": ("198.51.100.1", 7000)}),
        a.call("accept", {"fd": lfd}),
        a.call("getsockopt", {"fd": lfd, "level": 1, "optname": 7}),
    ]
    for r in results:
        assert isinstance(r, Result) and r.rule and r.kernel_fn
    text = str(results[0])
    assert text.startswith("-1 EADDRINUSE  (port 7000 owned by fd 3")
    assert text.endswith("inet_csk_bind_conflict)")


def test_result_is_frozen(a):
    r = a.call("socket", {"family": 2, "type": 1})
    try:
        r.ret = 5
    except AttributeError:
        pass
    else:
        raise AssertionError("Result must be immutable")
    assert r.errno_num is None and r.ok


def test_socket_view_fields(a, b):
    """host.socket(fd) exposes states, queues, buffers, addresses and zerocopy state."""
    lfd = listener(a, 7000, backlog=3)
    b.call("connect", {"fd": tcp(b), "addr": ("198.51.100.1", 7000)})
    view = a.socket(lfd)
    assert (view.sk_state, view.ss_state, view.ack_backlog, view.max_ack_backlog) == ("LISTEN", "SS_UNCONNECTED", 1, 3)
    assert view.local == ("0.0.0.0", 7000) and view.peer is None
    assert view.zerocopy_pending == () and view.omem == 0 and view.state == "LISTEN"


def test_port_owners(a):
    """host.port_owners() lists who holds a port, with fd, state and reuse flags."""
    lfd = listener(a, 7000, reuse=True)
    [owner] = a.port_owners(7000)
    assert (owner.user, owner.fd, owner.state, owner.reuseaddr) == ("root", lfd, "LISTEN", True)


def test_ss_listener_prediction(a, b):
    """ss -lnt: Recv-Q is sk_ack_backlog, Send-Q is sk_max_ack_backlog."""
    listener(a, 7000, backlog=5)
    for _ in range(3):
        b.call("connect", {"fd": tcp(b), "addr": ("198.51.100.1", 7000)})
    assert a.ss_listener(7000) == (3, 5)
    assert a.ss_listener(7001) is None


def test_default_sysctls_match_bookworm():
    """The defaults equal Debian bookworm 6.1 x86_64 in a 512 MiB VM (measured on 6.1.0-57)."""
    host = Network().add_host("h")
    s = host.sysctls
    assert s["net.core.somaxconn"] == 4096
    assert s["net.core.rmem_max"] == s["net.core.wmem_max"] == 212992
    assert s["net.core.rmem_default"] == s["net.core.wmem_default"] == 212992
    assert s["net.core.optmem_max"] == 20480
    assert s["net.ipv4.tcp_rmem"] == (4096, 131072, 3731168)
    assert s["net.ipv4.tcp_wmem"] == (4096, 16384, 3731168)
    assert s["net.ipv4.tcp_mem"] == (5463, 7287, 10926)
    assert s["net.ipv4.udp_mem"] == (10929, 14574, 21858)
    assert s["net.ipv4.ip_local_port_range"] == (32768, 60999)
    assert s["net.ipv4.ip_unprivileged_port_start"] == 1024
    assert s["net.ipv4.tcp_syncookies"] == 1
    assert s["net.ipv4.tcp_max_syn_backlog"] == 128
    assert s["net.ipv4.ip_nonlocal_bind"] == 0 and s["net.ipv4.tcp_abort_on_overflow"] == 0


def test_constants_and_resolve():
    """The name table carries x86_64 values and resolve() understands OR-ed names."""
    assert NAMES["SO_ZEROCOPY"] == 60 and NAMES["MSG_ZEROCOPY"] == 0x4000000 and NAMES["MSG_ERRQUEUE"] == 0x2000
    assert NAMES["SO_EE_ORIGIN_ZEROCOPY"] == 5 and NAMES["SO_EE_CODE_ZEROCOPY_COPIED"] == 1
    assert NAMES["IP_FREEBIND"] == 15 and NAMES["SO_SNDBUFFORCE"] == 32 and NAMES["SO_RCVBUFFORCE"] == 33
    assert NAMES["SO_REUSEPORT"] == 15 and NAMES["SOCK_NONBLOCK"] == 0o4000 and NAMES["SOCK_CLOEXEC"] == 0o2000000
    assert resolve("SOCK_STREAM|SOCK_NONBLOCK") == 1 | 0o4000
    assert resolve("0x40") == 0x40 and resolve(7) == 7 and resolve("PF_INET") == 2
    assert errno_name(98) == "EADDRINUSE" and name_of(10, "AF_") == "AF_INET6"


def test_step_runner_drives_the_model():
    """The same symbolic step list a real-kernel runner uses drives the model."""
    net = Network()
    net.add_host("srv", addrs=["198.51.100.1"])
    net.add_host("cli", addrs=["198.51.100.2"])
    steps = [
        Step("srv", "socket", {"family": "AF_INET", "type": "SOCK_STREAM"}, save="lfd"),
        Step("srv", "setsockopt", {"fd": "$lfd", "level": "SOL_SOCKET", "optname": "SO_REUSEADDR", "value": 1}),
        Step("srv", "bind", {"fd": "$lfd", "addr": ("0.0.0.0", 7000)}),
        Step("srv", "listen", {"fd": "$lfd", "backlog": 0}),
        {"host": "cli", "op": "socket", "args": {"family": "AF_INET", "type": "SOCK_STREAM|SOCK_NONBLOCK"},
         "save": "c1"},
        Step("cli", "connect", {"fd": "$c1", "addr": ("198.51.100.1", 7000)}),
        Step("cli", "socket", {"family": "AF_INET", "type": "SOCK_STREAM|SOCK_NONBLOCK"}, save="c2"),
        Step("cli", "connect", {"fd": "$c2", "addr": ("198.51.100.1", 7000)}),
        Step("srv", "accept4", {"fd": "$lfd", "flags": "SOCK_CLOEXEC"}),
    ]
    results = run_steps(net, steps)
    assert [r.errno for r in results] == [None, None, None, None, None, "EINPROGRESS", None, "EINPROGRESS", None]
    assert net["srv"].predict_counters()["TcpExt.ListenOverflows"] == 1
