"""Faults of the lab's life cycle: a paused or stopped guest, socklab killed while it saves the ready
snapshots, two checks at once on one lab, two labs at once (two names in one checkout, and two
checkouts that share a relative SOCKLAB_HOME), a full guest file system, and a forced image rebuild
that cannot reach its mirror. Each one is reported within seconds, loses nothing, and touches no
other lab."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from harness.image import build as image
from harness.vm import qemu
from harness.vm import vmstate as snapshot
from harness.lab.lifecycle import Lab
from harness.paths import REPO_ROOT, Paths
from harness.scenario.check import LabSpec

from .conftest import DETECTION_LIMIT, LABS, CheckInThread, assert_recovers, leftovers, make_home

# One worker runs the module (--dist loadgroup): its fault lab boots once, not once per worker.
pytestmark = [pytest.mark.vm, pytest.mark.xdist_group("lifecycle-faults")]

HOLD = LabSpec.load(str(LABS / "hold"))


def _invoke(home: Path, *args: str, cwd: Path = REPO_ROOT, env: dict | None = None) -> subprocess.Popen:
    # The lab named 'default' of ``home``: the session's SOCKLAB_LAB names a lab of another home.
    # Its reports go beside that home, not into the checkout's results/ (lab.check writes one per run).
    environ = {**os.environ, "SOCKLAB_HOME": str(home), "SOCKLAB_LAB": "default", "COLUMNS": "200",
               "SOCKLAB_RESULTS": str(Path(cwd, home).parent / "results"), **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "invoke", "--search-root", str(REPO_ROOT), *args], cwd=cwd,
                            env=environ, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)


def _stop_during_hold(lab: Lab, inject, undo) -> tuple[str, float]:
    run = CheckInThread(lab, HOLD).start()
    run.reached("ready")
    time.sleep(0.5)  # inside the 8 s poll()
    injected = time.monotonic()
    inject()
    try:
        run.join(DETECTION_LIMIT + 20)
    finally:
        undo()
    assert run.error is None, f"check raised instead of reporting: {run.error!r}"
    error = run.report.runs[0].error
    assert error, "the paused guest went unnoticed"
    seconds = run.finished_at - injected
    print(f"\n[{seconds:.2f} s] {error}")
    return error, seconds


def test_a_sigstopped_qemu_is_reported_as_stopped_within_10_s(faulty):
    server = faulty.require().vm("server")
    error, seconds = _stop_during_hold(faulty, lambda: os.kill(server.pid, signal.SIGSTOP),
                                       lambda: os.kill(server.pid, signal.SIGCONT))
    assert seconds < DETECTION_LIMIT
    assert f"QEMU of server (pid {server.pid}) is stopped (process state T" in error
    assert f"kill -CONT {server.pid}" in error
    assert_recovers(faulty)


def test_a_guest_paused_over_qmp_is_reported_as_paused_within_10_s(faulty):
    server = faulty.require().vm("server")
    error, seconds = _stop_during_hold(faulty, lambda: qemu.qmp_command(Path(server.qmp), "stop"),
                                       lambda: qemu.qmp_command(Path(server.qmp), "cont"))
    assert seconds < DETECTION_LIMIT
    assert "the guest server is not running: QMP says 'paused'" in error
    assert_recovers(faulty)


def test_socklab_killed_while_saving_snapshots_leaves_no_ready_lab_and_no_half_snapshot(faulty):
    """SIGKILL of `invoke lab.up` during the save: the next up cleans the paused VMs and the leftovers."""
    store = snapshot.SavedVMStore(image.find(faulty.paths).directory)
    keys = [vm.snapshot for vm in faulty.require().vms]
    assert all(keys), "the lab's state names no snapshot key"
    # This lab's ready snapshots are moved aside, so that the next up boots cold and saves; they come
    # back for the up after the kill, which then restores instead of booting cold a second time. Those
    # of other setups stay (the 'single' topology's, which the next tests restore). A directory without
    # a meta.json is no snapshot to SavedVMStore, and no '.tmp-' leftover either.
    aside = store.root / f".aside-{os.getpid()}"
    aside.mkdir()

    def put_back() -> None:
        for kept in list(aside.iterdir()):
            shutil.rmtree(store.root / kept.name, ignore_errors=True)  # saved before the kill came
            kept.rename(store.root / kept.name)
        aside.rmdir()

    try:
        faulty.down()
        for key in keys:
            (store.root / key).rename(aside / key)
        # A save of both guests takes well under a second now: a kill can come too late, after the
        # lab was marked ready. Such a try proves nothing and is made again; one must land mid-save.
        for _attempt in range(3):
            faulty.down()
            for key in keys:
                shutil.rmtree(store.root / key, ignore_errors=True)  # saved by a kill that came too late
            proc = _invoke(faulty.paths.home, "lab.up", env={"SOCKLAB_IMAGES": str(faulty.paths.images)})
            deadline = time.monotonic() + 180
            while not list(store.root.glob(".tmp-*")):
                assert proc.poll() is None, proc.stdout.read()
                assert time.monotonic() < deadline, "the save never started"
                time.sleep(0.01)
            time.sleep(0.05)  # into writing the first guest's RAM
            proc.kill()
            proc.wait()
            state = faulty.load()
            assert state is not None
            if not state.ready:
                break
        assert not state.ready, "three kills in a row came after the save had finished"
        statuses = [qemu.qmp_command(Path(vm.qmp), "query-status")["status"] for vm in state.vms
                    if faulty.owned(vm)]
        print(f"\nafter the kill: ready={state.ready}, guests {statuses}, leftovers "
              f"{[p.name for p in store.root.glob('.tmp-*')]}")
    finally:
        put_back()
    started = time.monotonic()
    state, booted = faulty.up("default")
    print(f"next lab.up: {time.monotonic() - started:.1f} s ({state.boot_mode})")
    assert booted and state.ready and all(faulty.alive(state).values())
    assert state.boot_mode == "restored from snapshot"  # the leftovers went, the whole snapshots stayed usable
    assert not list(store.root.glob(".tmp-*"))
    for vm in state.vms:
        assert qemu.qmp_command(Path(vm.qmp), "query-status")["status"] == "running"
        assert faulty.ssh(vm.name).run("hostname", check=True).stdout.strip() == vm.name


def test_two_checks_at_once_take_turns_and_both_pass(faulty):
    """Both bind port 7400 on the server: had they run at once, one would see EADDRINUSE.

    The second starts once the first holds the lab (its pid in use.lock), and the first holds it for
    at least the 3 s poll() of the hold lab: a check that ends before the second starts proves nothing.
    """
    home = faulty.paths.home
    env = {"SOCKLAB_IMAGES": str(faulty.paths.images)}
    hold = ("lab.check", str(LABS / "hold"), "--param", "wait_ms=3000")
    first = _invoke(home, *hold, env=env)
    use_lock = faulty.dir / "use.lock"
    deadline = time.monotonic() + 60
    while (use_lock.read_text() if use_lock.exists() else "").split("\n")[0] != f"pid {first.pid}":
        assert first.poll() is None and time.monotonic() < deadline, "the first check never took the lab"
        time.sleep(0.05)
    second = _invoke(home, *hold, env=env)
    outputs = [proc.communicate(timeout=180)[0] for proc in (first, second)]
    assert [first.returncode, second.returncode] == [0, 0], outputs
    waited = [out for out in outputs if "waiting for another socklab command (pid" in out]
    assert len(waited) == 1 and "which is using lab 'default'" in waited[0]
    assert all("EADDRINUSE" not in out for out in outputs)


def test_two_names_in_one_checkout_run_side_by_side_and_never_touch_each_other(faulty):
    """down, a failed up and a crash cleanup of lab 'second' leave the lab 'default' of the same home running."""
    default = faulty.require()
    second = Lab(faulty.paths, "second")
    try:
        state, _ = second.up("single")
        assert state.netns != default.netns and {vm.ssh_port for vm in state.vms}.isdisjoint(
            {vm.ssh_port for vm in default.vms})
        assert set(second.qemu_pids()).isdisjoint(faulty.qemu_pids())
        # Crash cleanup: its QEMU dies, the next up of 'second' cleans up first.
        os.kill(state.vms[0].pid, signal.SIGKILL)
        second.up("single")
        # A failed up: nothing answers within the deadline, and the cleanup runs.
        second.down()
        with pytest.raises(Exception):  # noqa: B017 - whichever error a failed up() raises, it must raise
            second.up("single", boot_timeout=0.5, cold=True)
        second.down()
        assert second.qemu_pids() == [] and not second.run_dir.exists()
        assert not leftovers(second)["netns"] and leftovers(second)["taps"] == []
        assert faulty.alive(faulty.require()) == {"client": True, "server": True}
        for vm in default.vms:
            assert faulty.ssh(vm.name).run("hostname", check=True).stdout.strip() == vm.name
    finally:
        second.down()



@pytest.fixture
def short_tmp():
    """A directory with a short path: QEMU's unix sockets (QMP, console) under it must stay below the
    108-byte sun_path limit, which pytest-xdist's tmp_path (…/popen-gwN/test_…/checkout/.socklab/run/)
    overruns."""
    directory = Path(tempfile.mkdtemp(prefix="sl-"))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_two_checkouts_with_the_same_relative_home_never_touch_each_other(faulty, short_tmp):
    """SOCKLAB_HOME=.socklab from two directories: two homes, two keys; one's down leaves the other's QEMUs."""
    other_checkout = short_tmp / "checkout"
    other_checkout.mkdir()
    home = make_home(other_checkout / ".socklab").home
    env = {"SOCKLAB_IMAGES": str(faulty.paths.images)}
    up = _invoke(Path(".socklab"), "lab.up", "--topology", "single", cwd=other_checkout, env=env)
    assert up.communicate(timeout=180)[0] and up.returncode == 0
    other = Lab(Paths(images=faulty.paths.images, home=home))
    try:
        assert other.key != faulty.key and all(other.alive(other.require()).values())
        mine = set(faulty.qemu_pids())
        down = _invoke(Path(".socklab"), "lab.down", cwd=other_checkout, env=env)
        out = down.communicate(timeout=60)[0]
        assert down.returncode == 0 and "not in state" not in out, out
        assert set(faulty.qemu_pids()) == mine and all(faulty.alive(faulty.require()).values())
    finally:
        other.down()


def test_a_full_guest_file_system_is_named(faulty):
    guest = faulty.ssh("server")
    guest.run("rm -rf /run/socklab/agent; dd if=/dev/zero of=/run/fill bs=1M 2>/dev/null; true", timeout=60)
    try:
        run = CheckInThread(faulty, HOLD).start()
        run.join(DETECTION_LIMIT + 20)
        error = run.report.runs[0].error
        print(f"\n{error}")
        assert "the guest's /run is full (0 KiB free)" in error
        assert "the agent process itself ended" not in error
    finally:
        guest.run("rm -f /run/fill", timeout=30)
    assert_recovers(faulty)


def test_a_forced_rebuild_that_cannot_reach_its_mirror_keeps_the_old_image_and_snapshots(faulty, tmp_path):
    """images.build --force with a mirror on 127.0.0.1 that refuses: the error says why, the lab still comes up."""
    cache = tmp_path / "cache"
    cache.mkdir()
    entry = image.find(faulty.paths).directory
    subprocess.run(["cp", "-al", str(entry), str(cache / entry.name)], check=True)

    def files() -> dict[str, tuple[int, int, int]]:
        """Each file of the copied entry: (inode, size, mtime): a rewrite, a replacement or a removal shows."""
        return {str(p.relative_to(cache)): (st.st_ino, st.st_size, st.st_mtime_ns)
                for p in sorted((cache / entry.name).rglob("*")) for st in [p.lstat()]}

    before = files()
    listener = __import__("socket").socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.close()  # nothing listens there now: connections are refused
    env = {"SOCKLAB_IMAGES": str(faulty.paths.images), "SOCKLAB_CACHE": str(cache)}
    started = time.monotonic()
    build = _invoke(faulty.paths.home, "images.build", "--force", "--mirror", f"http://127.0.0.1:{port}/debian",
                    env=env)
    out = build.communicate(timeout=300)[0]
    seconds = time.monotonic() - started
    print(f"\n[{seconds:.1f} s] {out.strip().splitlines()[-1] if out.strip() else ''}")
    assert build.returncode == 2, out
    message = " ".join(out.split())
    assert "socklab: mmdebstrap failed" in message and "full log:" in message
    assert "127.0.0.1" in message and ("E:" in message or "refused" in message.lower())
    # The same files, untouched: a hash of the 700 MB (damaged(full=True), 2.6 s of CPU) could tell no more.
    assert files() == before
    assert image.Image.load(cache / entry.name).damaged() == []
    assert [p.name for p in cache.iterdir() if p.name.startswith(".tmp-")] == []
    # The lab still comes up on it, from its snapshots.
    faulty.down()
    # Put back the session's own SOCKLAB_CACHE after (deleting it sent every later test's image
    # look-up to the checkout's images/cache, where the next image.build built a whole image).
    was = os.environ.get("SOCKLAB_CACHE")
    os.environ["SOCKLAB_CACHE"] = str(cache)
    try:
        state, _ = faulty.up("default")
        assert state.image == str(cache / entry.name) and state.boot_mode == "restored from snapshot"
    finally:
        if was is None:
            del os.environ["SOCKLAB_CACHE"]
        else:
            os.environ["SOCKLAB_CACHE"] = was
        faulty.down()
