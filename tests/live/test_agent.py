"""The guest agent on real guests: cross-host TCP, MSG_ZEROCOPY completions, an unprivileged user, latency."""

from __future__ import annotations

import threading
import time

import pytest

from harness.guest.client import Agent, AgentDied, AgentHost, measure_latency
from harness.model import Network, Step
from harness.model import run_steps as run_on_model

# One worker runs the module (pytest-xdist, --dist loadgroup): the module's agents start once, not once per worker.
pytestmark = [pytest.mark.vm, pytest.mark.xdist_group("agent")]

SO_ZEROCOPY = 60
SO_EE_ORIGIN_ZEROCOPY = 5
SO_EE_CODE_ZEROCOPY_COPIED = 1


@pytest.fixture(scope="module")
def agents(server, client):
    """A root agent on each VM for the whole module; every test leaves them reset."""
    on_server, on_client = Agent(server, "server").start(), Agent(client, "client").start()
    yield on_server, on_client
    on_server.close()
    on_client.close()


@pytest.fixture
def srv(agents):
    yield agents[0]
    agents[0].reset()


@pytest.fixture
def cli(agents):
    yield agents[1]
    agents[1].reset()


def completions(agent: Agent, fd: int, last_id: int, timeout: float = 10.0) -> list[dict]:
    """Read the error queue until the completion of send id ``last_id`` has come (ranges may merge)."""
    found: list[dict] = []
    deadline = time.monotonic() + timeout
    while not any(note["hi"] >= last_id for note in found) and time.monotonic() < deadline:
        agent.call("poll", fds=[(fd, 0)], timeout_ms=500)  # POLLERR needs no request
        reply = agent.call("recvmsg", fd=fd, length=0, flags="MSG_ERRQUEUE")
        if reply.errno is None:
            assert len(reply.ret) == 1  # one sock_extended_err per recvmsg (sock_dequeue_err_skb)
            found += reply.ret
        else:
            assert reply.errno == "EAGAIN"
    return found


def test_agents_run_the_guest_kernel_as_root(agents):
    for agent in agents:
        assert agent.hello["kernel"].endswith("-cloud-amd64")
        assert agent.hello["uid"] == 0 and int(agent.hello["cap_eff"], 16) != 0


def test_tcp_connect_from_client_to_server_across_the_lab(srv, cli):
    listener = srv.call("socket", family="AF_INET", type="SOCK_STREAM").ret
    srv.call("setsockopt", fd=listener, level="SOL_SOCKET", optname="SO_REUSEADDR", value=1)
    assert srv.call("bind", fd=listener, addr=("198.51.100.2", 7000)).ok
    assert srv.call("listen", fd=listener, backlog=16).ok

    sock = cli.call("socket", family="AF_INET", type="SOCK_STREAM").ret
    connected = cli.call("connect", fd=sock, addr=("198.51.100.2", 7000))
    assert (connected.ret, connected.errno) == (0, None)
    local = cli.call("getsockname", fd=sock).ret
    assert local[0] == "198.51.100.1"
    assert cli.call("getpeername", fd=sock).ret == ("198.51.100.2", 7000)

    accepted = srv.call("accept", fd=listener)
    assert accepted.ret >= 0 and accepted.extra["peer"] == local
    assert cli.call("send", fd=sock, data=b"over the lab").ret == 12
    srv.call("wait_readable", fd=accepted.ret, timeout_ms=5000)
    assert srv.call("recv", fd=accepted.ret, length=64).data == b"over the lab"


def test_non_blocking_connect_across_the_lab_is_einprogress(srv, cli):
    listener = srv.call("socket", family="AF_INET", type="SOCK_STREAM").ret
    srv.call("bind", fd=listener, addr=("198.51.100.2", 0))
    srv.call("listen", fd=listener, backlog=4)
    port = srv.call("getsockname", fd=listener).ret[1]
    sock = cli.call("socket", family="AF_INET", type="SOCK_STREAM|SOCK_NONBLOCK").ret
    assert cli.call("connect", fd=sock, addr=("198.51.100.2", port)).errno == "EINPROGRESS"
    assert cli.call("poll", fds=[(sock, "POLLOUT")], timeout_ms=5000).ret[sock] & 0x4
    assert cli.call("getsockopt", fd=sock, level="SOL_SOCKET", optname="SO_ERROR").ret == 0


def test_zerocopy_on_loopback_completes_as_copied(srv):
    listener = srv.call("socket", family="AF_INET", type="SOCK_STREAM").ret
    srv.call("bind", fd=listener, addr=("127.0.0.1", 0))
    srv.call("listen", fd=listener, backlog=4)
    port = srv.call("getsockname", fd=listener).ret[1]
    sock = srv.call("socket", family="AF_INET", type="SOCK_STREAM").ret
    assert srv.call("setsockopt", fd=sock, level="SOL_SOCKET", optname=SO_ZEROCOPY, value=1).ok
    srv.call("connect", fd=sock, addr=("127.0.0.1", port))
    peer = srv.call("accept", fd=listener).ret
    assert srv.call("send", fd=sock, length=32768, flags="MSG_ZEROCOPY").ret == 32768
    srv.call("recv", fd=peer, length=32768, flags="MSG_WAITALL")
    notes = completions(srv, sock, last_id=0)
    assert notes == [{"origin": SO_EE_ORIGIN_ZEROCOPY, "code": SO_EE_CODE_ZEROCOPY_COPIED, "lo": 0, "hi": 0,
                      "errno": 0}]


def test_zerocopy_across_the_lab_segment_completes_without_a_copy(srv, cli):
    listener = srv.call("socket", family="AF_INET", type="SOCK_STREAM").ret
    srv.call("bind", fd=listener, addr=("198.51.100.2", 0))
    srv.call("listen", fd=listener, backlog=4)
    port = srv.call("getsockname", fd=listener).ret[1]
    sock = cli.call("socket", family="AF_INET", type="SOCK_STREAM").ret
    assert cli.call("setsockopt", fd=sock, level="SOL_SOCKET", optname=SO_ZEROCOPY, value=1).ok
    assert cli.call("connect", fd=sock, addr=("198.51.100.2", port)).ok
    peer = srv.call("accept", fd=listener).ret
    for _ in range(2):
        assert cli.call("send", fd=sock, length=65536, flags="MSG_ZEROCOPY").ret == 65536
        srv.call("recv", fd=peer, length=65536, flags="MSG_WAITALL", block_ms=10000)
    notes = completions(cli, sock, last_id=1)
    assert notes and {note["origin"] for note in notes} == {SO_EE_ORIGIN_ZEROCOPY}
    # virtio-net on a vnet_hdr tap has scatter-gather: the pages went out as they were.
    assert {note["code"] for note in notes} == {0}
    assert notes[0]["lo"] == 0 and notes[-1]["hi"] == 1


def test_student_cannot_bind_port_80_but_root_can(server, srv):
    with Agent(server, "server", user="student") as student:
        assert (student.hello["uid"], student.hello["gid"]) == (1000, 1000)
        assert int(student.hello["cap_eff"], 16) == 0 and int(student.hello["cap_prm"], 16) == 0
        fd = student.call("socket", family="AF_INET", type="SOCK_STREAM").ret
        refused = student.call("bind", fd=fd, addr=("0.0.0.0", 80))
        assert (refused.ret, refused.errno, refused.user) == (-1, "EACCES", "student")
        assert student.call("bind", fd=fd, addr=("0.0.0.0", 8080)).ok
        assert student.call("sysctl_set", name="net.core.somaxconn", value=64).errno in ("EACCES", "EPERM")
    fd = srv.call("socket", family="AF_INET", type="SOCK_STREAM").ret
    assert srv.call("bind", fd=fd, addr=("0.0.0.0", 80)).ok


def test_negative_backlog_means_somaxconn_and_sysctls_come_back_on_reset(server, srv):
    before = int(server.run("cat /proc/sys/net/core/somaxconn", check=True).stdout)
    assert srv.call("sysctl_set", name="net.core.somaxconn", value=64).ok
    assert srv.call("sysctl_get", name="net.core.somaxconn").ret == 64
    fd = srv.call("socket", family="AF_INET", type="SOCK_STREAM").ret
    srv.call("bind", fd=fd, addr=("127.0.0.1", 0))
    assert srv.call("listen", fd=fd, backlog=-1).ok
    port = srv.call("getsockname", fd=fd).ret[1]
    row = server.run(f"ss -ltnH 'sport = :{port}'", check=True).stdout.split()
    assert row[2] == "64"  # Send-Q of a listener is sk_max_ack_backlog
    assert srv.reset().extra["sysctls_restored"] == ["net.core.somaxconn"]
    assert int(server.run("cat /proc/sys/net/core/somaxconn", check=True).stdout) == before


def test_a_blocking_accept_is_reported_as_blocked(srv):
    fd = srv.call("socket", family="AF_INET", type="SOCK_STREAM").ret
    srv.call("bind", fd=fd, addr=("127.0.0.1", 0))
    srv.call("listen", fd=fd, backlog=1)
    reply = srv.call("accept", fd=fd, block_ms=300)
    assert reply.blocked and reply.ret is None and reply.dt_ns >= 270_000_000


def test_an_agent_killed_mid_step_is_reported_with_the_step(server):
    agent = Agent(server, "server").start()
    pid = agent.hello["pid"]
    threading.Timer(1.0, lambda: server.run(f"kill -KILL {pid}")).start()
    with pytest.raises(AgentDied) as caught:
        agent.call("sleep", seconds=30)
    assert "server" in str(caught.value) and "sleep(seconds=30)" in str(caught.value)


def test_one_step_list_interleaves_on_both_guests_and_the_model(server, client):
    steps = [
        Step("server", "socket", {"family": "AF_INET", "type": "SOCK_STREAM"}, save="lfd"),
        # The server closes first at the end, so its side of the last run may sit in TIME_WAIT.
        Step("server", "setsockopt", {"fd": "$lfd", "level": "SOL_SOCKET", "optname": "SO_REUSEADDR", "value": 1}),
        Step("server", "bind", {"fd": "$lfd", "addr": ("198.51.100.2", 7002)}),
        Step("server", "listen", {"fd": "$lfd", "backlog": -1}),
        Step("client", "socket", {"family": "AF_INET", "type": "SOCK_STREAM|SOCK_NONBLOCK"}, user="student",
             save="cfd"),
        Step("client", "connect", {"fd": "$cfd", "addr": ("198.51.100.2", 7002)}, user="student"),
        # fd 3 literally: the model's resolve_args does not look for $names inside lists.
        Step("client", "poll", {"fds": [3], "events": "POLLOUT", "timeout": 5000}, user="student"),
        Step("server", "accept4", {"fd": "$lfd", "flags": "SOCK_NONBLOCK"}, save="afd"),
        Step("server", "accept", {"fd": "$lfd"}, user="student"),
        Step("server", "recv", {"fd": "$afd", "length": 10}),
    ]
    hosts = {"server": AgentHost(server, "server"), "client": AgentHost(client, "client")}
    try:
        real = run_on_model(hosts, steps)  # the same runner as the model's
    finally:
        for host in hosts.values():
            host.close()
    net = Network()
    net.add_host("server", addrs=["198.51.100.2"])
    net.add_host("client", addrs=["198.51.100.1"])
    modelled = run_on_model(net, steps)
    assert [(r.errno, r.blocked) for r in real] == [(m.errno, m.blocked) for m in modelled]
    assert [r.errno for r in real] == [None, None, None, None, None, "EINPROGRESS", None, None, "EBADF", "EAGAIN"]
    assert [r.user for r in real][4:7] == ["student"] * 3 and real[7].extra["peer"][0] == "198.51.100.1"
    # Each reply carries the host's send time, so the trace keeps the scenario's order across VMs.
    assert [r.host_ns for r in real] == sorted(r.host_ns for r in real)


def test_agent_steps_are_much_cheaper_than_ssh_execs(lab, record_property):
    report = measure_latency(lab, "server", n=30, n_ssh_process=5)
    print("\n" + report.table())
    record_property("agent_latency", report.table())
    assert report.agent_step.median_ms <= 20.0  # the budget for one step under TCG
    assert report.agent_step.median_ms < report.paramiko_exec.median_ms < report.ssh_process.median_ms
