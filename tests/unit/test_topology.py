"""harness/lab/topology.py: topologies are YAML files, checked line by line before anything boots."""

from __future__ import annotations

import pytest

from harness.errors import LabError
from harness.lab.topology import Nic, builtin_names, topology


def test_the_shipped_topologies_load_and_keep_the_addresses_guides_quote():
    assert {"default", "single", "mixed", "lossy"} <= set(builtin_names())
    default = topology("default")
    assert default.vms == ("client", "server")
    assert default.addresses() == {"client": "198.51.100.1", "server": "198.51.100.2"}
    assert default.ref == "default"
    assert not any(guest.lab0.tuned for guest in default.guests)
    assert topology("mixed").kernels == (("client", "6.1"), ("server", "7.2"))


def test_a_topology_file_elsewhere_is_read_by_path_and_remembered_by_absolute_path(tmp_path, monkeypatch):
    path = tmp_path / "trio.yaml"
    path.write_text("name: trio\nvms:\n  - {name: a, memory_mib: 256, cpus: 2}\n  - {name: b}\n  - {name: c}\n")
    monkeypatch.chdir(tmp_path)
    trio = topology("trio.yaml")
    assert trio.vms == ("a", "b", "c")
    assert trio.addresses() == {"a": "198.51.100.1", "b": "198.51.100.2", "c": "198.51.100.3"}
    assert (trio.guest("a").memory_mib, trio.guest("a").cpus) == (256, 2)
    assert trio.ref == str(path)
    assert topology(trio.ref) == trio


def test_nic_settings_become_guest_commands():
    lossy = topology("lossy").guest("client").lab0
    assert lossy.guest_commands() == [
        "ip link set dev lab0 mtu 1400",
        "ethtool -K lab0 tso off gso off",
        "tc qdisc replace dev lab0 root netem delay 20ms loss 1%",
    ]
    assert Nic("198.51.100.1/24").guest_commands() == []


@pytest.mark.parametrize("body, message", [
    ("name: x\nvms: []\n", r"x.yaml:1: `vms:` must be a list of at least one VM"),
    ("name: x\nvms:\n  - {name: a, lab0: {address: 10.0.2.15/24}}\n",
     r"x.yaml:3: `address: 10.0.2.15/24` must be a host address in 198.51.100.0/24"),
    ("name: x\nvms:\n  - {name: a, lab0: {address: 198.51.100.255/24}}\n", "must be a host address"),
    ("name: x\nvms:\n  - {name: a}\n  - {name: a, lab0: {address: 198.51.100.9/24}}\n",
     r"x.yaml:4: a second VM named 'a'"),
    ("name: x\nvms:\n  - {name: a}\n  - {name: b, lab0: {address: 198.51.100.1/24}}\n",
     r"b has the address 198.51.100.1 of an earlier VM"),
    ("name: x\nvms:\n  - {name: a, lab0: {offloads: {sgg: false}}}\n", r"unknown offload 'sgg'; did you mean 'sg'\?"),
    ("name: x\nvms:\n  - {name: a, lab0: {mtu: 70000}}\n", r"`mtu: 70000` is outside 576..9000"),
    ("name: x\nvms:\n  - {name: a, memory: 512}\n", r"unknown key 'memory'"),
    ("name: x\nvms:\n  - {name: 'a; rm -rf /'}\n", r"VM name 'a; rm -rf /'"),
    ("- just a list\n", r"a topology is a mapping"),
])
def test_a_bad_topology_is_one_line_naming_the_file(tmp_path, body, message):
    path = tmp_path / "x.yaml"
    path.write_text(body)
    with pytest.raises(LabError, match=message):
        topology(str(path))


def test_an_unknown_name_suggests_the_shipped_ones():
    with pytest.raises(LabError, match=r"unknown topology 'defualt'; did you mean 'default'\?"):
        topology("defualt")
