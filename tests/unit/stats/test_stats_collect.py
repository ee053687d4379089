"""The one-command collector: section splitting, errors, the kept-open shell, parallel snapshots (no VM)."""

from __future__ import annotations

import importlib
from pathlib import Path
import subprocess
import time
from types import SimpleNamespace

import pytest

from harness.stats import (LabSnapshot, StatsCommandFailed, StatsError, StatsFormatError, StatsToolMissing,
                           StatsTruncatedError, collect, collect_many, parse_output)
from harness.stats.collect import (PROCFS_COMMAND, SHELL_COMMAND, build_command, close_shell, one_shot_command,
                                   split_sections)

from .helpers import LocalGuest, fixture, nonce_of


def parse_fixture(name: str, vm: str = "server"):
    text = fixture(name)
    return parse_output(text, nonce_of(text), vm)


# -- recorded output of the real command ---------------------------------------


def test_server_snapshot_from_recorded_output():
    snap = parse_fixture("snapshot-server-mixed.txt")
    assert snap.vm == "server" and len(snap.sockets) == 41
    assert list(snap.nics) == ["lo", "mgmt0", "lab0"]
    assert not snap.nic("lo").counters_collected and snap.nic("lo").features["loopback"].fixed
    lab0 = snap.nic("lab0")
    assert lab0.counters_collected and lab0.features["scatter-gather"] and len(lab0.queues) == 2
    assert snap.counter("TcpExt.ListenOverflows") > 0 and snap.counter("Tcp.MaxConn") == -1
    assert snap.sockstat["TCP"]["tw"] == 2 and snap.sockstat["TCP6"]["inuse"] > 0
    assert snap.sysctls.somaxconn == 4096
    assert snap.stderr == {"ss -tuxanmieHO": "Failed to find cgroup2 mount (×30)"}
    assert len(snap.boot_id) == 36


def test_client_snapshot_from_recorded_output():
    snap = parse_fixture("snapshot-client-idle.txt", "client")
    assert [s.local.port for s in snap.listeners()] == [22, 22]
    assert snap.nic("mgmt0").features["scatter-gather"].enabled is False


def test_missing_tool_names_vm_command_and_shell_message():
    with pytest.raises(StatsToolMissing) as caught:
        parse_fixture("snapshot-server-no-ethtool.txt")
    assert str(caught.value) == ("server: `ethtool -k '*'` failed: ethtool is not installed in the guest "
                                 "(exit 127: /bin/sh: 9: ethtool: not found)")


def test_driver_without_counters_is_kept_and_reported():
    snap = parse_fixture("snapshot-server-nics-lo-lab0.txt")
    assert not snap.nic("lo").counters_collected and snap.nic("lo").counters == {}
    assert not snap.nic("mgmt0").counters_collected  # left out by nics=("lo", "lab0")
    assert snap.nic("lab0").counters_collected
    assert snap.stderr["ethtool -S lo"] == "no stats available"


@pytest.mark.parametrize("cut", [0.1, 0.3, 0.5, 0.7, 0.9, 0.99])
def test_output_cut_anywhere_is_refused(cut):
    text = fixture("snapshot-server-mixed.txt")
    with pytest.raises(StatsFormatError):
        parse_output(text[:int(len(text) * cut)], nonce_of(text), "server")


def test_output_cut_before_end_marker_says_so():
    text = fixture("snapshot-server-mixed.txt")
    nonce = nonce_of(text)
    without_end = text[:text.index(f"@@socklab-stats {nonce} done@@")]
    with pytest.raises(StatsTruncatedError, match="before its end marker"):
        parse_output(without_end, nonce, "server")


def test_last_line_without_newline_is_truncation_named_by_command():
    text = fixture("snapshot-server-mixed.txt")
    nonce = nonce_of(text)
    status = f"@@socklab-stats {nonce} status 0@@"
    ss_end = text.index(status)
    cut = text[:ss_end - 40] + text[ss_end:]  # the last ss line loses its end and newline
    with pytest.raises(StatsTruncatedError) as caught:
        parse_output(cut, nonce, "server")
    assert str(caught.value).startswith("server: `ss -tuxanmieHO` printed an unexpected line 41")
    assert "no newline" in str(caught.value)


def test_only_markers_with_this_snapshots_nonce_count():
    text = fixture("snapshot-server-mixed.txt")
    forged = "@@socklab-stats 0123456789abcdef done@@"
    text = text.replace("/tmp/socklab-stats.sock", forged)  # a UNIX socket path can be anything
    snap = parse_output(text, nonce_of(text), "server")
    assert snap.find(netid="u_str", state="LISTEN")[0].local.address == forged


@pytest.mark.parametrize("junk, where, problem", [
    ("motd\n", "start", "before the first section marker"),
    ("leftover\n", "end", "after the end marker"),
])
def test_stray_output_is_refused(junk, where, problem):
    text = fixture("snapshot-client-idle.txt")
    text = junk + text if where == "start" else text + junk
    with pytest.raises(StatsFormatError, match=problem):
        parse_output(text, nonce_of(text), "client")


def test_failed_command_carries_its_stderr():
    text = fixture("snapshot-client-idle.txt")
    nonce = nonce_of(text)
    failing = text.replace(f"@@socklab-stats {nonce} begin procfs@@\n",
                           f"@@socklab-stats {nonce} begin procfs@@\n", 1)
    start = failing.index(f"@@socklab-stats {nonce} begin procfs@@\n")
    end = failing.index(f"@@socklab-stats {nonce} done@@")
    failing = (failing[:start] + f"@@socklab-stats {nonce} begin procfs@@\n@@socklab-stats {nonce} status 2@@\n"
               f"@@socklab-stats {nonce} stderr@@\ngrep: /proc/net/sockstat6: No such file or directory\n"
               + failing[end:])
    with pytest.raises(StatsCommandFailed) as caught:
        parse_output(failing, nonce, "client")
    assert str(caught.value) == (f"client: `{PROCFS_COMMAND}` exited 2: "
                                 "grep: /proc/net/sockstat6: No such file or directory")


def test_sections_are_split_with_status_and_stderr():
    text = fixture("snapshot-server-nics-lo-lab0.txt")
    sections = split_sections(text, nonce_of(text), "server")
    assert list(sections) == ["ss", "ethtool-k", "ethtool-S lo", "ethtool-S lab0", "procfs"]
    assert sections["ethtool-S lo"].status == 94 and sections["ethtool-S lo"].stderr == "no stats available\n"
    assert sections["ss"].command == "ss -tuxanmieHO" and sections["ethtool-S lab0"].command == "ethtool -S lab0"


# -- the command itself ---------------------------------------------------------


def test_command_is_valid_posix_sh():
    for nics in (None, ("lab0", "mgmt0")):
        subprocess.run(["sh", "-n"], input=build_command("ab" * 8, nics), text=True, check=True)
        subprocess.run(["sh", "-n"], input=one_shot_command(build_command("ab" * 8, nics)), text=True, check=True)
    subprocess.run(["sh", "-n", "-c", SHELL_COMMAND], check=True)


@pytest.mark.parametrize("nic", ["lab0; reboot", "$(id)", "", "a" * 16, "x y"])
def test_nic_names_are_never_spliced_into_the_shell(nic):
    with pytest.raises(StatsError, match="not an interface name"):
        build_command("ab" * 8, (nic,))


def test_nonce_must_be_hex():
    with pytest.raises(ValueError):
        build_command("not hex!")


# -- end to end through a local shell standing in for the guest ------------------


@pytest.fixture
def guest(tmp_path):
    guest = LocalGuest(tmp_path)
    yield guest
    close_shell(guest)
    guest.close()


def test_collect_runs_the_real_command_in_a_kept_open_shell(guest):
    first = collect(guest, nics=("lab0",))
    second = collect(guest, nics=("lab0",))
    assert len(guest.channels) == 1 and guest.channels[0].commands == [SHELL_COMMAND]
    recorded = parse_fixture("snapshot-server-mixed.txt")
    assert first.sockets == recorded.sockets and first.counters == recorded.counters
    assert first.sysctls == recorded.sysctls and first.nic("lab0").features == recorded.nic("lab0").features
    assert first.stderr == {"ss -tuxanmieHO": "Failed to find cgroup2 mount"}
    assert second.round_trip_ms > 0 and second.taken_at >= first.taken_at
    assert (second - first).counter("TcpExt.ListenOverflows") == 0


def test_collect_every_nic_but_loopback(guest):
    snap = collect(guest)
    collected = {name for name, nic in snap.nics.items() if nic.counters_collected}
    assert "lo" not in collected and collected <= set(snap.nics) | collected


def test_collect_in_a_fresh_session(guest):
    snap = collect(guest, nics=("lab0",), reuse_shell=False)
    assert len(snap.sockets) == 41 and guest.channels == []


def test_shell_is_reopened_after_it_dies(guest):
    collect(guest, nics=("lab0",))
    guest.channels[0].close()
    collect(guest, nics=("lab0",))
    assert len(guest.channels) == 2


def test_a_hanging_tool_times_out_and_the_shell_is_dropped(tmp_path):
    guest = LocalGuest(tmp_path, ss_script="sleep 5\n")
    try:
        started = time.monotonic()
        with pytest.raises(StatsError, match="did not finish within 1 s"):
            collect(guest, nics=("lab0",), timeout=1)
        assert time.monotonic() - started < 4 and guest.channels[0].closed
    finally:
        close_shell(guest)
        guest.close()


def test_missing_tool_end_to_end(tmp_path):
    guest = LocalGuest(tmp_path, ethtool_script='echo "sh: 1: ethtool: not found" >&2; exit 127\n')
    try:
        with pytest.raises(StatsToolMissing, match=r"^server: `ethtool -k '\*'` failed: ethtool is not installed"):
            collect(guest, nics=("lab0",))
    finally:
        close_shell(guest)
        guest.close()


def test_unterminated_tool_output_end_to_end(tmp_path):
    guest = LocalGuest(tmp_path, ss_script="printf 'tcp   LISTEN 0      128   0.0.0.0:22'\n")
    try:
        with pytest.raises(StatsTruncatedError, match="no newline"):
            collect(guest, nics=("lab0",))
    finally:
        close_shell(guest)
        guest.close()


def test_collect_many_in_parallel(tmp_path):
    guests = {"client": LocalGuest(tmp_path / "c", vm="client", snapshot="snapshot-client-idle.txt"),
              "server": LocalGuest(tmp_path / "s")}
    lab = SimpleNamespace(require=lambda: SimpleNamespace(vms=[SimpleNamespace(name=n) for n in guests]),
                          ssh=lambda name: guests[name])
    try:
        before = collect_many(lab, nics=("lab0",))
        after = collect_many(lab, nics=("lab0",))
        assert isinstance(before, LabSnapshot) and list(before) == ["client", "server"]
        assert before["client"].vm == "client" and len(before["server"].sockets) == 41
        assert before.elapsed_ms > 0
        deltas = after - before
        assert set(deltas) == {"client", "server"} and deltas["server"].counter("Tcp.ActiveOpens") == 0
    finally:
        for guest in guests.values():
            close_shell(guest)
            guest.close()


@pytest.fixture(autouse=True)
def _dirs(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "s").mkdir()


def test_bench_measures_parallel_snapshots(tmp_path):
    from harness.perf.snapshots import measure

    guests = {"client": LocalGuest(tmp_path / "c", vm="client", snapshot="snapshot-client-idle.txt"),
              "server": LocalGuest(tmp_path / "s")}
    state = SimpleNamespace(accel="tcg", vms=[SimpleNamespace(name=n) for n in guests])
    lab = SimpleNamespace(require=lambda: state, ssh=lambda name: guests[name])
    try:
        result = measure(lab, repeats=3, nics=("lab0",), pause=0)
        assert len(result.samples) == 3 and result.min_ms <= result.median_ms <= result.max_ms
        assert result.describe().startswith("snapshot of client + server (tcg, ethtool -S on lab0): median ")
    finally:
        for guest in guests.values():
            close_shell(guest)
            guest.close()


def test_a_shell_that_cannot_start_is_reported_and_dropped(tmp_path, monkeypatch):
    collect_module = importlib.import_module("harness.stats.collect")  # the package's `collect` is the function

    monkeypatch.setattr(collect_module, "SHELL_COMMAND", "echo 'sh: cannot start' >&2; exit 3")
    guest = LocalGuest(tmp_path)
    try:
        with pytest.raises(StatsError, match=r"server: the stats shell (exited \(3\)|wrote to stderr).*cannot start"):
            collect(guest, nics=("lab0",), timeout=5)
        assert guest.channels[0].closed
    finally:
        close_shell(guest)
        guest.close()


def test_the_kept_shell_is_stopped_by_the_connection_s_on_close(guest):
    """GuestSSH knows nothing of stats: the collector registers its shell's stop with on_close."""
    collect_mod = importlib.import_module("harness.stats.collect")

    collect(guest, "server")
    assert guest in collect_mod._shells and len(guest.closing) == 1
    collect(guest, "server")
    assert len(guest.closing) == 1, "one shell per connection, registered once"
    guest.closing[0]()
    assert guest not in collect_mod._shells


def test_guest_ssh_close_runs_what_was_registered_once():
    from harness.guest.ssh import GuestSSH

    ssh = GuestSSH("server", 1, Path("/nonexistent"), "ssh-ed25519 AAAA")
    called = []
    ssh.on_close(lambda: called.append("stats shell"))
    ssh._client = type("Client", (), {"close": lambda self: called.append("client")})()
    ssh.close()
    ssh.close()
    assert called == ["stats shell", "client"]


def test_the_record_s_sysctl_names_are_the_ones_the_collector_reads():
    """Sysctls.get names come from the record itself; they must be the table the parser reads."""
    from dataclasses import fields

    from harness.stats.snapshot import Sysctls
    from harness.stats.sysctl import SYSCTLS

    assert [(f.metadata["sysctl"], f.name) for f in fields(Sysctls)] == [(s.name, s.attr) for s in SYSCTLS]
