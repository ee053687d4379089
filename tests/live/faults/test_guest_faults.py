"""Faults inside a running lab, injected while a step runs: each is reported naming the VM and the
cause within seconds, nothing hangs, and afterwards ``down`` leaves nothing and the next ``up`` works.

The check runs in a thread on ``labs/hold`` (the server sits 8 s in poll()) or ``labs/cross`` (the
client connects to the server over lab0); the test injects the fault from outside, the way a student
or a crashing guest would.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from harness.scenario.check import LabSpec

from .conftest import DETECTION_LIMIT, LABS, CheckInThread, assert_recovers, fire, side_channel

# One worker runs the module (--dist loadgroup): its fault lab boots once, not once per worker.
pytestmark = [pytest.mark.vm, pytest.mark.xdist_group("guest-faults")]

HOLD = LabSpec.load(str(LABS / "hold"))
CROSS = LabSpec.load(str(LABS / "cross"))


def _run_until_fault(lab, inject) -> tuple[str, float, object]:
    """Run labs/hold, inject during its poll() step, and return (the run's error, seconds to report, result)."""
    run = CheckInThread(lab, HOLD).start()
    run.reached("ready")
    time.sleep(0.5)  # well inside the 8 s poll()
    injected = time.monotonic()
    inject()
    run.join(DETECTION_LIMIT + 20)
    assert run.error is None, f"check raised instead of reporting: {run.error!r}"
    seconds = run.finished_at - injected
    result = run.report.runs[0]
    assert result.error, "the fault went unnoticed"
    print(f"\n[{seconds:.2f} s] {result.error}")
    return result.error, seconds, result


def test_qemu_killed_mid_check_is_named_with_its_pid(faulty):
    """1. SIGKILL the server's QEMU while a step runs on it."""
    server = faulty.require().vm("server")
    error, seconds, result = _run_until_fault(faulty, lambda: os.kill(server.pid, signal.SIGKILL))
    assert seconds < DETECTION_LIMIT
    assert error.startswith("step 4 (server: poll(")
    assert f"QEMU of server (pid {server.pid}) exited" in error
    assert "Console" in error and "console log" in error
    # The partial result survives: the steps before the fault are all there.
    assert [r.step.index for r in result.records] == [1, 2, 3, 4]
    assert all(r.verdict.ok for r in result.records[:3]) and result.records[3].kernel is None
    assert faulty.alive(faulty.require()) == {"client": True, "server": False}
    assert_recovers(faulty)


def test_guest_kernel_panic_is_quoted_from_the_console(faulty):
    """2. The server's kernel panics (sysrq c) during a step: the panic lines are in the error."""
    guest = side_channel(faulty, "server")
    try:
        error, seconds, _ = _run_until_fault(faulty, lambda: fire(guest, "echo c > /proc/sysrq-trigger"))
    finally:
        guest.close()
    assert seconds < DETECTION_LIMIT
    assert "the kernel of server panicked" in error
    assert "Kernel panic - not syncing: sysrq triggered crash" in error
    assert "sysrq_handle_crash" in error or "Call Trace" in error
    # panic=-1 with -no-reboot: QEMU is gone; its console log is kept in home/logs by down.
    assert not faulty.alive(faulty.require())["server"]
    faulty.down()
    kept = faulty.paths.home / "logs" / "server.console.log"
    assert "Kernel panic - not syncing" in kept.read_text(errors="replace")
    assert_recovers(faulty)
    # A later lab whose guest printed nothing does not push the panic out of the logs.
    faulty.down()
    assert "Kernel panic - not syncing" in kept.read_text(errors="replace")


def test_sshd_killed_the_step_says_ssh_is_gone_and_the_console_still_works(faulty):
    """3. Every sshd in the server is killed (busybox init respawns the listener)."""
    guest = side_channel(faulty, "server")
    try:
        error, seconds, _ = _run_until_fault(faulty, lambda: fire(guest, "pkill -KILL sshd"))
    finally:
        guest.close()
    assert seconds < DETECTION_LIMIT
    assert "SSH" in error and "server" in error
    assert "SSH to server is gone" in error or "the SSH connection to server is gone" in error
    assert f"QEMU (pid {faulty.require().vm('server').pid}) runs" in error
    with faulty.console("server") as console:
        console.login(timeout=30)
        output, status = console.run("hostname", timeout=30)
    assert (output.strip(), status) == ("server", 0)
    # sshd is back (respawned by init); the lab reconnects by itself.
    deadline = time.monotonic() + 20
    while True:
        try:
            assert faulty.ssh("server", timeout=5).run("hostname", check=True).stdout.strip() == "server"
            break
        except Exception:  # noqa: BLE001 - sshd may take a moment to come back
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    assert_recovers(faulty)


def test_agent_killed_mid_step_names_the_step_and_quotes_its_stderr(faulty):
    """9. The guest agent is SIGKILLed while it sits in poll()."""
    guest = side_channel(faulty, "server")
    try:
        error, seconds, _ = _run_until_fault(faulty, lambda: fire(guest, "pkill -KILL -f '[a]gent_[0-9a-f]{16}'"))
        # The VM and SSH are fine: only the agent went.
        assert guest.run("hostname", check=True).stdout.strip() == "server"
    finally:
        guest.close()
    assert seconds < DETECTION_LIMIT
    assert error.startswith("step 4 (server: poll(")
    assert "the agent (root) died during poll(" in error
    assert "agent stderr:" in error
    assert "the agent process itself ended" in error
    assert all(faulty.alive(faulty.require()).values())
    assert_recovers(faulty)


def test_lab_nic_down_during_a_cross_host_step_is_named(faulty):
    """4. lab0 of the server goes down between the client's socket() and its connect()."""
    # The side channel is opened first: on a loaded host its SSH handshake alone can outlast the 1.5 s pause.
    guest = side_channel(faulty, "server")
    run = CheckInThread(faulty, CROSS).start()
    run.reached("ready")
    try:
        injected = time.monotonic()
        guest.run("ip link set lab0 down", check=True)
        run.reached("connect", timeout=30)
        seconds = run.step_times["connect"] - injected
        run.join(30)
        assert run.error is None
        report = run.report
        connect = report.runs[0].record("connect")
        print(f"\n[{seconds:.2f} s] {connect.kernel.describe()}: {'; '.join(connect.verdict.problems)}")
        print("notes: " + " | ".join(report.notes))
        assert seconds < DETECTION_LIMIT
        # The blocking connect was interrupted by the agent after block_ms and reported as blocking.
        assert connect.kernel.blocked
        assert any("lab0 on server is DOWN" in problem for problem in connect.verdict.problems)
        assert any("lab0 on server is DOWN" in note for note in report.notes)
        # The non-blocking connect's poll() timed out: POLLOUT never came.
        assert not report.runs[0].record("poll").verdict.ok
        guest.run("ip link set lab0 up", check=True)
    finally:
        guest.close()
    # The link is up at once, but the first probe may still wait out ARP and a SYN retransmit
    # (1 s, then 2 s) on a loaded host: the segment must be found working again within 10 s.
    deadline = time.monotonic() + 10
    while (faults := faulty.segment_faults()) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert faults == []
    assert_recovers(faulty)
