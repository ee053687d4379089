"""MSG_ZEROCOPY (§6.2): SO_ZEROCOPY rules, notification ids and ranges, coalescing, COPIED, ENOBUFS, EAGAIN."""

from harness.model import Network, ZEROCOPY_DEFERRED
from harness.model.constants import (
    AF_INET, AF_UNIX, IPPROTO_UDPLITE, MSG_ERRQUEUE, MSG_ZEROCOPY, POLLERR, SO_EE_CODE_ZEROCOPY_COPIED,
    SO_EE_ORIGIN_ZEROCOPY, SOCK_DGRAM, SOCK_STREAM,
)

from model_helpers import listener, tcp, udp

SO_ZEROCOPY = 60


def enable(host, fd, value=1):
    return host.call("setsockopt", {"fd": fd, "level": 1, "optname": SO_ZEROCOPY, "value": value})


def read_err(host, fd):
    return host.call("recvmsg", {"fd": fd, "length": 0, "flags": MSG_ERRQUEUE})


def zc_send(host, fd, length=1000, **extra):
    return host.call("send", {"fd": fd, "length": length, "flags": MSG_ZEROCOPY, **extra})


def connected_pair(server, client, addr):
    lfd = listener(server, 7000)
    fd = tcp(client)
    assert client.call("connect", {"fd": fd, "addr": (addr, 7000)}).ok
    return fd, server.call("accept", {"fd": lfd}).ret


def test_so_zerocopy_only_tcp_and_udp(a):
    """Rule: sk_setsockopt(SO_ZEROCOPY): inet sockets other than TCP/UDP, and AF_UNIX, get EOPNOTSUPP."""
    assert enable(a, tcp(a)).ok and enable(a, udp(a)).ok
    unix_fd = a.call("socket", {"family": AF_UNIX, "type": SOCK_STREAM}).ret
    assert enable(a, unix_fd).errno == "EOPNOTSUPP"
    lite = a.call("socket", {"family": AF_INET, "type": SOCK_DGRAM, "protocol": IPPROTO_UDPLITE}).ret
    assert enable(a, lite).errno == "EOPNOTSUPP"


def test_so_zerocopy_values(a):
    """Rule: values other than 0/1 -> EINVAL, but the type check comes first (EOPNOTSUPP on AF_UNIX)."""
    fd = tcp(a)
    assert enable(a, fd, 2).errno == "EINVAL"
    assert enable(a, fd, -1).errno == "EINVAL"
    unix_fd = a.call("socket", {"family": AF_UNIX, "type": SOCK_STREAM}).ret
    assert enable(a, unix_fd, 2).errno == "EOPNOTSUPP"
    assert enable(a, fd, 1).ok
    assert a.call("getsockopt", {"fd": fd, "level": 1, "optname": SO_ZEROCOPY}).ret == 1


def test_flag_without_option_is_a_plain_copy(a, b):
    """Rule: MSG_ZEROCOPY without SO_ZEROCOPY is ignored: data sent, no notification."""
    fd, _ = connected_pair(a, b, "198.51.100.1")
    r = zc_send(b, fd)
    assert r.ok and r.ret == 1000 and "ignored" in r.rule
    assert read_err(b, fd).errno == "EAGAIN"
    assert b.socket(fd).zerocopy_next_id == 0


def test_empty_error_queue_is_eagain(a):
    """Rule: ip_recv_error: nothing queued -> EAGAIN (it never blocks)."""
    r = read_err(a, udp(a))
    assert r.errno == "EAGAIN" and r.kernel_fn == "ip_recv_error"


def test_loopback_completions_are_copied(a):
    """Rule: local delivery forces a deferred copy (skb_orphan_frags_rx) -> SO_EE_CODE_ZEROCOPY_COPIED."""
    fd, _ = connected_pair(a, a, "127.0.0.1")
    enable(a, fd)
    assert zc_send(a, fd).ok
    [note] = read_err(a, fd).ret
    assert note == {"origin": SO_EE_ORIGIN_ZEROCOPY, "code": SO_EE_CODE_ZEROCOPY_COPIED, "lo": 0, "hi": 0,
                    "errno": 0}


def test_nic_with_sg_completes_zerocopy(a, b):
    """Rule: a TCP send over a scatter-gather NIC completes with ee_code 0."""
    fd, _ = connected_pair(b, a, "198.51.100.2")
    enable(a, fd)
    zc_send(a, fd)
    assert read_err(a, fd).ret[0]["code"] == 0


def test_tcp_over_nic_without_sg_default_and_switch(b):
    """Rule (see docs): TCP route caps always include SG in 6.1, so a send larger than one MSS reports
    code 0 by default; Network(tcp_zerocopy_copied_without_sg=True) flips it to COPIED."""
    for flag, expected in ((False, 0), (True, SO_EE_CODE_ZEROCOPY_COPIED)):
        net = Network(strict=True, tcp_zerocopy_copied_without_sg=flag)
        srv = net.add_host("srv", addrs=["198.51.100.1"], sg=True)
        cli = net.add_host("cli", addrs=["198.51.100.2"], sg=False)
        fd, _ = connected_pair(srv, cli, "198.51.100.1")
        enable(cli, fd)
        zc_send(cli, fd, length=4096)
        assert read_err(cli, fd).ret[0]["code"] == expected


def test_tcp_over_nic_without_sg_copies_a_send_of_one_segment():
    """Rule (measured with `ethtool -K lab0 sg off`, and on the socket segment): a send of at most one MSS
    is not a GSO skb, so it is linearised at transmit and completes COPIED; one byte more is code 0."""
    net = Network(strict=True)
    srv = net.add_host("srv", addrs=["198.51.100.1"], sg=True)
    cli = net.add_host("cli", addrs=["198.51.100.2"], sg=False)
    fd, _ = connected_pair(srv, cli, "198.51.100.1")
    enable(cli, fd)
    codes = []
    for length in (1000, 1448, 1449, 4096, 1000, 20000):
        assert zc_send(cli, fd, length=length).ret == length
        codes.append(read_err(cli, fd).ret[0]["code"])
    copied = SO_EE_CODE_ZEROCOPY_COPIED
    assert codes == [copied, copied, 0, 0, copied, 0]


def test_udp_without_sg_is_copied(a, b):
    """Rule: __ip_append_data: no NETIF_F_SG on the route's device -> uarg->zerocopy = 0 -> COPIED."""
    fd = udp(b)
    enable(b, fd)
    assert zc_send(b, fd, addr=("198.51.100.1", 5000)).ok
    assert read_err(b, fd).ret[0]["code"] == SO_EE_CODE_ZEROCOPY_COPIED
    fd = udp(a)
    enable(a, fd)
    zc_send(a, fd, addr=("198.51.100.2", 5000))
    assert read_err(a, fd).ret[0]["code"] == 0


def test_udp_larger_than_mtu_is_copied(a):
    """Rule: __ip_append_data needs CHECKSUM_PARTIAL (one fragment) for zerocopy; larger datagrams copy."""
    fd = udp(a)
    enable(a, fd)
    zc_send(a, fd, length=3000, addr=("198.51.100.2", 5000))
    assert read_err(a, fd).ret[0]["code"] == SO_EE_CODE_ZEROCOPY_COPIED


def test_ids_count_successful_sends_and_ranges_coalesce(a, b):
    """Rule: ids count successful MSG_ZEROCOPY sends; contiguous ranges coalesce while unread."""
    fd, _ = connected_pair(b, a, "198.51.100.2")
    enable(a, fd)
    for _ in range(5):
        assert zc_send(a, fd).ok
    r = read_err(a, fd)
    assert [(n["lo"], n["hi"]) for n in r.ret] == [(0, 4)]
    assert read_err(a, fd).errno == "EAGAIN"
    zc_send(a, fd)
    assert read_err(a, fd).ret[0]["lo"] == 5


def test_failed_send_does_not_consume_an_id(a):
    """Rule: msg_zerocopy_put_abort gives the id back when the send fails (EPIPE on an unconnected socket)."""
    fd = tcp(a)
    enable(a, fd)
    r = zc_send(a, fd, flags=MSG_ZEROCOPY | 0x4000)
    assert r.errno == "EPIPE" and r.signal is None
    assert a.socket(fd).zerocopy_next_id == 0 and a.socket(fd).omem == 0


def test_zero_length_sends(a):
    """Rule: TCP allocates no uarg for size 0; UDP's length includes the 8-byte header, so it does."""
    fd, _ = connected_pair(a, a, "127.0.0.1")
    enable(a, fd)
    assert zc_send(a, fd, length=0).ret == 0
    assert a.socket(fd).zerocopy_next_id == 0
    ufd = udp(a)
    enable(a, ufd)
    assert zc_send(a, ufd, length=0, addr=("127.0.0.1", 9)).ok
    assert a.socket(ufd).zerocopy_next_id == 1


def test_coalescing_ignores_ee_code(a):
    """Rule: skb_zerocopy_notify_extend only checks contiguity: the tail keeps its ee_code."""
    fd = udp(a)
    enable(a, fd)
    zc_send(a, fd, addr=("198.51.100.2", 5000))  # code 0
    zc_send(a, fd, addr=("127.0.0.1", 5000))  # would be COPIED
    [note] = read_err(a, fd).ret
    assert (note["lo"], note["hi"], note["code"]) == (0, 1, 0)


def test_poll_reports_pollerr_for_notifications(a):
    """Rule: datagram_poll/tcp_poll set POLLERR while the error queue is non-empty."""
    fd = udp(a)
    enable(a, fd)
    zc_send(a, fd, addr=("127.0.0.1", 9))
    revents = a.call("poll", {"fds": [fd], "events": 0}).ret
    assert revents[fd] & POLLERR
    read_err(a, fd)
    assert not a.call("poll", {"fds": [fd], "events": 0}).ret[fd] & POLLERR


def deferred_lab():
    net = Network(strict=True, zerocopy=ZEROCOPY_DEFERRED)
    host = net.add_host("h", addrs=["198.51.100.1"])
    net.add_host("p", addrs=["198.51.100.2"])
    fd = udp(host)
    enable(host, fd)
    return net, host, fd


def test_enobufs_when_in_flight_notifications_pass_optmem(a):
    """Rule: sock_omalloc: omem (768 per notification skb) + SKB_TRUESIZE(0) 576 > optmem_max 20480 -> ENOBUFS.
    26 notifications fit, the 27th send fails and consumes no id."""
    net, host, fd = deferred_lab()
    for i in range(26):
        assert zc_send(host, fd, addr=("198.51.100.2", 5000)).ok, i
    r = zc_send(host, fd, addr=("198.51.100.2", 5000))
    assert r.errno == "ENOBUFS" and r.kernel_fn == "sock_omalloc"
    assert host.socket(fd).zerocopy_next_id == 26


def test_in_order_completion_coalesces_and_frees_optmem():
    """Rule: completions in order coalesce into one skb on the queue, releasing the others' omem."""
    net, host, fd = deferred_lab()
    for _ in range(26):
        zc_send(host, fd, addr=("198.51.100.2", 5000))
    net.complete_zerocopy()
    assert host.socket(fd).zerocopy_pending == ({"code": 0, "lo": 0, "hi": 25},)
    assert host.socket(fd).omem == 768
    assert zc_send(host, fd, addr=("198.51.100.2", 5000)).ok


def test_unread_uncoalesced_notifications_cause_enobufs():
    """Rule: out-of-order completions cannot coalesce; left unread they hold optmem and sends get ENOBUFS
    until the error queue is read (one notification per recvmsg)."""
    net, host, fd = deferred_lab()
    for _ in range(26):
        zc_send(host, fd, addr=("198.51.100.2", 5000))
    net.complete_zerocopy(order="reverse")
    assert len(host.socket(fd).zerocopy_pending) == 26
    assert zc_send(host, fd, addr=("198.51.100.2", 5000)).errno == "ENOBUFS"
    first = read_err(host, fd).ret
    assert len(first) == 1 and (first[0]["lo"], first[0]["hi"]) == (25, 25)
    assert zc_send(host, fd, addr=("198.51.100.2", 5000)).ok


def test_optmem_max_sysctl_sets_the_limit():
    """Rule: the limit is net.core.optmem_max."""
    net = Network(strict=True, zerocopy=ZEROCOPY_DEFERRED)
    host = net.add_host("h", addrs=["198.51.100.1"], sysctls={"optmem_max": 2000})
    fd = udp(host)
    enable(host, fd)
    results = [zc_send(host, fd, addr=("127.0.0.1", 9)).errno for _ in range(4)]
    assert results == [None, None, "ENOBUFS", "ENOBUFS"]  # 0+576, 768+576 fit; 1536+576 > 2000


def test_advance_delivers_deferred_completions():
    """Letting model time pass completes deferred sends (as ACKs or TX completions would)."""
    net, host, fd = deferred_lab()
    zc_send(host, fd, addr=("198.51.100.2", 5000))
    assert read_err(host, fd).errno == "EAGAIN"
    net.advance(0.1)
    assert read_err(host, fd).ret[0]["lo"] == 0


def test_closed_socket_gets_no_notification():
    """Rule: __msg_zerocopy_callback skips SOCK_DEAD sockets."""
    net, host, fd = deferred_lab()
    zc_send(host, fd, addr=("198.51.100.2", 5000))
    sk_view = host.socket(fd)
    assert sk_view.zerocopy_inflight == 1
    host.call("close", {"fd": fd})
    assert net.complete_zerocopy() == 1


def stuck_stream(a, b, sndbuf=1 << 21, rcvbuf=2000):
    """a sends to b across the segment; b's small locked receive buffer closes the window and b never reads."""
    lfd = tcp(b)
    assert b.call("setsockopt", {"fd": lfd, "level": 1, "optname": 8, "value": rcvbuf}).ok  # SO_RCVBUF
    assert b.call("bind", {"fd": lfd, "addr": ("0.0.0.0", 7000)}).ok
    assert b.call("listen", {"fd": lfd, "backlog": 4}).ok
    fd = tcp(a)
    enable(a, fd)
    assert a.call("setsockopt", {"fd": fd, "level": 1, "optname": 32, "value": sndbuf}).ok  # SO_SNDBUFFORCE
    assert a.call("connect", {"fd": fd, "addr": ("198.51.100.2", 7000)}).ok
    return fd, b.call("accept", {"fd": lfd}).ret


def test_sends_behind_unsent_zerocopy_data_join_its_notification(a, b):
    """Rule: msg_zerocopy_realloc(): while the write queue's tail holds unsent MSG_ZEROCOPY data, the next send
    whose id follows that uarg extends it (uarg->len++) instead of allocating a notification, so a stuck
    connection does not run out of option memory.

    Measured on the lab guests (6.1.0-56): 40 sends of 500 bytes with MSG_ZEROCOPY|MSG_DONTWAIT into a closed
    window, SO_SNDBUFFORCE 2 MiB: all 40 succeeded, and ss -m showed o1536 on the sender: one completion for the
    ids that got through, one uarg for all the stuck ones. (The model had answered ENOBUFS from the 27th send.)
    """
    fd, rx = stuck_stream(a, b)
    results = [zc_send(a, fd, length=500, flags=MSG_ZEROCOPY | 0x40).errno for _ in range(40)]
    assert results == [None] * 40
    view = a.socket(fd)
    assert view.omem == 2 * 768 and view.zerocopy_inflight == 1 and view.zerocopy_next_id == 40
    [first] = read_err(a, fd).ret
    assert first["lo"] == 0
    # The reader drains; once every stuck byte is acknowledged the joined uarg completes as one range.
    while b.call("recv", {"fd": rx, "length": 1 << 20, "flags": 0x40}).ok:
        pass
    [rest] = read_err(a, fd).ret
    assert (rest["lo"], rest["hi"]) == (first["hi"] + 1, 39)
    assert a.socket(fd).omem == 0


def test_a_blocking_waitall_read_takes_the_stuck_bytes_through_the_window(a, b):
    """Rule: tcp_recvmsg_locked() with MSG_WAITALL copies until ``len``: each copy opens the window and the peer's
    queued bytes come in. Without MSG_WAITALL a read gets one window's worth; with MSG_DONTWAIT it does not wait
    for more; asked for more than was sent, it copies everything and sleeps for the rest (lab 07's stuck.yaml
    drains this way: one read instead of 40 reads 0.2 s apart)."""
    fd, rx = stuck_stream(a, b)
    for _ in range(40):
        assert zc_send(a, fd, length=500, flags=MSG_ZEROCOPY | 0x40).ok
    one_window = b.call("recv", {"fd": rx, "length": 20000, "flags": 0x40 | 0x100})  # MSG_DONTWAIT|MSG_WAITALL
    assert 0 < one_window.ret < 20000 and not one_window.blocked
    rest = b.call("recv", {"fd": rx, "length": 20000 - one_window.ret, "flags": 0x100})
    assert (rest.ret, rest.blocked) == (20000 - one_window.ret, False)
    for _ in range(3):
        assert zc_send(a, fd, length=500, flags=MSG_ZEROCOPY | 0x40).ok
    short = b.call("recv", {"fd": rx, "length": 4000, "flags": 0x100})
    assert (short.ret, short.blocked) == (1500, True)
    assert b.call("recv", {"fd": rx, "length": 1, "flags": 0x40}).errno == "EAGAIN"


def test_a_copied_send_ends_the_joinable_tail(a, b):
    """Rule: msg_zerocopy_realloc() extends only skb_zcopy(tail); a plain send queued behind it makes the next
    MSG_ZEROCOPY send allocate a notification of its own."""
    fd, _ = stuck_stream(a, b)
    for _ in range(6):
        assert zc_send(a, fd, length=500, flags=MSG_ZEROCOPY | 0x40).ok
    omem = a.socket(fd).omem
    assert a.call("send", {"fd": fd, "length": 500, "flags": 0x40}).ok
    assert zc_send(a, fd, length=500, flags=MSG_ZEROCOPY | 0x40).ok
    assert a.socket(fd).omem == omem + 768


def test_the_joined_range_is_limited_to_512_kib(a, b):
    """Rule: msg_zerocopy_realloc(): past 1 << 19 bytes in one uarg, TCP allocates a new one."""
    fd, _ = stuck_stream(a, b, sndbuf=1 << 24)
    assert zc_send(a, fd, length=1000, flags=MSG_ZEROCOPY | 0x40).ok  # fits the window: completes
    for _ in range(3):
        assert zc_send(a, fd, length=200_000, flags=MSG_ZEROCOPY | 0x40).ok
    # 1000 in the window, then 200000 (new uarg), 400000 (joined), 600000 > 524288 (new uarg)
    assert a.socket(fd).zerocopy_inflight == 2


def test_a_failed_send_gives_back_the_id_it_joined(a, b):
    """Rule: msg_zerocopy_put_abort() on an extended uarg: sk_zckey-- and uarg->len--, no option memory freed."""
    fd, _ = stuck_stream(a, b, sndbuf=4608)  # SO_SNDBUFFORCE 4608: the queue fills quickly
    while zc_send(a, fd, length=500, flags=MSG_ZEROCOPY | 0x40).ok:
        pass
    view = a.socket(fd)
    r = zc_send(a, fd, length=500, flags=MSG_ZEROCOPY | 0x40)
    assert r.errno == "EAGAIN"
    after = a.socket(fd)
    assert after.zerocopy_next_id == view.zerocopy_next_id and after.omem == view.omem


def test_sendfile_queues_its_bytes_and_no_completion_even_with_so_zerocopy(a, b):
    """Rule: do_sendfile splices page-cache pages: no ubuf_info, so nothing reaches the error queue."""
    from harness.model.constants import MSG_ERRQUEUE, SO_ZEROCOPY, SOL_SOCKET

    from model_helpers import listener, tcp

    lfd = listener(b, 7000)
    fd = tcp(a)
    assert a.call("setsockopt", {"fd": fd, "level": SOL_SOCKET, "optname": SO_ZEROCOPY, "value": 1}).ok
    assert a.call("connect", {"fd": fd, "addr": ("198.51.100.2", 7000)}).ok
    sent = a.call("sendfile", {"fd": fd, "length": 4096})
    assert sent.ret == 4096 and sent.kernel_fn == "do_sendfile"
    assert a.call("recvmsg", {"fd": fd, "flags": MSG_ERRQUEUE}).errno == "EAGAIN"
    assert b.call("recv", {"fd": b.call("accept", {"fd": lfd}).ret, "length": 65536}).ret == 4096
    assert a.call("sendfile", {"fd": tcp(a), "length": 1}).errno == "EPIPE"
    assert a.call("sendfile", {"fd": fd, "length": -1}).errno == "EINVAL"


def test_a_poll_with_a_timeout_wakes_for_a_deferred_completion_at_once():
    """do_poll() sleeps until POLLERR: a completion the model held back is delivered as time starts to pass."""
    net, host, fd = deferred_lab()
    zc_send(host, fd, addr=("198.51.100.2", 5000))
    assert not host.call("poll", {"fds": [fd], "events": 0}).ret[fd] & POLLERR  # held: nothing yet
    started = net.now
    assert host.call("poll", {"fds": [fd], "events": 0, "timeout": 5000}).ret[fd] & POLLERR
    assert net.now == started  # woken by the completion, not at the end of the timeout
