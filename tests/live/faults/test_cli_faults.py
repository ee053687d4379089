"""Faults around ``invoke lab.up`` itself, as a student meets them: Ctrl-C during the boot, and a
second ``lab.up`` while the first one runs. Each runs the real command in a subprocess on a home
of this module's own."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from harness.lab.lifecycle import Lab
from harness.paths import REPO_ROOT

from .conftest import CLEAN, leftovers, make_home

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def cli_lab(tmp_path_factory):
    lab = Lab(make_home(tmp_path_factory.mktemp("faults-cli") / "home"))
    try:
        yield lab
    finally:
        lab.close()
        lab.down()
        assert leftovers(lab) == CLEAN


def _invoke(lab: Lab, *args: str) -> subprocess.Popen:
    """``invoke ARGS`` on ``lab``'s home, with SIGINT delivered as at a terminal (not ignored as in `cmd &`)."""
    env = {**os.environ, "SOCKLAB_HOME": str(lab.paths.home), "SOCKLAB_IMAGES": str(lab.paths.images),
           "SOCKLAB_LAB": lab.name, "COLUMNS": "200"}
    return subprocess.Popen([sys.executable, "-m", "invoke", *args], cwd=REPO_ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


# A restored lab is up in about 2 s on a quiet host, faster than a signal 3 s in could catch it:
# the SSH-wait case boots cold (11 s or more), so the signal lands while the guests boot.
@pytest.mark.parametrize("after,args", [(0.0, ()), (3.0, ("--cold",))],
                         ids=["while-starting-qemu", "while-waiting-for-ssh"])
def test_ctrl_c_during_lab_up_stops_everything_and_exits_130(cli_lab, after, args):
    """7. SIGINT as the lab's first resources appear, and 3 s into a cold ``invoke lab.up``."""
    started = time.monotonic()
    proc = _invoke(cli_lab, "lab.up", *args)
    # The first resource the lab records (its state file, as the netns is made) marks the boot under way.
    _wait_for(lambda: cli_lab.state_file.exists() or proc.poll() is not None, 60, "lab.up to start the lab")
    time.sleep(after)
    interrupted = time.monotonic()
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=30)
    seconds = time.monotonic() - interrupted
    print(f"\n[SIGINT {interrupted - started:.1f} s into lab.up; exit {proc.returncode} after {seconds:.2f} s]\n"
          + "\n".join(output.strip().splitlines()[-3:]))
    assert proc.returncode == 130, output
    assert "socklab: interrupted; no lab is running (nothing was left started)" in output
    assert seconds < 10
    assert cli_lab.load() is None
    assert leftovers(cli_lab) == CLEAN
    # And the next lab.up works.
    state, started_now = cli_lab.up("default")
    assert started_now and all(cli_lab.alive(state).values())
    cli_lab.close()
    cli_lab.down()


def test_two_lab_ups_at_once_never_make_two_labs(cli_lab):
    """8. Two ``invoke lab.up`` on one home at the same moment: one lab, and the other says why not."""
    first, second = _invoke(cli_lab, "lab.up"), _invoke(cli_lab, "lab.up")
    outputs = [proc.communicate(timeout=180)[0] for proc in (first, second)]
    codes = sorted(proc.returncode for proc in (first, second))
    for proc, output in zip((first, second), outputs):
        print(f"\n[exit {proc.returncode}] " + "\n".join(output.strip().splitlines()[-2:]))
    assert codes in ([0, 0], [0, 2]), outputs
    loser = next((out for proc, out in zip((first, second), outputs) if proc.returncode == 2), None)
    if loser is not None:
        # One line, naming who holds the lock and what it runs.
        line = loser.strip().splitlines()[-1]
        assert line.startswith("socklab: another socklab command is changing this lab (pid ")
        assert "running `invoke lab.up`" in line
    else:
        assert any("a lab is already running; not starting another" in out for out in outputs)
    state = cli_lab.require()
    assert all(cli_lab.alive(state).values())
    assert sorted(cli_lab.qemu_pids()) == sorted(vm.pid for vm in state.vms)  # two QEMUs, the state's

    # While that lab runs, a third lab.up reports it and starts nothing.
    third = _invoke(cli_lab, "lab.up")
    output, _ = third.communicate(timeout=120)
    assert third.returncode == 0 and "a lab is already running; not starting another" in output
    assert sorted(cli_lab.qemu_pids()) == sorted(vm.pid for vm in state.vms)

    # A second lab.up while the first holds the lock (taken for sure) is told who holds it.
    cli_lab.down()
    holder = _invoke(cli_lab, "lab.up")
    lock = cli_lab.paths.home / "lab.lock"
    _wait_for(lambda: lock.exists() and lock.read_text().startswith(f"pid {holder.pid}"), 60, "the first lab.up's lock")
    # A restore takes about a second: in one run with four workers the holder had finished before the
    # late one looked. The holder is stopped while it holds the lock, so the late one finds it held.
    os.kill(holder.pid, signal.SIGSTOP)
    try:
        late = _invoke(cli_lab, "lab.up")
        output, _ = late.communicate(timeout=60)
    finally:
        os.kill(holder.pid, signal.SIGCONT)
    print(f"\n[exit {late.returncode}] {output.strip()}")
    assert late.returncode == 2
    assert output.strip() == output.strip().splitlines()[-1]  # one line
    assert output.startswith(f"socklab: another socklab command is changing this lab (pid {holder.pid}), "
                             "running `invoke lab.up` for ")
    assert holder.wait(timeout=180) == 0
    assert all(cli_lab.alive(cli_lab.require()).values())
