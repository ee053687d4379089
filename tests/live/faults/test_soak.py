"""Leak-free cycles: up → check → down, three times (the CI budget; `invoke lab.soak` runs 30),
and every count of the lab's QEMUs, taps, netns, run files and of this process's fds and threads
back where it started after each cycle."""

from __future__ import annotations

import pytest

from harness.lab.lifecycle import Lab
from harness.perf.soak import soak

from .conftest import CLEAN, LABS, leftovers, make_home

pytestmark = pytest.mark.vm


def test_three_cycles_leave_nothing_behind(tmp_path):
    paths = make_home(tmp_path / "home")
    report = soak(paths, cycles=3, lab_name=str(LABS / "handshake"))
    print("\n" + report.table())
    assert [cycle.error for cycle in report.cycles] == [None, None, None]
    assert all(cycle.check.startswith("pass") for cycle in report.cycles), report.table()
    assert report.leaks == []
    report.assert_clean()
    assert leftovers(Lab(paths)) == CLEAN
