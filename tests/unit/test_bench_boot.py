"""``invoke bench --only boot``: rounds, socklab's boots, the floor and virtme-ng beside them, and the ratios.

The lab, QEMU and vng are faked; what is checked is what the bench does with their times.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from harness.perf import bench, peer


def test_each_round_runs_every_contender_once_starting_one_further_along():
    order: list[str] = []

    def contender(name: str) -> bench.Contender:
        return bench.Contender(name, lambda: order.append(name) or {name: float(len(order))})
    loads = iter([1.0, 2.0, 3.0, 4.0])
    samples, seen = bench.run_rounds([contender("a"), contender("b"), contender("c")], 3, say=lambda _: None,
                                     load=lambda: next(loads))
    assert order == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert samples == {"a": [1.0, 6.0, 8.0], "b": [2.0, 4.0, 9.0], "c": [3.0, 5.0, 7.0]}
    assert seen == [1.0, 2.0, 3.0, 4.0]  # before each round and after the last


def test_an_optional_contender_that_cannot_run_is_dropped_with_one_line():
    said: list[str] = []
    runs = {"peer": 0}

    def failing() -> dict[str, float]:
        runs["peer"] += 1
        raise peer.PeerError("virtme-ng exited 255: no virtio-fs")
    peer_contender = bench.Contender("virtme-ng", failing, optional=True)
    samples, _ = bench.run_rounds([bench.Contender("floor", lambda: {"floor": 3.0}), peer_contender], 3,
                                  say=said.append, load=lambda: 0.5)
    assert samples == {"floor": [3.0, 3.0, 3.0]} and runs["peer"] == 1
    assert said == ["  virtme-ng: cannot run here (virtme-ng exited 255: no virtio-fs); the bench goes on without it"]
    assert peer_contender.failed == "virtme-ng exited 255: no virtio-fs"


def test_a_floor_that_fails_stops_the_bench():
    def failing() -> dict[str, float]:
        raise peer.PeerError("the floor's QEMU ended without printing its line")
    with pytest.raises(peer.PeerError):
        bench.run_rounds([bench.Contender("floor", failing)], 2, say=lambda _: None, load=lambda: 0.0)


class FakeLab:
    """``up`` returns scripted states (cold boots and restores); ``down`` is counted; ``boots`` gives one Boot."""

    def __init__(self, seconds: dict[tuple[str, bool], float], restores: bool = True, accel: str = "tcg") -> None:
        self.seconds, self.restores, self.accel = seconds, restores, accel
        self.calls: list[tuple[str, str, bool]] = []
        self.up_now = 0

    def up(self, topology_name: str = "default", cold: bool = False):
        assert self.up_now == 0, "a lab up while another runs"
        self.up_now += 1
        self.calls.append(("up", topology_name, cold))
        mode = "cold boot" if cold or not self.restores else "restored from snapshot"
        return SimpleNamespace(boot_seconds=self.seconds.get((topology_name, cold), 1.0), boot_mode=mode,
                               accel=self.accel), True

    def down(self):
        self.up_now -= 1
        self.calls.append(("down", "", False))
        return []

    def boots(self, topo):
        image = SimpleNamespace(kernel_release="6.1", kernel=Path("/c/vmlinuz"), rootfs=Path("/c/rootfs.ext4"))
        return {"server": SimpleNamespace(kernel=Path("/c/vmlinuz"), initrd=Path("/c/initrd.img"), image=image)}


def test_socklab_boots_time_a_cold_boot_then_a_restore_and_the_whole_up():
    lab = FakeLab({("default", True): 8.0, ("default", False): 2.0})
    measured = bench.socklab_boots(lab, "default", "cold", "warm", "up")()  # type: ignore[arg-type]
    assert measured["cold"] == 8.0 and measured["warm"] == 2.0 and 0 <= measured["up"] < 1
    assert lab.calls == [("up", "default", True), ("down", "", False), ("up", "default", False), ("down", "", False)]


def test_a_warm_up_that_booted_cold_is_not_counted_as_a_restore():
    lab = FakeLab({}, restores=False)
    with pytest.raises(RuntimeError, match="expected a restore, got a cold boot"):
        bench.socklab_boots(lab, "single", "cold", "warm")()  # type: ignore[arg-type]


@pytest.fixture
def fake_peer(monkeypatch, tmp_path):
    """The floor takes 3 s, virtme-ng 16 s with its defaults and 12 s in socklab's shape; returns the vng argvs."""
    vng_runs: list[list[str]] = []
    floors: list[list[str]] = []
    monkeypatch.setattr(peer, "time_floor", lambda argv: floors.append(argv) or 3.0)
    monkeypatch.setattr(peer, "peer_problem", lambda workdir: peer.Peer("/venv/bin/vng", note="test"))
    monkeypatch.setattr(peer, "version", lambda found: "virtme-ng 1.42")
    monkeypatch.setattr(peer, "stage_kernel", lambda img, workdir: Path(workdir, "boot/vmlinuz-6.1"))

    def time_vng(found, argv, cwd):
        vng_runs.append(argv)
        return 12.0 if "--cpus" in argv else 16.0
    monkeypatch.setattr(peer, "time_vng", time_vng)
    monkeypatch.setattr(bench, "load_1min", lambda: 2.5)
    return SimpleNamespace(vng_runs=vng_runs, floors=floors)


SECONDS = {("default", True): 8.0, ("default", False): 2.0, ("single", True): 6.0, ("single", False): 1.5}


def test_the_boot_section_puts_the_floor_and_virtme_ng_beside_socklab_with_ratios(fake_peer):
    result = bench.Bench()
    bench.bench_boot(result, FakeLab(SECONDS), 2)  # type: ignore[arg-type]
    medians = {figure.name: figure.median for figure in result.figures}
    assert medians[bench.COLD2] == 8.0 and medians[bench.WARM2] == 2.0 and medians[bench.COLD1] == 6.0
    assert medians[bench.FLOOR] == 3.0 and medians[bench.PEER] == 16.0 and medians[bench.PEER_SHAPED] == 12.0
    ratios = {ratio.name: round(ratio.value, 3) for ratio in result.ratios}
    assert ratios == {"socklab cold (1 VM) / floor": 2.0, "socklab cold (2 VMs) / floor": 2.667,
                      "socklab cold (1 VM) / virtme-ng in socklab's shape": 0.5,
                      "socklab cold (1 VM) / virtme-ng defaults": 0.375,
                      "socklab warm (1 VM, SSH-ready) / floor": 0.5,
                      "socklab warm (whole lab.up, 2 VMs) / floor": pytest.approx(medians[bench.UP2] / 3.0, abs=1e-3)}
    assert len(fake_peer.vng_runs) == 4 and len(fake_peer.floors) == 2  # two rounds, each contender once
    assert result.host["peer"] == "virtme-ng 1.42, test" and result.host["boot_loads"] == [2.5, 2.5, 2.5]


def test_the_floor_gets_the_labs_kernel_and_shape(fake_peer):
    bench.bench_boot(bench.Bench(), FakeLab(SECONDS), 1)  # type: ignore[arg-type]
    argv = fake_peer.floors[0]
    assert argv[argv.index("-kernel") + 1] == "/c/vmlinuz" and argv[argv.index("-initrd") + 1] == "/c/initrd.img"
    assert argv[argv.index("-accel") + 1] == "tcg" and argv[argv.index("-m") + 1] == "512"
    assert argv[argv.index("-smp") + 1] == "1"
    shaped = next(run for run in fake_peer.vng_runs if "--cpus" in run)
    assert "--disable-kvm" in shaped and shaped[shaped.index("--memory") + 1] == "512M"


def test_without_virtme_ng_the_boot_section_says_so_once_and_leaves_its_ratios_out(fake_peer, monkeypatch, capsys):
    monkeypatch.setattr(peer, "peer_problem", lambda workdir: "virtme-ng is not installed (pip install 'socklab[peer]')")
    result = bench.Bench()
    bench.bench_boot(result, FakeLab(SECONDS), 2)  # type: ignore[arg-type]
    names = {figure.name for figure in result.figures}
    assert bench.FLOOR in names and bench.PEER not in names and bench.PEER_SHAPED not in names
    assert [ratio.name for ratio in result.ratios] == [
        "socklab cold (1 VM) / floor", "socklab cold (2 VMs) / floor",
        "socklab warm (1 VM, SSH-ready) / floor", "socklab warm (whole lab.up, 2 VMs) / floor"]
    assert capsys.readouterr().err.count("virtme-ng is not installed") == 1
    assert fake_peer.vng_runs == []


def test_ratios_go_into_the_json_with_the_load_at_both_ends(tmp_path):
    result = bench.Bench(host={"load_1min": 1.5, "load_1min_end": 3.0})
    result.add(bench.Figure("a", "s", (4.0, 6.0)))
    result.add(bench.Figure("b", "s", (2.0,)))
    result.add_ratio("a / b", "a", "b")
    result.add_ratio("a / missing", "a", "missing")
    data = json.loads(bench.save(result, tmp_path).read_text())
    assert data["ratios"] == [{"name": "a / b", "numerator": "a", "denominator": "b", "value": 2.5}]
    assert bench.load_span(result) == "load 1.5 → 3.0"
    assert bench.ratios_table(result).row_count == 1


def test_a_kernel_whose_modules_cannot_be_staged_leaves_virtme_ng_out_in_one_line(fake_peer, monkeypatch, capsys):
    def cannot(img, workdir):
        raise peer.PeerError("could not copy the modules of 6.1 out of /c/rootfs.ext4: Bad magic number")
    monkeypatch.setattr(peer, "stage_kernel", cannot)
    result = bench.Bench()
    bench.bench_boot(result, FakeLab(SECONDS), 1)  # type: ignore[arg-type]
    assert bench.PEER not in {figure.name for figure in result.figures} and fake_peer.vng_runs == []
    assert result.host["peer"].startswith("skipped: could not copy the modules")
    assert capsys.readouterr().err.count("the bench goes on without it") == 1
