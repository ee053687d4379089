"""The bounds on every wait: one module, a deadline object, and no unbounded library wait left in the harness."""

from __future__ import annotations

import re

from harness import deadline
from harness.paths import REPO_ROOT


def test_a_deadline_counts_down_and_never_below_zero():
    now = [100.0]
    limit = deadline.Deadline(5.0, clock=lambda: now[0])
    assert limit.remaining() == 5.0 and limit.remaining(at_most=2.0) == 2.0 and not limit.expired
    now[0] = 104.0
    assert limit.remaining() == 1.0
    now[0] = 106.0
    assert limit.remaining() == 0.0 and limit.expired


def test_a_paused_guest_is_noticed_well_within_10_s():
    # The watch's interval plus one QMP probe, with room for the /proc read and a loaded host.
    assert deadline.WATCH_INTERVAL + deadline.QMP_PROBE < 5.0
    assert deadline.SSH_CHANNEL_OPEN <= 5.0  # paramiko's own default is 3,600 s


def test_no_channel_open_in_the_harness_waits_for_paramiko_s_default():
    """Every open_session() passes a timeout; a bare one waits an hour for a paused guest."""
    bare = []
    for path in (REPO_ROOT / "harness").rglob("*.py"):
        if "guest" in path.relative_to(REPO_ROOT / "harness").parts:
            continue  # runs inside the VM
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"open_session\(\s*\)", line):
                bare.append(f"{path.relative_to(REPO_ROOT)}:{number}")
    assert bare == []


def test_every_qmp_await_in_qemu_py_is_bounded():
    text = (REPO_ROOT / "harness/vm/qemu.py").read_text()
    unbounded = [line.strip() for line in text.splitlines()
                 if re.search(r"\bawait client\.", line) and "wait_for" not in line]
    assert unbounded == []
