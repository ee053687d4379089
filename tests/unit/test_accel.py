"""The accelerator decision and the KVM probe, with QEMU mocked."""

from __future__ import annotations

import json

import pytest

from harness.host import accel
from harness.errors import LabError

from .fakes import FakePopen

WORKS = accel.ProbeResult(True, "booted to panic in 0.4 s", 0.4)
HANGS = accel.ProbeResult(False, "a KVM guest hung", 8.0)


def never():
    raise AssertionError("the probe must not run")


@pytest.mark.parametrize("requested,device,probe,expected", [
    ("auto", (True, "ok"), WORKS, "kvm"),
    ("auto", (True, "ok"), HANGS, "tcg"),
    ("auto", (False, "/dev/kvm: No such file"), None, "tcg"),
    ("kvm", (True, "ok"), WORKS, "kvm"),
    ("tcg", (True, "ok"), None, "tcg"),
])
def test_decision(requested, device, probe, expected):
    choice = accel.decide(requested, device, (lambda: probe) if probe else never)
    assert choice.accel == expected
    assert choice.reason


def test_auto_fallback_says_why():
    choice = accel.decide("auto", (True, "/dev/kvm opens"), lambda: HANGS)
    assert "hung" in choice.reason and "TCG" in choice.reason


def test_forced_kvm_that_hangs_is_an_error_not_a_hang():
    with pytest.raises(LabError, match="--accel kvm, but KVM does not run guests here"):
        accel.decide("kvm", (True, "ok"), lambda: HANGS)


def test_forced_kvm_without_device_is_an_error():
    with pytest.raises(LabError, match="KVM is unusable"):
        accel.decide("kvm", (False, "/dev/kvm: Permission denied"), never)


def test_unknown_accelerator():
    with pytest.raises(LabError, match="unknown accelerator 'hax'"):
        accel.decide("hax", (True, "ok"), never)


def test_probe_sees_the_panic(tmp_path, monkeypatch):
    def write_panic(argv):
        log = argv[argv.index("-serial") + 1].removeprefix("file:")
        with open(log, "w") as handle:
            handle.write("Linux version 6.1\nKernel panic - not syncing: VFS: Unable to mount root fs\n")

    result = accel.probe_kvm(tmp_path / "vmlinuz", popen=FakePopen(effect=write_panic))
    assert result.boots


def test_probe_times_out_on_a_hang(tmp_path):
    popen = FakePopen(hang=True)
    result = accel.probe_kvm(tmp_path / "vmlinuz", timeout=0.1, popen=popen)
    assert not result.boots and "hung" in result.detail
    assert popen.proc.killed


def test_probe_reports_qemu_failing(tmp_path):
    popen = FakePopen(returncode=1, stderr="Could not access KVM kernel module: Permission denied\n")
    result = accel.probe_kvm(tmp_path / "vmlinuz", popen=popen)
    assert not result.boots and "Permission denied" in result.detail


def test_probe_cached_per_host_boot(tmp_path, monkeypatch):
    cache = tmp_path / "accel-probe.json"
    calls = []
    monkeypatch.setattr(accel, "kvm_device_usable", lambda: (True, "ok"))
    monkeypatch.setattr(accel, "kvm_flavour", lambda: "kvm")
    monkeypatch.setattr(accel, "probe_kvm", lambda kernel: calls.append(kernel) or HANGS)
    monkeypatch.setattr(accel, "boot_id", lambda: "boot-1")
    assert accel.choose("auto", tmp_path / "k", cache).accel == "tcg"
    assert accel.choose("auto", tmp_path / "k", cache).accel == "tcg"
    assert len(calls) == 1
    assert "probed earlier this boot" in accel.choose("auto", tmp_path / "k", cache).reason
    monkeypatch.setattr(accel, "boot_id", lambda: "boot-2")  # host rebooted: probe again
    accel.choose("auto", tmp_path / "k", cache)
    assert len(calls) == 2
    assert json.loads(cache.read_text())["boot_id"] == "boot-2"


def test_a_pvm_host_is_named_and_auto_skips_the_doomed_probe(tmp_path):
    assert accel.kvm_flavour(tmp_path / "kvm_pvm") == "kvm"
    (tmp_path / "kvm_pvm").mkdir()
    assert accel.kvm_flavour(tmp_path / "kvm_pvm") == "pvm"

    def probe():
        raise AssertionError("auto must not probe a PVM host")

    choice = accel.decide("auto", (True, "/dev/kvm opens"), probe, "pvm")
    assert choice.accel == "tcg" and "kvm_pvm" in choice.reason and "--kernel-image" in choice.reason


def test_accel_kvm_on_a_pvm_host_still_probes_the_chosen_kernel():
    boots = accel.ProbeResult(True, "booted", 0.3)
    assert accel.decide("kvm", (True, "ok"), lambda: boots, "pvm").accel == "kvm"
