"""The soak's counting, on a fake /proc, a fake `ip` and a fake lab: no VM."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from harness.errors import LabError
from harness.paths import Paths
from harness.vm.qemu import QEMU
from harness.perf.soak import Counts, LeakFound, Probe, settled_counts, soak

LAB_ID = "abc123"


class FakeHost:
    """A /proc tree, `ip` output and a thread count that a test changes as a lab would."""

    def __init__(self, root: Path, run_dir: Path) -> None:
        self.proc = root / "proc"
        (self.proc / "self" / "fd").mkdir(parents=True)
        self.run_dir = run_dir
        self.links = ["1: lo: <LOOPBACK,UP> mtu 65536", "2: eth0: <BROADCAST,UP> mtu 1500"]
        self.netns_links: list[str] = []
        self.namespaces: list[str] = []
        self.thread_count = 1
        self.fds = 0
        self.next_pid = 1000

    def probe(self) -> Probe:
        return Probe(proc=self.proc, ip=self.ip, threads=lambda: self.thread_count)

    def ip(self, argv: list[str]) -> str:
        if argv[1:] == ["netns", "list"]:
            return "".join(f"{name} (id: {i})\n" for i, name in enumerate(self.namespaces))
        if argv[1] == "-n":
            return "\n".join(self.netns_links)
        return "\n".join(self.links)

    def process(self, cmdline: list[str], state: str = "S") -> int:
        self.next_pid += 1
        entry = self.proc / str(self.next_pid)
        entry.mkdir()
        (entry / "cmdline").write_bytes(b"\0".join(part.encode() for part in cmdline) + b"\0")
        (entry / "status").write_bytes(f"Name:\tx\nState:\t{state} (x)\n".encode())
        return self.next_pid

    def open_fd(self) -> None:
        self.fds += 1
        (self.proc / "self" / "fd" / str(self.fds)).write_text("")

    def close_fds(self) -> None:
        for entry in (self.proc / "self" / "fd").iterdir():
            entry.unlink()
        self.fds = 0

    def start_lab(self) -> None:
        """What a running lab looks like from the host."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "lab.json").write_text("{}")
        (self.run_dir / "server.qcow2").write_text("")
        self.pids = [self.process([QEMU, "-name", "socklab-server", "-drive", f"file={self.run_dir}/server.qcow2"])]
        self.namespaces.append(f"socklab-{LAB_ID}")
        self.netns_links = [f"5: sl{LAB_ID}1@if2: <BROADCAST,UP> mtu 1500 master br-lab", "1: br-lab: <UP>"]
        self.open_fd()
        self.thread_count += 2

    def stop_lab(self, leave: set[str] = frozenset()) -> None:
        """``down``; whatever is named in ``leave`` stays behind (the leak under test)."""
        if "qemu" not in leave:
            for pid in self.pids:
                for child in (self.proc / str(pid)).iterdir():
                    child.unlink()
                (self.proc / str(pid)).rmdir()
        if "netns" not in leave:
            self.namespaces.clear()
            self.netns_links = []
        if "run_files" not in leave:
            for child in self.run_dir.iterdir():
                child.unlink()
            self.run_dir.rmdir()
        if "fds" not in leave:
            self.close_fds()
        if "threads" not in leave:
            self.thread_count -= 2


@pytest.fixture
def host(tmp_path):
    return FakeHost(tmp_path, tmp_path / "home" / "run")


def test_counts_see_a_running_lab_and_nothing_of_others(host):
    probe = host.probe()
    empty = probe.counts(LAB_ID, host.run_dir)
    assert empty == Counts(qemu=0, taps=0, netns=0, fds=0, threads=1, run_files=0)
    # Another lab's QEMU, another lab's tap, a QEMU that is a zombie, a process that only mentions the dir.
    host.process([QEMU, "-drive", "file=/elsewhere/run/server.qcow2"])
    host.process([QEMU, "-drive", f"file={host.run_dir}/old.qcow2"], state="Z")
    host.process(["tail", "-f", f"{host.run_dir}/server.console.log"])
    host.links.append("9: slzzzzzz0: <BROADCAST> mtu 1500")
    assert probe.counts(LAB_ID, host.run_dir) == empty
    host.start_lab()
    assert probe.counts(LAB_ID, host.run_dir) == Counts(qemu=1, taps=1, netns=1, fds=1, threads=3, run_files=2)


def test_a_tap_left_in_the_root_namespace_is_counted(host):
    host.links.append(f"7: sl{LAB_ID}0: <BROADCAST,MULTICAST> mtu 1500 state DOWN")
    assert host.probe().counts(LAB_ID, host.run_dir).taps == 1


def test_differences_name_each_count_off_the_baseline():
    baseline = Counts(qemu=0, taps=0, netns=0, fds=6, threads=1, run_files=0)
    assert baseline.differences(baseline) == {}
    later = Counts(qemu=1, taps=0, netns=0, fds=8, threads=1, run_files=0)
    assert later.differences(baseline) == {"qemu": (0, 1), "fds": (6, 8)}
    assert later.line() == "qemu=1 taps=0 netns=0 fds=8 threads=1 run_files=0"


def test_settling_waits_for_a_count_that_comes_back(host):
    """A QEMU still being reaped right after down is not a leak if it is gone a moment later."""
    probe = host.probe()
    baseline = probe.counts(LAB_ID, host.run_dir)
    host.start_lab()
    now = [0.0]

    def sleep(seconds):
        now[0] += seconds
        if now[0] >= 0.3:
            host.stop_lab()

    counts = settled_counts(probe, FakeLab(host), baseline, settle=3.0, clock=lambda: now[0], sleep=sleep)
    assert counts == baseline and 0.3 <= now[0] < 1


def test_settling_gives_up_on_a_real_leak(host):
    probe = host.probe()
    baseline = probe.counts(LAB_ID, host.run_dir)
    host.open_fd()
    now = [0.0]
    counts = settled_counts(probe, FakeLab(host), baseline, settle=2.0, clock=lambda: now[0],
                            sleep=lambda s: now.__setitem__(0, now[0] + s))
    assert counts.differences(baseline) == {"fds": (0, 1)} and now[0] >= 2.0


class FakeLab:
    """up/down change the fake host as the real ones change the real one; ``leak`` picks what down forgets."""

    def __init__(self, host: FakeHost, leak_on: dict[int, set[str]] | None = None) -> None:
        self.host = host
        self.id = LAB_ID
        self.run_dir = host.run_dir
        self.paths = Paths(images=host.run_dir.parent, home=host.run_dir.parent)
        self.leak_on = leak_on or {}
        self.cycle = 0
        self.running = False

    def load(self):
        return {} if self.running else None

    def up(self, topology, accel="auto"):
        self.cycle += 1
        self.host.start_lab()
        self.running = True

    def down(self):
        if self.running:
            self.host.stop_lab(self.leak_on.get(self.cycle, set()))
            self.running = False


def _soak(host, lab, cycles, **options):
    lines = []
    report = soak(lambda: lab, cycles=cycles, lab_name="03-listen", probe=host.probe(), say=lines.append,
                  check_lab=lambda lab, spec: "pass", settle=0, **options)
    return report, lines


def test_clean_cycles_pass_and_print_the_counts_of_each(host):
    report, lines = _soak(host, FakeLab(host), 3)
    assert report.ok and report.leaks == [] and len(report.cycles) == 3
    report.assert_clean()
    assert lines[1] == "baseline : qemu=0 taps=0 netns=0 fds=0 threads=1 run_files=0"
    assert [line.split(":")[0] for line in lines[2:5]] == ["cycle   1", "cycle   2", "cycle   3"]
    assert all(line.endswith("clean") for line in lines[2:5])
    assert "every count back to the baseline after every cycle" in lines[-1]


@pytest.mark.parametrize("leak", ["qemu", "netns", "run_files", "fds", "threads"])
def test_each_kind_of_leak_is_caught_in_the_cycle_it_happens(host, leak):
    report, lines = _soak(host, FakeLab(host, {2: {leak}}), 3)
    assert not report.ok
    leaky = [cycle.index for cycle in report.cycles if cycle.leaks]
    assert leaky[0] == 2  # cycle 1 was clean; cycle 3 may still show it, or (a netns) clear it up
    assert leak in report.cycles[1].leaks
    assert "LEAK " in lines[3] and f"{leak} " in lines[3].split("LEAK ")[1]
    with pytest.raises(LeakFound, match=f"cycle 2: .*{leak}"):
        report.assert_clean()


def test_stop_on_leak_ends_the_soak_at_the_first_leak(host):
    report, _ = _soak(host, FakeLab(host, {1: {"fds"}}), 5, stop_on_leak=True)
    assert len(report.cycles) == 1 and report.leaks == ["cycle 1: fds 0→1"]


def test_a_failing_cycle_is_recorded_and_the_lab_still_brought_down(host):
    lab = FakeLab(host)
    original_up = lab.up

    def up(topology, accel="auto"):
        original_up(topology, accel)
        if lab.cycle == 2:
            raise LabError("server never became reachable over SSH (boom)\nconsole's last lines: ...")

    lab.up = up
    report, lines = _soak(host, lab, 3)
    assert report.errors == ["cycle 2: server never became reachable over SSH (boom)"]
    assert report.leaks == [] and not report.ok
    assert "ERROR server never became reachable" in lines[3]


def test_a_soak_refuses_to_start_on_a_running_lab(host):
    lab = FakeLab(host)
    lab.running = True
    with pytest.raises(LabError, match="a lab is already running"):
        _soak(host, lab, 1)


def test_the_real_probe_counts_this_process(tmp_path):
    counts = Probe().counts("zzzzzz", tmp_path / "run")
    assert counts.qemu == 0 and counts.netns == 0 and counts.run_files == 0
    assert counts.fds == len(os.listdir("/proc/self/fd")) and counts.threads >= 1
