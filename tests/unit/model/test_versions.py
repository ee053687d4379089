"""The model per kernel: version rules with their causes, and boot defaults computed from memory."""

from __future__ import annotations

import pytest

from harness.model import Network
from harness.model import versions
from harness.model.views import ss_rows

# `sysctl` of each Debian kernel in the lab's 512 MiB VMs (bookworm 6.1.0-57, trixie 6.12.118, forky 7.2.12).
MEASURED = {
    "6.1": {"net.core.optmem_max": 20480, "net.core.rmem_max": 212992, "net.core.wmem_max": 212992,
            "net.ipv4.tcp_rmem": (4096, 131072, 3731168), "net.ipv4.tcp_wmem": (4096, 16384, 3731168),
            "net.ipv4.tcp_mem": (5463, 7287, 10926), "net.ipv4.udp_mem": (10929, 14574, 21858),
            "net.ipv4.tcp_max_syn_backlog": 128},
    "6.12": {"net.core.optmem_max": 131072, "net.core.rmem_max": 212992, "net.core.wmem_max": 212992,
             "net.ipv4.tcp_rmem": (4096, 131072, 3699616), "net.ipv4.tcp_wmem": (4096, 16384, 3699616),
             "net.ipv4.tcp_mem": (5418, 7225, 10836), "net.ipv4.udp_mem": (10836, 14451, 21672),
             "net.ipv4.tcp_max_syn_backlog": 128},
    "7.2": {"net.core.optmem_max": 131072, "net.core.rmem_max": 4194304, "net.core.wmem_max": 4194304,
            "net.ipv4.tcp_rmem": (4096, 131072, 3650528), "net.ipv4.tcp_wmem": (4096, 16384, 3650528),
            "net.ipv4.tcp_mem": (5346, 7129, 10692), "net.ipv4.udp_mem": (10692, 14259, 21384),
            "net.ipv4.tcp_max_syn_backlog": 128},
}


@pytest.mark.parametrize("kernel", versions.KERNELS)
def test_each_kernels_defaults_are_what_its_guest_showed(kernel):
    sysctls = Network(kernel=kernel).add_host("h").sysctls
    assert {name: sysctls[name] for name in MEASURED[kernel]} == MEASURED[kernel]


def test_tcp_mem_follows_the_vms_memory_by_the_kernels_formula():
    small = versions.boot_defaults(512, "6.12")
    large = versions.boot_defaults(2048, "6.12")
    free = versions.free_buffer_pages(2048, "6.12")
    assert large["net.ipv4.tcp_mem"] == (free // 16 // 4 * 3, free // 16, free // 16 // 4 * 3 * 2)
    assert large["net.ipv4.tcp_mem"][1] > 3 * small["net.ipv4.tcp_mem"][1]
    # The per-socket maxima stop at 4 MB (wmem) and 6 MB (rmem) once memory allows.
    assert large["net.ipv4.tcp_wmem"][2] == 4 * 1024 * 1024 and large["net.ipv4.tcp_rmem"][2] == 6 * 1024 * 1024
    assert large["net.ipv4.tcp_max_syn_backlog"] == 128  # 16384 ehash buckets / 128
    assert versions.boot_defaults(8192, "6.12")["net.ipv4.tcp_max_syn_backlog"] == 512


def test_every_rule_names_its_cause_and_differences_are_listed_per_kernel():
    for rule in versions.RULES.values():
        assert all(change.cause for change in rule.changes), rule.name
    assert versions.differences("6.1") == []
    assert [line.split(" =")[0] for line in versions.differences("6.12")] == [
        "net.core.optmem_max", "zerocopy_notification_truesize", "ss_lists_bound_only_tcp",
        "virtio_net_ethtool_queue_packets", "so_busy_poll_raise_needs_cap_net_admin"]
    assert "unix_dgram_peer_checked_after_alloc" in {line.split(" =")[0] for line in versions.differences("7.2")}
    assert "net: increase optmem_max default value" in versions.differences("7.2")[0]
    assert {line.split(" =")[0] for line in versions.differences("7.2")} >= {"net.core.rmem_max", "net.core.wmem_max"}


def test_releases_map_to_series_and_unknown_kernels_are_refused():
    assert versions.series_of("6.12.118+deb13-cloud-amd64") == "6.12"
    assert versions.series_of("6.1.0-57-cloud-amd64") == "6.1"
    assert Network(kernel="7.2.12+deb14-cloud-amd64").kernel == "7.2"
    with pytest.raises(ValueError, match="the model knows 6.1, 6.12, 7.2"):
        Network(kernel="5.10")


def test_a_network_may_mix_kernels_per_host():
    net = Network(kernel="6.1")
    client, server = net.add_host("client"), net.add_host("server", kernel="7.2")
    assert client.sysctls["net.core.rmem_max"] == 212992 and server.sysctls["net.core.rmem_max"] == 4194304


def test_bound_only_tcp_sockets_show_in_ss_from_6_8_on():
    for kernel, listed in (("6.1", False), ("6.12", True), ("7.2", True)):
        host = Network(kernel=kernel).add_host("h", addrs=["198.51.100.1"])
        fd = host.call("socket", {"family": "AF_INET", "type": "SOCK_STREAM"}).ret
        assert host.call("bind", {"fd": fd, "addr": ("0.0.0.0", 7777)}).ret == 0
        rows = [row for row in ss_rows(host) if "7777" in str(row)]
        assert bool(rows) == listed, kernel


def test_an_unconnected_unix_datagram_send_finds_no_peer_only_after_the_skb_allocation_from_7_2_on():
    # fuzz-1-13/-161/-403: SHUT_WR then a send without destination; and a send past sk_sndbuf - 32.
    for kernel, shut_wr, too_big in (("6.1", "ENOTCONN", "ENOTCONN"), ("6.12", "ENOTCONN", "ENOTCONN"),
                                     ("7.2", "EPIPE", "EMSGSIZE")):
        host = Network(kernel=kernel).add_host("h")
        shut = host.call("socket", {"family": "AF_UNIX", "type": "SOCK_DGRAM"}).ret
        assert host.call("shutdown", {"fd": shut, "how": "SHUT_WR"}).ret == 0
        assert host.call("send", {"fd": shut, "length": 1, "flags": "MSG_DONTWAIT"}).errno == shut_wr, kernel
        plain = host.call("socket", {"family": "AF_UNIX", "type": "SOCK_DGRAM"}).ret
        assert host.call("send", {"fd": plain, "length": 300000, "flags": "MSG_DONTWAIT"}).errno == too_big, kernel
        assert host.call("send", {"fd": plain, "length": 1, "flags": "MSG_DONTWAIT"}).errno == "ENOTCONN", kernel
