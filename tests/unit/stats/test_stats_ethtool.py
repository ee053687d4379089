"""ethtool -S / -k parsers on output recorded from the lab guest's virtio-net NICs (ethtool 6.1)."""

from __future__ import annotations

import pytest

from harness.stats import Origin, StatsFormatError, StatsTruncatedError
from harness.stats.ethtool import group_queues, parse_ethtool_features, parse_ethtool_stats

from .helpers import fixture

STATS = Origin("server", "ethtool -S lab0")
FEATURES = Origin("server", "ethtool -k '*'")


def test_single_queue_virtio_counters():
    counters, queues = parse_ethtool_stats(fixture("ethtool-S-lab0.txt"), STATS)
    assert len(counters) == 14 and counters["rx_queue_0_packets"] > 0
    assert [(q.direction, q.index) for q in queues] == [("rx", 0), ("tx", 0)]
    rx = queues[0]
    assert rx["packets"] == counters["rx_queue_0_packets"] and rx["bytes"] == counters["rx_queue_0_bytes"]
    assert set(rx.counters) == {"packets", "bytes", "drops", "xdp_packets", "xdp_tx", "xdp_redirects",
                                "xdp_drops", "kicks"}
    assert set(queues[1].counters) == {"packets", "bytes", "xdp_tx", "xdp_tx_drops", "kicks", "tx_timeouts"}


def test_management_nic_counters():
    counters, queues = parse_ethtool_stats(fixture("ethtool-S-mgmt0.txt"), Origin("server", "ethtool -S mgmt0"))
    assert counters["tx_queue_0_packets"] > 0 and len(queues) == 2


def test_lab_nic_really_has_one_queue_pair():
    # Why the multi-queue fixture is synthetic: virtio-net here is started without mq.
    assert "Combined:\t1" in fixture("ethtool-l-lab0.txt").split("Current hardware settings:")[1]


def test_several_queues_synthetic_variant():
    counters, queues = parse_ethtool_stats(fixture("ethtool-S-lab0-4queues.synthetic.txt"), STATS)
    assert [(q.direction, q.index) for q in queues] == [("rx", i) for i in range(4)] + [("tx", i) for i in range(4)]
    assert len(counters) == 4 * 14
    from harness.stats import Nic
    nic = Nic("lab0", counters, queues, parse_ethtool_features(fixture("ethtool-k-all.txt"))["lab0"], True)
    assert len(nic.rx_queues) == len(nic.tx_queues) == 4
    assert nic.total("rx", "packets") == sum(counters[f"rx_queue_{i}_packets"] for i in range(4))
    assert nic.queue("tx", 3)["packets"] == counters["tx_queue_3_packets"]


def test_other_driver_queue_spellings_are_grouped():
    queues = group_queues({"rx0_packets": 1, "tx-1.bytes": 2, "rx_missed_errors": 3})
    assert [(q.direction, q.index, dict(q.counters)) for q in queues] == [("rx", 0, {"packets": 1}),
                                                                          ("tx", 1, {"bytes": 2})]


def test_features_of_every_device():
    nics = parse_ethtool_features(fixture("ethtool-k-all.txt"), FEATURES)
    assert list(nics) == ["lo", "mgmt0", "lab0"]
    lab0 = nics["lab0"]
    # tap with vnet_hdr: the guest may hand the NIC scatter-gather lists and leave checksums to it.
    assert lab0["scatter-gather"] and not lab0["scatter-gather"].fixed
    assert lab0["tx-checksumming"].enabled and lab0["tcp-segmentation-offload"].enabled
    assert lab0["rx-checksumming"].fixed
    child = lab0["tx-checksum-ip-generic"]
    assert child.parent == "tx-checksumming" and child.enabled and lab0["tx-checksum-ipv4"].fixed
    assert len(lab0) == 65 and all(f.parent in (None, *lab0) for f in lab0.values())


def test_user_net_nic_has_no_sg_so_gso_stays_off_as_requested():
    mgmt0 = parse_ethtool_features(fixture("ethtool-k-all.txt"), FEATURES)["mgmt0"]
    assert not mgmt0["scatter-gather"]
    gso = mgmt0["generic-segmentation-offload"]
    assert (gso.enabled, gso.requested, gso.fixed) == (False, True, False)


def test_single_device_output_without_blank_line():
    text = fixture("ethtool-k-all.txt").split("\n\n")[-1]  # the "Features for lab0:" block
    assert list(parse_ethtool_features(text, FEATURES)) == ["lab0"]


@pytest.mark.parametrize("line, error", [
    ("     rx_queue_0_packets:", StatsTruncatedError),
    ("     rx_queue_0_packets", StatsTruncatedError),
    ("     rx_queue_0_packets: lots", StatsFormatError),
    ("rx_queue_0_packets: 5", StatsFormatError),
])
def test_bad_stats_line(line, error):
    text = fixture("ethtool-S-lab0.txt").replace("     rx_queue_0_bytes: ", line + "\n     rx_queue_0_bytes: ", 1)
    with pytest.raises(error) as caught:
        parse_ethtool_stats(text, STATS)
    assert caught.value.line == line and caught.value.line_number == 3
    assert str(caught.value).startswith("server: `ethtool -S lab0` printed an unexpected line 3")


def test_stats_without_header_or_twice_the_same_counter():
    with pytest.raises(StatsFormatError, match="NIC statistics"):
        parse_ethtool_stats("no stats available\n", STATS)
    with pytest.raises(StatsFormatError, match="twice"):
        parse_ethtool_stats("NIC statistics:\n     a: 1\n     a: 2\n", STATS)


@pytest.mark.parametrize("line, error", [
    ("scatter-gather: o", StatsTruncatedError),
    ("scatter-gather:", StatsTruncatedError),
    ("scatter-gather: off [fix", StatsTruncatedError),
    ("scatter-gather: maybe", StatsFormatError),
    ("\tscatter-gather: on", None),  # indentation alone is fine under a parent
])
def test_bad_feature_line(line, error):
    text = fixture("ethtool-k-all.txt").replace("scatter-gather: on\n", line + "\n", 1)
    if error is None:
        assert parse_ethtool_features(text, FEATURES)
        return
    with pytest.raises(error) as caught:
        parse_ethtool_features(text, FEATURES)
    assert caught.value.line == line


def test_feature_before_any_device_or_device_without_features():
    with pytest.raises(StatsFormatError, match="Features for"):
        parse_ethtool_features("scatter-gather: on\n", FEATURES)
    with pytest.raises(StatsTruncatedError, match="no features listed for lab0"):
        parse_ethtool_features("Features for lab0:\n", FEATURES)
