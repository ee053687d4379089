"""Ready snapshots on real guests: a restored lab works like a cold one, and restores do not share state."""

from __future__ import annotations

import time

import pytest

from harness.lab.lifecycle import Lab
from tests.live.ownhome import own_home

pytestmark = pytest.mark.vm


@pytest.fixture
def own_lab(lab, tmp_path):
    """A second lab of its own (own home and netns, same image and snapshots); always stopped."""
    own = Lab(own_home(lab.paths, tmp_path / "home"))
    yield own
    own.down()


def check_like_a_cold_lab(lab: Lab) -> None:
    state = lab.require()
    # Its snapshot kept a wake listener on ttyS1: no guest had to be woken by an exec over SSH.
    assert lab.woken_by == {vm.name: "serial" for vm in state.vms}, lab.woken_by
    for vm in state.vms:
        guest = lab.ssh(vm.name)
        for peer in (p for p in state.vms if p.name != vm.name):
            guest.run(f"timeout 5 bash -c '</dev/tcp/{peer.address}/22'", timeout=15, check=True)
        skew = abs(float(guest.run("date +%s.%N", check=True).stdout) - time.time())
        assert skew < 5, f"{vm.name}'s clock is {skew:.1f} s off after {state.boot_mode}"
        if state.segment == "tap":
            assert "scatter-gather: on" in guest.run("ethtool -k lab0", check=True).stdout


def test_two_restores_in_a_row_are_independent(own_lab):
    state, _ = own_lab.up("default")
    if state.boot_mode == "cold boot":  # no snapshot existed yet: this boot saved one
        own_lab.down()
        state, _ = own_lab.up("default")
    assert state.boot_mode == "restored from snapshot"
    check_like_a_cold_lab(own_lab)
    own_lab.ssh("client").run("echo first > /root/left-by-first-run", check=True)
    # Both runs resume the same saved crng state; lab.up reseeds it from the host.
    first_random = own_lab.ssh("client").run("head -c 16 /dev/urandom | od -An -tx1", check=True).stdout
    own_lab.down()

    state, _ = own_lab.up("default")
    assert state.boot_mode == "restored from snapshot"
    check_like_a_cold_lab(own_lab)
    assert own_lab.ssh("client").run("test -e /root/left-by-first-run").exit_status == 1
    assert own_lab.ssh("client").run("head -c 16 /dev/urandom | od -An -tx1", check=True).stdout != first_random


def test_a_one_vm_lab_restores_too(own_lab):
    """A guest with no peer to reach is woken as well (its wake once failed to compile and fell back)."""
    state, _ = own_lab.up("single")
    if state.boot_mode == "cold boot":
        own_lab.down()
        state, _ = own_lab.up("single")
    assert state.boot_mode == "restored from snapshot"
    check_like_a_cold_lab(own_lab)
