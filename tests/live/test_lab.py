"""The foundation on real guests: boot, SSH, console, the lab segment, and a clean teardown."""

from __future__ import annotations

import subprocess

import pytest

from harness.vm import qemu
from harness.lab.lifecycle import Lab
from tests.live.ownhome import own_home

pytestmark = pytest.mark.vm


def test_both_guests_run_the_image_kernel(lab, client, server):
    state = lab.require()
    assert [vm.name for vm in state.vms] == ["client", "server"]
    assert all(lab.alive(state).values())
    for guest, name in ((client, "client"), (server, "server")):
        result = guest.run("uname -r; hostname", check=True)
        release, hostname = result.stdout.split()
        assert release.endswith("-cloud-amd64") and hostname == name


def test_ssh_keeps_streams_apart_and_reports_status(server):
    result = server.run("echo out; echo err >&2; exit 5")
    assert (result.exit_status, result.stdout, result.stderr) == (5, "out\n", "err\n")


def test_ssh_timeout_kills_the_guest_command(server):
    from harness.errors import SSHError

    with pytest.raises(SSHError, match="timed out"):
        server.run("sleep 30 && touch /tmp/should-not-exist", timeout=2)
    assert server.run("test -e /tmp/should-not-exist").exit_status == 1
    assert "sleep 30" not in server.run("ps -eo args").stdout


def test_files_go_both_ways_over_sftp(server, tmp_path):
    sent = tmp_path / "sent.txt"
    sent.write_text("socklab\n")
    server.put(sent, "/tmp/sent.txt")
    server.get("/tmp/sent.txt", tmp_path / "back.txt")
    assert (tmp_path / "back.txt").read_text() == "socklab\n"


def test_console_reaches_the_guest_without_ssh(lab):
    with lab.console("server") as console:
        console.login(timeout=30)
        output, status = console.run("hostname; cat /run/socklab/lab_ip", timeout=30)
    assert status == 0 and output.split() == ["server", "198.51.100.2/24"]


@pytest.mark.parametrize("source,target", [("client", "198.51.100.2"), ("server", "198.51.100.1")])
def test_guests_reach_each_other_over_the_lab_segment(lab, source, target):
    probe = (f"python3 -c \"import socket; s = socket.create_connection(('{target}', 22), timeout=5); "
             "print(s.getsockname()[0], s.recv(8).decode())\"")
    result = lab.ssh(source).run(probe, timeout=30, check=True)
    local, banner = result.stdout.split()
    assert local.startswith("198.51.100.") and banner == "SSH-2.0-"


def test_lab_nic_has_scatter_gather_in_tap_mode(lab, server):
    if lab.require().segment != "tap":
        pytest.skip("socket segment: no offloads by design")
    features = server.run("ethtool -k lab0", check=True).stdout
    assert "scatter-gather: on" in features and "tx-checksumming: on" in features


def test_management_nic_has_no_route_out(server):
    routes = server.run("ip route show default; ip -6 route show default", check=True).stdout
    assert routes.strip() == ""


def _leftovers(lab: Lab, netns: str, taps: list[str]) -> dict[str, object]:
    qemus = lab.qemu_pids()
    netns_list = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    return {
        "qemu": qemus,
        "netns": netns in netns_list,
        "taps": [tap for tap in taps if f" {tap}:" in links or f" {tap}@" in links],
        "run_dir": lab.run_dir.exists(),
    }


def test_down_leaves_nothing_behind(lab, tmp_path):
    """A lab of its own (own home, same image): up, then down, then nothing of it remains."""
    own = Lab(own_home(lab.paths, tmp_path / "home"))
    state, started = own.up("single")
    assert started and all(own.alive(state).values())
    netns, taps = state.netns, [vm.tap for vm in state.vms if vm.tap]
    pids = [vm.pid for vm in state.vms]
    own.down()
    assert _leftovers(own, netns, taps) == {"qemu": [], "netns": False, "taps": [], "run_dir": False}
    assert not any(qemu.is_running(pid) for pid in pids)
    assert not list(own.paths.home.rglob("*.qcow2"))


def test_a_topology_s_nic_settings_are_made_in_the_guest(lab, tmp_path):
    """`lossy`: MTU, offloads and netem from the topology file, set in both guests once they answer."""
    own = Lab(own_home(lab.paths, tmp_path / "home"), name="lossy")
    try:
        state, started = own.up("lossy")
        assert started and state.topology == "lossy"
        for vm in ("client", "server"):
            shown = own.ssh(vm).run("ip -o link show lab0; tc qdisc show dev lab0; ethtool -k lab0", check=True).stdout
            assert " mtu 1400 " in shown
            assert "netem" in shown and "delay 20ms loss 1%" in shown
            assert "tcp-segmentation-offload: off" in shown and "generic-segmentation-offload: off" in shown
        # The delay is real: one TCP connect is a round trip over two delayed NICs (20 ms each way).
        took = own.ssh("client").run(
            "python3 -c 'import socket,time; s=socket.socket(); t=time.monotonic(); "
            "s.connect((\"198.51.100.2\", 22)); print(time.monotonic()-t)'", check=True).stdout
        assert float(took) >= 0.035, took
    finally:
        own.down()
