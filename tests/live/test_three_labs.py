"""Three labs at once on one host (6 VMs): each passes lab 03, and their ``down``s leave nothing.

The labs are named apart (``lab.up --name``) in a home of the test's own and restored from the
snapshot the session's lab made, so the test costs three restores, three lab checks run side by
side and three downs. What each lab created (its netns, taps, QEMU pids and -uuids, run dir,
locks) is written down while it runs and looked for afterwards; nothing is killed to find out.
The memory the six VMs take is printed (docs/scale.md quotes it).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness.lab.lifecycle import Lab
from harness.paths import Paths
from harness.vm import owner
from tests.guideblocks import REPO_ROOT
from tests.live.ownhome import own_home

pytestmark = pytest.mark.vm

LABS = 3
STEP_TIMEOUT = 600.0  # one lab.up, check or down, with three at once under TCG on a loaded host


@dataclass(frozen=True)
class Created:
    """What one lab made on the host, as its state file said while it ran."""

    name: str
    netns: str
    taps: tuple[str, ...]
    pids: tuple[int, ...]
    uuids: tuple[str, ...]
    run_dir: Path
    lock_files: tuple[Path, ...]


def invoke(home: Path, *args: str) -> subprocess.CompletedProcess:
    """``invoke ARGS`` on ``home``, as a user runs it; the reports go to the home, not to results/."""
    env = {**os.environ, "SOCKLAB_HOME": str(home), "SOCKLAB_RESULTS": str(home / "results"), "COLUMNS": "200"}
    env.pop("SOCKLAB_LAB", None)  # the lab is named on the command line
    return subprocess.run([sys.executable, "-m", "invoke", *args], cwd=REPO_ROOT, env=env, text=True,
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          timeout=STEP_TIMEOUT)


def all_at_once(home: Path, names: list[str], *args: str) -> dict[str, subprocess.CompletedProcess]:
    """``invoke ARGS --name NAME`` for every name, side by side."""
    with ThreadPoolExecutor(max_workers=len(names)) as pool:
        runs = {name: pool.submit(invoke, home, *args, "--name", name) for name in names}
        return {name: run.result() for name, run in runs.items()}


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def meminfo_mib(field: str) -> float:
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.M)
    return int(match.group(1)) / 1024 if match else 0.0


def held_locks() -> set[tuple[int, int, int]]:
    """(major, minor, inode) of every file lock held on the host (/proc/locks: ``... PID MAJ:MIN:INODE START END``)."""
    held = set()
    for line in Path("/proc/locks").read_text().splitlines():
        device = next((field for field in line.split() if field.count(":") == 2), None)
        if device is not None:
            major, minor, inode = device.split(":")
            held.add((int(major, 16), int(minor, 16), int(inode)))
    return held


def link_names_in(netns: str = "") -> set[str]:
    argv = ["ip", *(["-n", netns] if netns else []), "-o", "link", "show"]
    links = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in links.splitlines()}


def leftovers(created: Created) -> dict[str, list]:
    """What of ``created`` is still on the host; every list empty when its ``down`` left nothing."""
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout.split()
    # A tap is made in the host's namespace and moved into the lab's: look in both.
    link_names = link_names_in() | (link_names_in(created.netns) if created.netns in netns else set())
    held = held_locks()
    locked = []
    for path in created.lock_files:
        if path.exists():
            st = path.stat()
            if (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino) in held:
                locked.append(str(path))
    qemus = {pid for pid, uuid in zip(created.pids, created.uuids) if owner.owns(pid, uuid)}
    qemus |= set(owner.pids_with_uuid(lambda found: found in created.uuids))
    return {
        "qemu": sorted(qemus),
        "netns": [name for name in netns if name == created.netns],
        "taps": [tap for tap in created.taps if tap in link_names],
        "run_dir": sorted(str(p.relative_to(created.run_dir)) for p in created.run_dir.rglob("*"))
        if created.run_dir.exists() else [],
        "locks_held": locked,
    }


CLEAN = {"qemu": [], "netns": [], "taps": [], "run_dir": [], "locks_held": []}


def test_three_labs_at_once_pass_lab_03_and_leave_nothing(lab, capsys):
    """Six VMs: three `lab.up --name` restores, three `lab.check 03` side by side, three downs."""
    lab.require()  # the session's lab: the image is built and its snapshot saved
    # A short home: QEMU's socket paths under it must stay within 108 bytes.
    home = Path(tempfile.mkdtemp(prefix="sl3-", dir="/tmp"))
    try:
        paths = own_home(Paths.default(), home / "h")
        names = [f"three{index}-{os.getpid() % 100000}" for index in range(LABS)]
        labs = [Lab(paths, name) for name in names]
        figures = run_three(paths, labs)
        with capsys.disabled():
            print(f"\nthree labs at once, load {os.getloadavg()[0]:.1f}: " + "; ".join(figures))
    finally:
        shutil.rmtree(home, ignore_errors=True)  # the test's own home: keys, console logs, reports


def run_three(paths: Paths, labs: list[Lab]) -> list[str]:
    names = [own.name for own in labs]
    started = time.monotonic()
    created: list[Created] = []
    try:
        ups = all_at_once(paths.home, names, "lab.up")
        up_seconds = time.monotonic() - started
        for name, run in ups.items():
            assert run.returncode == 0, f"lab.up --name {name}:\n{run.stdout[-3000:]}"
        states = [own.require() for own in labs]
        for own, state in zip(labs, states):
            created.append(Created(
                own.name, state.netns, tuple(vm.tap for vm in state.vms if vm.tap), tuple(vm.pid for vm in state.vms),
                tuple(vm.uuid for vm in state.vms), own.run_dir, (own.dir / "lab.lock", own.dir / "use.lock")))
            assert state.boot_mode == "restored from snapshot", f"{own.name}: {state.boot_mode}"
            assert all(own.alive(state).values())
        # Apart: no two labs share a netns, a tap, a QEMU or an SSH port.
        for what, values in (("netns", [made.netns for made in created]),
                             ("tap", [tap for made in created for tap in made.taps]),
                             ("QEMU", [pid for made in created for pid in made.pids]),
                             ("SSH port", [vm.ssh_port for state in states for vm in state.vms])):
            assert len(values) == len(set(values)), f"labs share a {what}: {values}"
        for made in created:  # the leftover probe sees a running lab's things, so an empty answer later means gone
            seen = leftovers(made)
            assert len(seen["qemu"]) == 2 and seen["netns"] and len(seen["taps"]) == 2 and seen["run_dir"], seen

        rss = [rss_mib(pid) for made in created for pid in made.pids]
        available, total = meminfo_mib("MemAvailable"), meminfo_mib("MemTotal")
        qemus_on_host = len(owner.pids_with_uuid(lambda found: True))  # every lab's, anyone's, for the figure
        checks_started = time.monotonic()
        checks = all_at_once(paths.home, names, "lab.check", "03")
        check_seconds = time.monotonic() - checks_started
        rss_after = [rss_mib(pid) for made in created for pid in made.pids]
        for name, run in checks.items():
            assert run.returncode == 0, f"lab.check 03 --name {name}:\n{run.stdout[-4000:]}"
    finally:
        downs_started = time.monotonic()
        downs = all_at_once(paths.home, names, "lab.down")
        down_seconds = time.monotonic() - downs_started
    for name, run in downs.items():
        assert run.returncode == 0, f"lab.down --name {name}:\n{run.stdout[-2000:]}"
    for made in created:
        assert leftovers(made) == CLEAN, made.name
    return [f"3 lab.up restores {up_seconds:.1f} s", f"3 lab.check 03 {check_seconds:.1f} s",
            f"3 lab.down {down_seconds:.1f} s", f"whole {time.monotonic() - started:.1f} s",
            f"RSS per VM {min(rss):.0f}-{max(rss):.0f} MiB after the restore, "
            f"{min(rss_after):.0f}-{max(rss_after):.0f} MiB after the checks",
            f"host MemAvailable {available / 1024:.1f} of {total / 1024:.1f} GiB with the 6 VMs up "
            f"({qemus_on_host} QEMUs with a -uuid on the host in all)"]
