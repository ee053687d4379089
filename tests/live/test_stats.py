"""Live: stats snapshots of the lab guests move the way the kernel says they must."""

from __future__ import annotations

import contextlib
import tempfile
import time
from pathlib import Path

import pytest

from harness.model.versions import RULES
from harness.scenario.check import lab_kernels
from harness.stats import collect, collect_many

pytestmark = pytest.mark.vm

# Run in the guest: open sockets as told, print "ready", hold them until killed.
WORKLOAD = r'''
import socket, sys, time
kind, host, port, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
family = socket.AF_INET6 if ":" in host else socket.AF_INET
keep = []
if kind == "listen":                      # count = backlog
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, port)); s.listen(count); keep.append(s)
elif kind == "connect":                   # count = clients, non-blocking
    for _ in range(count):
        c = socket.socket(family, socket.SOCK_STREAM); c.setblocking(False)
        try: c.connect((host, port))
        except BlockingIOError: pass
        keep.append(c)
    time.sleep(1.0)                       # let every handshake that can complete do so
elif kind == "udp-flood":                 # count = datagrams into a 4 KiB receive buffer nobody reads
    r = socket.socket(family, socket.SOCK_DGRAM)
    r.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096); r.bind((host, port)); keep.append(r)
    t = socket.socket(family, socket.SOCK_DGRAM); keep.append(t)
    for _ in range(count): t.sendto(b"x" * 1000, (host, port))
print("ready", flush=True)
time.sleep(300)
'''
SCRIPT = "/tmp/socklab-stats-workload.py"


@pytest.fixture(scope="module")
def workload_script(lab):
    """The workload program, copied to every guest once."""
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as handle:
        handle.write(WORKLOAD)
    try:
        for vm in lab.require().vms:
            lab.ssh(vm.name).put(Path(handle.name), SCRIPT)
    finally:
        Path(handle.name).unlink()
    yield SCRIPT
    for vm in lab.require().vms:
        lab.ssh(vm.name).run(f"rm -f {SCRIPT}")


@contextlib.contextmanager
def running(guest, *args: object, timeout: float = 30.0):
    """Start the workload in its own process group; kill the whole group afterwards, whatever happened."""
    log = f"/tmp/socklab-stats-workload.{time.monotonic_ns()}.log"
    argv = " ".join(str(a) for a in args)
    started = guest.run(f"setsid python3 {SCRIPT} {argv} </dev/null >{log} 2>&1 & echo $!", check=True)
    pid = int(started.stdout.strip())
    try:
        deadline = time.monotonic() + timeout
        while guest.run(f"cat {log}").stdout.strip() != "ready":
            if time.monotonic() > deadline or not guest.run(f"kill -0 {pid}").ok:
                pytest.fail(f"{guest.vm}: workload {argv!r} did not get ready: {guest.run(f'cat {log}').stdout!r}")
            time.sleep(0.2)
        yield pid
    finally:
        # dash's kill takes no "--": "-PID" alone names the process group setsid made.
        guest.run(f"kill -KILL -{pid}; rm -f {log}")
        # Gone, or a zombie init has yet to reap (its sockets are closed either way).
        alive = guest.run(f"for i in $(seq 50); do grep -qv ') Z ' /proc/{pid}/stat 2>/dev/null || exit 1; "
                          "sleep 0.1; done")
        assert not alive.ok, f"{guest.vm}: workload {pid} survived SIGKILL"


def test_listener_with_backlog_2_and_6_clients_on_loopback(server, workload_script):
    port = 47101
    before = collect(server)
    with running(server, "listen", "127.0.0.1", port, 2), running(server, "connect", "127.0.0.1", port, 6):
        after = collect(server)
    listener = after.listener(port)
    # sk_ack_backlog and sk_max_ack_backlog: the queue takes backlog + 1 (sk_acceptq_is_full is ">").
    assert (listener.recv_q, listener.send_q) == (3, 2)
    assert listener.accept_queue_full and listener.tcp.unacked == 3
    delta = after - before
    # Each SYN that found the queue full: LINUX_MIB_LISTENOVERFLOWS, then tcp_listendrop().
    assert delta.counter("TcpExt.ListenOverflows") >= 3
    assert delta.counter("TcpExt.ListenDrops") >= delta.counter("TcpExt.ListenOverflows")
    assert listener.skmem.sk_drops >= 3
    assert delta.counter("Tcp.ActiveOpens") >= 6
    # Three connections wait in the accept queue with no file (inode 0); three clients never got a SYN-ACK.
    queued = after.find(netid="tcp", state="ESTAB", port=port)
    assert len(queued) == 3 and all(s.inode == 0 for s in queued)
    assert len(after.find(netid="tcp", state="SYN-SENT", peer_port=port)) == 3


def test_backlog_across_the_lab_segment_in_one_parallel_snapshot(lab, client, server, workload_script):
    port = 47102
    before = collect_many(lab, ["client", "server"])
    with running(server, "listen", "198.51.100.2", port, 2), running(client, "connect", "198.51.100.2", port, 6):
        after = collect_many(lab, ["client", "server"])
    listener = after["server"].listener(port)
    assert (str(listener.local), listener.recv_q, listener.send_q) == (f"198.51.100.2:{port}", 3, 2)
    clients = after["client"].find(netid="tcp", peer_port=port)
    assert len(clients) == 6 and {s.state for s in clients} <= {"ESTAB", "SYN-SENT"}
    connected = [s for s in clients if s.state == "ESTAB"]
    queued = after["server"].find(netid="tcp", state="ESTAB", port=port)
    half_open = after["server"].find(netid="tcp", state="SYN-RECV", port=port)
    deltas = after - before
    cookies = deltas["server"].counter("TcpExt.SyncookiesSent")
    # Across a real link SYNs overtake handshakes. A SYN that came while the accept queue still had
    # room was answered, with a request socket, or with a SYN cookie once backlog 2 requests were
    # pending (inet_csk_reqsk_queue_is_full, tcp_syncookies=1). When its ACK then met the full queue,
    # the ACK was dropped (tcp_abort_on_overflow=0): the client is ESTAB while the server holds a
    # SYN-RECV request or, for a cookie, nothing. Every other client keeps retrying its SYN.
    assert len(queued) == 3 and len(queued) <= len(connected) <= len(queued) + len(half_open) + cookies
    assert all(s.skmem is None and s.inode == 0 for s in half_open)
    assert deltas["server"].counter("TcpExt.ListenOverflows") >= 3
    # The handshakes crossed lab0: the server's virtio queue received, the client's sent. Kernels whose
    # ethtool -S no longer counts packets (a version rule): the client opened its six connections to
    # the other VM, and the server took the three the queue holds.
    kernels = lab_kernels(lab)
    if RULES["virtio_net_ethtool_queue_packets"].value(kernels["server"]):
        assert deltas["server"].nic("lab0")["rx_queue_0_packets"] >= 9
    else:
        assert deltas["server"].counter("Tcp.PassiveOpens") >= 3
    if RULES["virtio_net_ethtool_queue_packets"].value(kernels["client"]):
        assert deltas["client"].nic("lab0")["tx_queue_0_packets"] >= 9
    else:
        assert deltas["client"].counter("Tcp.ActiveOpens") >= 6
    assert after.elapsed_ms > 0


def test_udp_queue_in_truesize_and_drops_past_rcvbuf(server, workload_script):
    port = 47103
    before = collect(server)
    with running(server, "udp-flood", "127.0.0.1", port, 40):
        after = collect(server)
    (receiver,) = after.find(netid="udp", port=port)
    # Recv-Q of UDP is sk_rmem_alloc (udp_rqueue_get): skb truesize, more than the 1000 payload bytes.
    assert receiver.recv_q == receiver.skmem.sk_rmem_alloc > 1000
    assert receiver.skmem.sk_rcvbuf == 8192  # SO_RCVBUF 4096, doubled by the kernel
    # __udp_enqueue_schedule_skb() refuses once sk_rmem_alloc passes sk_rcvbuf.
    assert receiver.skmem.sk_drops > 0
    assert (after - before).counter("Udp.RcvbufErrors") >= receiver.skmem.sk_drops


def test_lab_nic_features_and_sysctls(lab, client, server):
    snaps = collect_many(lab, ["client", "server"])
    for snap in snaps.values():
        lab0 = snap.nic("lab0")
        # tap with vnet_hdr: scatter-gather and checksum offload on, and changeable.
        assert lab0.features["scatter-gather"].enabled and not lab0.features["scatter-gather"].fixed
        assert lab0.features["tx-checksumming"].enabled
        assert len(lab0.rx_queues) == len(lab0.tx_queues) >= 1
        assert snap.sysctls.somaxconn >= 128 and snap.sysctls.tcp_rmem.min <= snap.sysctls.tcp_rmem.default
        assert snap.listener(22, address="0.0.0.0").send_q == min(128, snap.sysctls.somaxconn)  # sshd's backlog
        assert snap.sockets and snap.counters and not snap.nic("lo").counters_collected


def test_one_shot_session_and_kept_open_shell_agree(server):
    kept = collect(server)
    fresh = collect(server, reuse_shell=False)
    assert fresh.boot_id == kept.boot_id and fresh.sysctls == kept.sysctls
    assert {s.local.port for s in fresh.listeners()} == {s.local.port for s in kept.listeners()}
