"""Fault injection on labs of their own: each test module gets its own socklab home (own lab id, netns,
taps, run dir), so breaking a lab here never breaks the shared session lab of the other live tests."""

from __future__ import annotations

import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from harness.image import build as image
from harness.lab.lifecycle import Lab
from harness.paths import HOME_MARKER, Paths
from harness.scenario.check import CheckReport, LabSpec, check
from harness.guest.ssh import GuestSSH
from tests.live.ownhome import own_home

LABS = Path(__file__).resolve().parent / "labs"
# Every fault must be reported within this many seconds of being injected.
DETECTION_LIMIT = 10.0


def make_home(home: Path) -> Paths:
    """A socklab home of its own: the install's key (so the same cached image) and its KVM verdict."""
    paths = own_home(Paths.default(), home)
    image.build(paths)  # a no-op when the image is cached (it always is once `invoke lab.up` ran)
    return paths


def leftovers(lab: Lab, since: float | None = None) -> dict[str, Any]:
    """Everything of ``lab`` still on the host after ``down``; all empty when nothing leaked."""
    netns = f"socklab-{lab.id}"
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    found = {
        "qemu": lab.qemu_pids(),
        "netns": netns in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout,
        "taps": [line.split(":")[1].strip() for line in links.splitlines() if f": sl{lab.id}" in line],
        "run_dir": lab.run_dir.exists(),
        "overlays": [str(p) for p in lab.paths.home.rglob("*.qcow2")],
        "home": sorted(p.name for p in lab.paths.home.iterdir() if p.name not in
                       {"keys", "accel-probe.json", "lab.lock", "use.lock", "logs", "labs", HOME_MARKER}),
    }
    # A half-written snapshot that stayed (a save in progress elsewhere is younger than a minute).
    snapshots = _image_dir(lab) / "snapshots"
    stale = time.time() - 60
    found["half_written"] = [p.name for p in snapshots.glob(".tmp-*") if p.stat().st_mtime < stale] \
        if snapshots.exists() else []
    return found


CLEAN = {"qemu": [], "netns": False, "taps": [], "run_dir": False, "overlays": [], "home": [], "half_written": []}


def _image_dir(lab: Lab) -> Path:
    try:
        return image.find(lab.paths).directory
    except Exception:  # noqa: BLE001 - no image means no snapshots to look at
        return lab.paths.home / "no-image"


def side_channel(lab: Lab, vm: str) -> GuestSSH:
    """A second SSH connection to ``vm``, apart from the lab's own (which the agents use)."""
    state = lab.require()
    guest = state.vm(vm)
    return GuestSSH(vm, guest.ssh_port, lab.paths.client_key, state.host_key).connect(timeout=30)


def fire(guest: GuestSSH, command: str) -> None:
    """Start ``command`` in the guest and do not wait for it (a panic or a dying sshd never answers)."""
    channel = guest.client.get_transport().open_session()
    channel.exec_command(command)


@dataclass
class CheckInThread:
    """``check(spec, lab)`` in a thread; ``reached(label)`` waits until that step is done."""

    lab: Lab
    spec: LabSpec
    overrides: dict | None = None
    report: CheckReport | None = None
    error: BaseException | None = None
    finished_at: float = 0.0
    step_times: dict[str, float] = field(default_factory=dict)
    _events: dict[str, threading.Event] = field(default_factory=dict)
    _thread: threading.Thread | None = None

    def start(self) -> "CheckInThread":
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            self.report = check(self.spec, self.lab, self.overrides, on_step=self._on_step)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            self.error = exc
        self.finished_at = time.monotonic()

    def _on_step(self, record) -> None:
        label = record.step.label
        if label:
            self.step_times[label] = time.monotonic()
            self._events.setdefault(label, threading.Event()).set()

    def reached(self, label: str, timeout: float = 60.0) -> None:
        event = self._events.setdefault(label, threading.Event())
        if not event.wait(timeout):
            raise AssertionError(f"the check never got past step {label!r} (error: {self.error})")

    def join(self, timeout: float) -> None:
        assert self._thread is not None
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"the check hangs: still running {timeout:.0f} s after the fault"


def ensure_up(lab: Lab) -> None:
    """The lab up and every VM alive; a broken one (a failed test) is brought down and up again."""
    state = lab.load()
    if state is not None and state.ready and all(lab.alive(state).values()):
        return
    lab.down()
    lab.up("default")


def assert_recovers(lab: Lab) -> None:
    """After a fault: ``down`` removes everything, and the next ``up`` gives a working lab."""
    lab.down()
    assert leftovers(lab) == CLEAN
    state, started = lab.up("default")
    assert started and all(lab.alive(state).values())
    for vm in state.vms:
        assert lab.ssh(vm.name).run("hostname", check=True).stdout.strip() == vm.name


@pytest.fixture(scope="module")
def fault_lab(tmp_path_factory):
    """A lab of this module's own, up; brought down at the end, and checked to leave nothing behind."""
    lab = Lab(make_home(tmp_path_factory.mktemp("faults") / "home"))
    lab.up("default")
    try:
        yield lab
    finally:
        lab.close()
        lab.down()
        assert leftovers(lab) == CLEAN


@pytest.fixture
def faulty(fault_lab):
    """The module's lab, up and healthy before each test (whatever the previous test left)."""
    ensure_up(fault_lab)
    return fault_lab
