"""ss parser on output recorded from the lab guest (kernel 6.1.0-56-cloud-amd64, iproute2 6.1)."""

from __future__ import annotations

import pytest

from harness.stats import Origin, StatsFormatError, StatsTruncatedError
from harness.stats.ss import parse_ss

from .helpers import fixture, line_of

ORIGIN = Origin("server", "ss -tuxanmieHO")


@pytest.fixture(scope="module")
def mixed():
    return parse_ss(fixture("ss-mixed.txt"), ORIGIN)


def by_local(sockets, text, state=None):
    matches = [s for s in sockets if str(s.local) == text and state in (None, s.state)]
    assert len(matches) == 1, [str(s.local) for s in sockets]
    return matches[0]


# -- real output --------------------------------------------------------------


def test_every_line_of_the_mixed_workload_is_a_socket(mixed):
    assert len(mixed) == len(fixture("ss-mixed.txt").splitlines()) == 41
    assert {s.netid for s in mixed} == {"tcp", "udp", "u_str", "u_dgr", "u_seq"}


def test_ipv4_listener_with_full_queue_shows_backlog_plus_one(mixed):
    # listen(2) and six clients: sk_acceptq_is_full() is "> backlog", so three wait.
    listener = by_local(mixed, "127.0.0.1:5001", "LISTEN")
    assert (listener.state, listener.recv_q, listener.send_q) == ("LISTEN", 3, 2)
    assert listener.accept_queue == 3 and listener.backlog == 2 and listener.accept_queue_full
    assert listener.tcp.unacked == 3          # tcp_get_info() reports sk_ack_backlog there too
    assert listener.skmem.sk_drops == 12      # refused handshakes are charged to the listener
    assert listener.family == "inet" and listener.v6only is None


def test_ipv6_listener_with_full_queue(mixed):
    listener = by_local(mixed, "[::1]:5002", "LISTEN")
    assert (listener.recv_q, listener.send_q, listener.family, listener.v6only) == (2, 1, "inet6", True)
    assert listener.local.address == "::1" and listener.peer.address == "::" and listener.peer.port is None


def test_dual_stack_wildcard_is_printed_as_star(mixed):
    dual = by_local(mixed, "*:5003")
    assert dual.v6only is False and dual.family == "inet6"
    only6 = by_local(mixed, "[::]:5004")
    assert only6.v6only is True


def test_connections_still_in_the_accept_queue_have_inode_zero(mixed):
    queued = [s for s in mixed if s.netid == "tcp" and s.state == "ESTAB" and s.local.port == 5001]
    assert len(queued) == 3 and all(s.inode == 0 for s in queued)
    assert len({s.cookie for s in queued}) == 3  # the sk: cookie still tells them apart


def test_clients_beyond_the_queue_are_stuck_in_syn_sent(mixed):
    syn_sent = [s for s in mixed if s.state == "SYN-SENT" and s.peer.port == 5001]
    assert len(syn_sent) == 3
    for sock in syn_sent:
        assert sock.send_q == 1 and sock.tcp.cwnd == 1 and sock.tcp.retrans_total >= 1
        assert sock.timer.startswith("(on,")


def test_established_tcp_info(mixed):
    receiver = by_local(mixed, "[::1]:5005", "ESTAB")  # the accepted side, 3000 bytes unread
    assert receiver.recv_q == 3000
    tcp = receiver.tcp
    assert tcp.congestion == "cubic"
    assert tcp.bytes_received == 3000 and tcp.rtt_ms > 0 and tcp.rttvar_ms > 0 and tcp.cwnd == 10
    assert {"ts", "sack", "app_limited"} <= tcp.flags and tcp.app_limited
    assert tcp.fields["wscale"] == "6,6" and tcp.send_bps > 0 and tcp.pacing_rate_bps > 0
    assert receiver.skmem.sk_rmem_alloc > 3000  # truesize, not payload


def test_sshd_session_has_keepalive_timer_and_byte_counts(mixed):
    session = [s for s in mixed if s.local.port == 22 and s.state == "ESTAB"][0]
    assert session.timer.startswith("(keepalive,")
    assert session.tcp.bytes_sent > 0 and session.tcp.bytes_acked > 0 and session.tcp.bytes_received > 0
    assert session.tcp.delivery_rate_bps > 0 and session.tcp.min_rtt_ms > 0


def test_time_wait_mini_sockets_have_no_skmem(mixed):
    time_wait = [s for s in mixed if s.state == "TIME-WAIT"]
    assert len(time_wait) == 2
    for sock in time_wait:
        assert sock.skmem is None and sock.tcp is None and sock.inode == 0 and sock.cookie is not None
        assert sock.timer.startswith("(timewait,")


def test_an_orphans_fin_wait_2_is_a_timewait_mini_socket_and_a_full_one_still_needs_skmem():
    text = fixture("ss-finwait2-client.txt")
    [orphan] = [s for s in parse_ss(text, ORIGIN) if s.peer.port == 7999]
    assert orphan.state == "FIN-WAIT-2" and orphan.timer.startswith("(timewait,")
    assert orphan.skmem is None and orphan.tcp is None and orphan.inode == 0
    # The same line with another timer is a full socket whose skmem was cut off.
    full = line_of(text, ":7999").replace("timer:(timewait,", "timer:(on,")
    with pytest.raises(StatsTruncatedError, match="no skmem"):
        parse_ss(full + "\n", ORIGIN)


def test_udp_sockets(mixed):
    bound = by_local(mixed, "127.0.0.1:6001")
    assert bound.state == "UNCONN" and bound.recv_q == 1280  # udp_rqueue_get(): truesize of one 500-byte datagram
    assert bound.skmem.sk_rmem_alloc == 1280 and bound.tcp is None
    connected = [s for s in mixed if s.netid == "udp" and s.state == "ESTAB"][0]
    assert connected.peer.port == 6001
    assert by_local(mixed, "[::1]:6002").v6only is True


def test_unix_listener_lists_pending_connections(mixed):
    listener = [s for s in mixed if s.netid == "u_str" and s.state == "LISTEN"][0]
    assert listener.local.address == "/tmp/socklab-stats.sock"
    assert (listener.recv_q, listener.send_q) == (2, 1)
    assert len(listener.pending) == 2 and listener.vfs_inode and listener.vfs_dev
    assert listener.inode == listener.local.port and listener.uid is None and listener.cookie is None
    pending = [s for s in mixed if s.inode in listener.pending]
    assert len(pending) == 2 and all(s.state == "ESTAB" for s in pending)


def test_unix_queues_and_shutdown_arrows(mixed):
    unix = [s for s in mixed if s.family == "unix"]
    abstract = [s for s in unix if s.local.address.startswith("@")][0]
    assert abstract.local.address == "@socklab-abstract" and abstract.recv_q == 700  # first datagram's length
    seqpacket = [s for s in unix if s.netid == "u_seq"]
    assert sorted(s.recv_q for s in seqpacket) == [0, 1234]
    reader = [s for s in unix if s.shutdown == "<--"][0]   # shut its write side
    writer = [s for s in unix if s.shutdown == "-->"][0]   # its peer sees the read side shut
    assert reader.recv_q == 5000 and writer.peer.port == reader.inode
    # AF_UNIX charges queued bytes to the sender: sk_wmem_alloc, shown as its Send-Q.
    assert writer.send_q == writer.skmem.sk_wmem_alloc > 5000


def test_large_skmem_values(tmp_path):
    sockets = parse_ss(fixture("ss-bigmem.txt"), ORIGIN)
    forced = by_local(sockets, "127.0.0.1:6101")
    assert forced.skmem.sk_rcvbuf == 2147483646  # SO_RCVBUFFORCE 1 GiB, doubled and capped at INT_MAX
    assert forced.skmem.sk_rmem_alloc == forced.recv_q > 6_000_000
    dropping = by_local(sockets, "127.0.0.1:6102")
    assert dropping.skmem.sk_drops > 0 and dropping.skmem.sk_rcvbuf == 8192
    sender = [s for s in sockets if s.peer.port == 5101][0]
    assert sender.skmem.sk_wmem_queued > 2_000_000 and sender.send_q > 2_000_000
    assert sender.timer.startswith("(persist,")  # zero window: the receiver never reads


def test_empty_table():
    assert parse_ss(fixture("ss-empty.txt"), ORIGIN) == ()
    assert parse_ss("", ORIGIN) == ()


def test_backlog_across_the_lab_segment():
    server = parse_ss(fixture("ss-backlog-server.txt"), Origin("server", "ss"))
    listener = [s for s in server if s.state == "LISTEN" and s.local.port == 5201][0]
    assert (str(listener.local), listener.recv_q, listener.send_q) == ("198.51.100.2:5201", 3, 2)
    client = parse_ss(fixture("ss-backlog-client.txt"), Origin("client", "ss"))
    to_server = [s for s in client if s.peer.address == "198.51.100.2" and s.peer.port == 5201]
    assert sorted(s.state for s in to_server) == ["ESTAB"] * 3 + ["SYN-SENT"] * 3


def test_syn_recv_request_socket_is_a_mini_socket():
    # Recorded while an ACK had met the full queue: the server keeps the request, the client is ESTAB.
    sockets = parse_ss(fixture("ss-backlog-server-synrecv.txt"), ORIGIN)
    (request,) = [s for s in sockets if s.state == "SYN-RECV"]
    assert request.local.port == 47102 and request.skmem is None and request.tcp is None and request.inode == 0
    assert request.timer.startswith("(on,") and request.cookie is not None
    listener = [s for s in sockets if s.state == "LISTEN" and s.local.port == 47102][0]
    assert (listener.recv_q, listener.send_q) == (3, 2)


def test_equal_sockets_compare_equal_and_hash():
    first = parse_ss(fixture("ss-mixed.txt"), ORIGIN)
    second = parse_ss(fixture("ss-mixed.txt"), ORIGIN)
    assert first == second and len(set(first)) == len(first)


# -- bad input ----------------------------------------------------------------

LISTENER = line_of(fixture("ss-mixed.txt"), "127.0.0.1:5001 ")
ESTAB = line_of(fixture("ss-mixed.txt"), "10.0.2.15:22")
UNIX = line_of(fixture("ss-mixed.txt"), "/tmp/socklab-stats.sock")


@pytest.mark.parametrize("cut_after", ["tcp", "LISTEN", "127.0.0.1:5001", "0.0.0.0:*", "ino:", "skmem:(r0,rb131072",
                                       "cubic"])
def test_truncated_tcp_line_is_refused_with_vm_command_and_line(cut_after):
    line = LISTENER[:LISTENER.index(cut_after) + len(cut_after)]
    with pytest.raises(StatsTruncatedError) as caught:
        parse_ss(fixture("ss-mixed.txt").replace(LISTENER, line), ORIGIN)
    message = str(caught.value)
    assert message.startswith("server: `ss -tuxanmieHO` printed an unexpected line ")
    assert "truncated" in message and repr(line)[:60] in message
    assert caught.value.line == line


@pytest.mark.parametrize("cut_after", ["rtt:0.", "rtt:0.862/", "bytes_sent:", "pacing_rate"])
def test_truncated_tcp_info_is_refused(cut_after):
    line = ESTAB[:ESTAB.index(cut_after) + len(cut_after)]
    with pytest.raises(StatsFormatError, match="line 1"):
        parse_ss(line + "\n", ORIGIN)


@pytest.mark.parametrize("cut_after", ["/tmp/socklab-stats.sock", "skmem:(r0,rb212992,t0", "<->"])
def test_truncated_unix_line_is_refused(cut_after):
    line = UNIX[:UNIX.index(cut_after) + len(cut_after)]
    if cut_after == "<->":
        # Cut after the arrows: skmem is there, the listener's ino/dev/peers are not. Nothing marks that
        # as missing, so the line parses: the collector's newline check is what catches such a cut.
        assert parse_ss(line + "\n", ORIGIN)[0].pending == ()
        return
    with pytest.raises(StatsTruncatedError):
        parse_ss(line + "\n", ORIGIN)


@pytest.mark.parametrize("text, problem", [
    ("Netid State Recv-Q Send-Q Local Address:Port Peer Address:Port Process\n", "header line"),
    ("tcp ESTAB 0 0 1.2.3.4:5 6.7.8.9:10 ino:1 sk:1\n\t skmem:(r0,rb1,t0,tb1,f0,w0,o0,bl0,d0)\n", "continuation"),
    ("raw UNCONN 0 0 0.0.0.0:1 0.0.0.0:* ino:1 sk:1\n", "unknown netid"),
    ("tcp LISTENING 0 0 0.0.0.0:1 0.0.0.0:* ino:1 sk:1\n", "unknown state"),
    ("tcp LISTEN x 0 0.0.0.0:1 0.0.0.0:* ino:1 sk:1\n", "Recv-Q 'x' is not a number"),
    ("tcp LISTEN 0 0 300.0.0.1:1 0.0.0.0:* ino:1 sk:1\n", "not an IPv4 address"),
    ("tcp LISTEN 0 0 0.0.0.0:1 0.0.0.0:* ino:1 sk:1 mem:(r0,w0,f0,t0)\n", "unexpected field"),
    ("tcp LISTEN 0 0 0.0.0.0:1 0.0.0.0:* ino:1 sk:1 skmem:(r0,rb1,t0,tb1,f0,w0,o0) cubic cwnd:10\n", "expected r,rb"),
    ("udp UNCONN 0 0 0.0.0.0:1 0.0.0.0:* ino:1 sk:1 skmem:(r0,rb1,t0,tb1,f0,w0,o0,bl0,d0) cubic\n", "unexpected fields"),
    ("tcp ESTAB 0 0 1.2.3.4:5 6.7.8.9:10 ino:1 sk:1 skmem:(r0,rb1,t0,tb1,f0,w0,o0,bl0,d0) cwnd:x\n", "not a number"),
    ("\n", "blank line"),
])
def test_unexpected_format_is_refused(text, problem):
    with pytest.raises(StatsFormatError, match=problem):
        parse_ss(text, ORIGIN)


def test_unix_path_with_spaces_survives():
    # Derived from the recorded listener line: ss right-aligns the path column, so a path with
    # spaces widens it and still ends right before " <inode>".
    line = UNIX.replace("/tmp/socklab-stats.sock", "/tmp/with two spaces.sock")
    sock = parse_ss(line + "\n", ORIGIN)[0]
    assert sock.local.address == "/tmp/with two spaces.sock" and sock.pending


def test_a_bound_only_tcp_socket_of_newer_kernels_has_skmem_but_no_tcp_info():
    """6.12.118 and 7.2.12 (with iproute2 6.15) list a bound, unconnected TCP socket like this."""
    line = ("tcp   UNCONN     0      0           0.0.0.0:7777       0.0.0.0:*     ino:1620 sk:52 cgroup:/ <-> "
            "skmem:(r0,rb131072,t0,tb16384,f0,w0,o0,bl0,d0)\n")
    (sock,) = parse_ss(line)
    assert sock.state == "UNCONN" and sock.tcp is None and sock.local.port == 7777


def test_a_connected_tcp_socket_without_tcp_info_is_still_refused():
    line = ("tcp   ESTAB     0      0           198.51.100.1:7777       198.51.100.2:40000     ino:1620 sk:52 "
            "cgroup:/ <-> skmem:(r0,rb131072,t0,tb16384,f0,w0,o0,bl0,d0)\n")
    with pytest.raises(StatsFormatError, match="TCP info is missing"):
        parse_ss(line)
