"""Host-side networking: loopback ports, lab addresses, the tap segment's ip commands."""

from __future__ import annotations

import errno
import subprocess

import pytest

from harness.host import net
from harness.errors import LabError


class FakeSocket:
    def __init__(self, outcomes: list) -> None:
        self.outcomes = outcomes
        self.bound = None
        self.closed = False

    def bind(self, address):
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, OSError):
            raise outcome
        self.bound = (address[0], outcome)

    def getsockname(self):
        return self.bound

    def close(self):
        self.closed = True


def test_free_port_is_chosen_by_the_kernel_on_loopback():
    sockets = []

    def make():
        sockets.append(FakeSocket([41234]))
        return sockets[-1]

    assert net.free_port(bind=make) == 41234
    assert sockets[0].bound == ("127.0.0.1", 41234) and sockets[0].closed


def test_free_port_retries_a_busy_bind_then_succeeds():
    outcomes = [OSError(errno.EADDRINUSE, "in use"), 40000]
    assert net.free_port(bind=lambda: FakeSocket(outcomes)) == 40000


def test_no_free_port_is_one_clear_error():
    busy = lambda: FakeSocket([OSError(errno.EADDRINUSE, "Address already in use")])  # noqa: E731
    with pytest.raises(LabError, match="no free TCP port on 127.0.0.1"):
        net.free_port(bind=busy, attempts=3)


def test_real_free_port_is_bindable():
    import socket

    port = net.free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_lab_addresses_are_test_net_2():
    assert net.lab_address(0) == "198.51.100.1/24"
    assert net.lab_address(1) == "198.51.100.2/24"
    with pytest.raises(LabError):
        net.lab_address(300)


def test_macs_are_locally_administered_and_distinct():
    macs = {net.mac_address(kind, index) for kind in (0, 0x5A) for index in range(4)}
    assert len(macs) == 8
    assert all(int(mac.split(":")[0], 16) & 0x02 for mac in macs)


class RecordingRunner:
    def __init__(self, netns_listing: str = "") -> None:
        self.calls: list[list[str]] = []
        self.netns_listing = netns_listing

    def __call__(self, argv):
        self.calls.append(list(argv))
        stdout = self.netns_listing if argv[1:3] == ["netns", "list"] else ""
        return subprocess.CompletedProcess(argv, 0, stdout, "")


def test_segment_is_a_stp_free_bridge_in_its_own_netns():
    runner = RecordingRunner()
    net.TapSegment("socklab-abc123", run=runner).create()
    assert ["ip", "netns", "add", "socklab-abc123"] in runner.calls
    assert ["ip", "-n", "socklab-abc123", "link", "add", "br-lab", "type", "bridge"] in runner.calls
    assert any("forward_delay" in call for call in runner.calls)


def test_attach_moves_the_tap_out_of_the_root_namespace():
    runner = RecordingRunner()
    net.TapSegment("socklab-abc123", run=runner).attach("slabc1230")
    assert runner.calls == [
        ["ip", "link", "set", "slabc1230", "netns", "socklab-abc123"],
        ["ip", "-n", "socklab-abc123", "link", "set", "slabc1230", "master", "br-lab"],
        ["ip", "-n", "socklab-abc123", "link", "set", "slabc1230", "up"],
    ]


def test_create_first_removes_a_leftover_namespace_of_the_same_lab():
    runner = RecordingRunner(netns_listing="socklab-abc123 (id: 0)\n")
    net.TapSegment("socklab-abc123", run=runner).create()
    assert runner.calls.index(["ip", "netns", "delete", "socklab-abc123"]) < runner.calls.index(
        ["ip", "netns", "add", "socklab-abc123"])


def test_destroy_is_idempotent():
    runner = RecordingRunner(netns_listing="other-ns\n")
    net.TapSegment("socklab-abc123", run=runner).destroy()
    assert ["ip", "netns", "delete", "socklab-abc123"] not in runner.calls


def test_failed_ip_command_names_the_command():
    def failing(argv):
        return subprocess.CompletedProcess(argv, 2, "", "RTNETLINK answers: Operation not permitted")

    with pytest.raises(LabError, match="ip netns add socklab-x.*Operation not permitted"):
        net.TapSegment("socklab-x", run=failing).create()
