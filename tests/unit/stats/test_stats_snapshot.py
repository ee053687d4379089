"""Snapshot helpers and deltas, on snapshots parsed from recorded collector output."""

from __future__ import annotations

import dataclasses

import pytest

from harness.stats import Delta, FrozenDict, StatsError, StatsLookupError, parse_output

from .helpers import fixture, nonce_of


def snapshot(name: str, vm: str = "server", taken_at: float = 0.0):
    text = fixture(name)
    return parse_output(text, nonce_of(text), vm, taken_at=taken_at)


@pytest.fixture(scope="module")
def early():
    return snapshot("snapshot-server-mixed.txt", taken_at=100.0)


@pytest.fixture(scope="module")
def later():
    # Recorded on the same boot a little later, with ethtool -S on lo and lab0 only.
    return snapshot("snapshot-server-nics-lo-lab0.txt", taken_at=160.5)


def test_listener_by_port(early):
    listener = early.listener(5001)
    assert (listener.recv_q, listener.send_q) == (3, 2)
    assert early.listener(5002).local.address == "::1"


def test_listener_on_two_families_needs_an_address(early):
    with pytest.raises(StatsLookupError, match=r"2 tcp listeners on port 22 \(0\.0\.0\.0:22, \[::\]:22\)"):
        early.listener(22)
    assert early.listener(22, address="::").v6only is True


def test_missing_listener_lists_the_ones_there(early):
    with pytest.raises(StatsLookupError, match="no tcp listener on port 9999; listeners: .*127.0.0.1:5001"):
        early.listener(9999)


def test_unix_listener_is_found_by_netid(early):
    (unix,) = early.listeners("u_str")
    assert unix.local.address == "/tmp/socklab-stats.sock"


def test_socket_by_inode_and_cookie(early):
    listener = early.listener(5001)
    assert early.socket(inode=listener.inode) is listener
    assert early.socket(cookie=listener.cookie) is listener
    with pytest.raises(StatsLookupError, match="inode 0 is shared"):
        early.socket(inode=0)
    with pytest.raises(StatsLookupError, match="no socket with inode 1 among 41"):
        early.socket(inode=1)
    with pytest.raises(TypeError):
        early.socket()


def test_find_by_criteria(early):
    assert len(early.find(netid="tcp", state="SYN-SENT", peer_port=5001)) == 3
    assert {s.family for s in early.find(netid="tcp", state="LISTEN")} == {"inet", "inet6"}
    assert all(s.family == "unix" for s in early.find(family="unix"))


def test_listener_only_values_refuse_other_sockets(early):
    established = early.find(netid="tcp", state="ESTAB")[0]
    with pytest.raises(StatsError, match="accept_queue is a listener's value"):
        established.accept_queue


def test_counter_lookup_and_hints(early):
    assert early.counter("TcpExt.ListenDrops") >= early.counter("TcpExt.ListenOverflows") > 0
    with pytest.raises(StatsLookupError, match="did you mean TcpExt.ListenOverflows"):
        early.counter("Tcp.ListenOverflows")
    with pytest.raises(StatsLookupError, match="Group.Name"):
        early.counter("ListenOverflows")
    with pytest.raises(StatsLookupError, match="only types seen at least once"):
        early.counter("IcmpMsg.InType3")


def test_nic_and_feature_lookup(early):
    assert early.nic("lab0").features["scatter-gather"].enabled
    assert early.nic("lab0").feature("tx-checksumming")
    with pytest.raises(StatsLookupError, match="no NIC 'ens4'; it has lo, mgmt0, lab0"):
        early.nic("ens4")
    with pytest.raises(StatsLookupError, match="no feature 'warp-drive'"):
        early.nic("lab0").feature("warp-drive")


def test_sysctl_by_name(early):
    assert early.sysctl("net.ipv4.tcp_abort_on_overflow") is False
    with pytest.raises(StatsLookupError, match="not collected"):
        early.sysctl("net.ipv4.tcp_fin_timeout")


def test_delta_of_counters(early, later):
    delta = later - early
    assert isinstance(delta, Delta) and delta.seconds == pytest.approx(60.5)
    assert delta.counter("Tcp.InSegs") > 0 and delta.counter("Tcp.MaxConn") == 0
    assert all(value for value in delta.changed().values())
    assert "Tcp.InSegs" in delta.changed()
    # mgmt0 counters were not collected in the later snapshot: no delta rather than a wrong one.
    assert set(delta.nic_counters) == {"lab0"} and delta.nic("lab0")["rx_queue_0_packets"] >= 0
    with pytest.raises(StatsLookupError, match="no NIC counters for 'mgmt0'"):
        delta.nic("mgmt0")


def test_counters_that_appear_later_count_from_zero(early, later):
    grown = dataclasses.replace(later, counters=FrozenDict({**later.counters, "IcmpMsg.InType3": 4}))
    assert (grown - early).counter("IcmpMsg.InType3") == 4


def test_delta_refuses_another_vm_or_another_boot(early, later):
    with pytest.raises(StatsError, match="cannot subtract a snapshot of server from one of client"):
        dataclasses.replace(later, vm="client") - early
    with pytest.raises(StatsError, match="rebooted between the two snapshots"):
        dataclasses.replace(later, boot_id="00000000-0000-0000-0000-000000000000") - early


def test_records_are_immutable_and_hashable(early):
    with pytest.raises(dataclasses.FrozenInstanceError):
        early.vm = "client"
    with pytest.raises(dataclasses.FrozenInstanceError):
        early.sockets[0].recv_q = 0
    with pytest.raises(TypeError):
        early.counters["TcpExt.ListenDrops"] = 0
    assert hash(early) == hash(snapshot("snapshot-server-mixed.txt", taken_at=100.0))


def test_feature_is_truthy_when_on(early):
    lab0 = early.nic("lab0")
    assert bool(lab0.features["scatter-gather"]) is True
    assert bool(lab0.features["large-receive-offload"]) is False
