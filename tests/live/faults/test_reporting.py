"""How faults are told apart and reported, without a VM: the console's panic, a dead or living QEMU,
a gone or restarted sshd, the lab segment check in a run, console logs kept across labs, the lock's
holder. (No ``vm`` marker: these run with the unit tests.)"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from harness.vm import qemu
from harness.vm.console import panic_lines
from harness.errors import LabError
from harness.guest.ssh import GuestSSH
from harness.lab.lifecycle import Lab
from harness.lab.state import LabState, VMState
from harness.lab.state import keep_log as _keep_log
from harness.paths import Paths
from harness.scenario.compare import Outcome
from harness.scenario.format import load
from harness.scenario.runner import ModelBackend, crosses_hosts, run
from tests.unit.fakes import QuietBackend

PANIC_LOG = """\
[   20.11] random: crng init done
[   25.728406] sysrq: Trigger a crash
[   25.745047] Kernel panic - not syncing: sysrq triggered crash
[   25.749965] CPU: 0 PID: 176 Comm: bash Not tainted 6.1.0-56-cloud-amd64 #1  Debian 6.1.192-2
[   25.751145] Call Trace:
[   25.752652]  <TASK>
[   25.758850]  sysrq_handle_crash+0x16/0x20
[   25.769527] RIP: 0033:0x7ffff7ea3350
[   25.777239] RAX: ffffffffffffffda RBX: 0000000000000002 RCX: 00007ffff7ea3350
"""


def test_the_panic_and_its_cause_are_picked_out_of_the_console_log(tmp_path):
    log = tmp_path / "server.console.log"
    log.write_text(PANIC_LOG.replace("\n", "\r\n"))
    lines = panic_lines(log).splitlines()
    assert lines[0].endswith("random: crng init done") and "sysrq: Trigger a crash" in lines[1]
    assert "Kernel panic - not syncing: sysrq triggered crash" in lines[2]
    assert any("sysrq_handle_crash" in line for line in lines)
    log.write_text("[    1.0] Linux version 6.1.0\n[    2.0] BUG: soft lockup - CPU#0 stuck for 22s!\n")
    assert panic_lines(log) is None  # a warning is not a panic
    assert panic_lines(tmp_path / "missing.log") is None


@pytest.fixture
def lab(tmp_path):
    return Lab(Paths(images=tmp_path / "images", home=tmp_path / "home"))


def _state(lab: Lab, pid: int, ssh_port: int = 1) -> VMState:
    lab.paths.ensure_private(lab.run_dir)
    vm = VMState(name="server", index=1, ssh_port=ssh_port, lab_ip="198.51.100.2/24", mgmt_mac="m", lab_mac="l",
                 pid=pid, console_log=str(lab.run_dir / "server.console.log"))
    lab.save(LabState(lab_id=lab.id, topology="single", ready=True, vms=[vm]))
    return vm


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture
def fake_qemu():
    """A process that passes for the server's QEMU (its command line has ``socklab-server,``)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "-name", "socklab-server,x"])
    deadline = time.monotonic() + 10
    while not qemu.is_running(proc.pid, "server") and time.monotonic() < deadline:
        time.sleep(0.02)  # sys.executable may be a shim that execs the real interpreter
    yield proc.pid
    proc.kill()
    proc.wait()


def test_a_dead_qemu_is_named_with_its_pid_and_console(lab):
    vm = _state(lab, _dead_pid())
    (lab.run_dir / "server.console.log").write_text("Debian GNU/Linux 12 server ttyS0\nserver login: root (automatic login)\n")
    fault = lab.vm_fault("server", settle=0)
    assert fault.startswith(f"QEMU of server (pid {vm.pid}) exited: the VM is gone")
    assert "server login: root (automatic login)" in fault
    assert f"console log {lab.run_dir / 'server.console.log'}" in fault


def test_a_panic_on_the_console_is_reported_as_the_cause(lab):
    vm = _state(lab, _dead_pid())
    (lab.run_dir / "server.console.log").write_text(PANIC_LOG)
    fault = lab.vm_fault("server", settle=0)
    assert fault.startswith(f"the kernel of server panicked; its QEMU (pid {vm.pid}) exited")
    assert "Kernel panic - not syncing: sysrq triggered crash" in fault


def test_a_running_vm_without_sshd_is_told_from_one_whose_sshd_came_back(lab, fake_qemu):
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    _state(lab, fake_qemu, ssh_port=port)
    fault = lab.vm_fault("server", settle=0)
    assert fault.startswith(f"SSH to server is gone: its QEMU (pid {fake_qemu}) runs, but no sshd answers on "
                            f"127.0.0.1:{port}")
    assert "`invoke lab.console server`" in fault

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve():
        for _ in range(2):
            conn, _ = listener.accept()
            conn.sendall(b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n")
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    _state(lab, fake_qemu, ssh_port=port)
    # No connection of this Lab broke (a restored lab is not logged in to): an answering sshd is no fault.
    assert lab.vm_fault("server", settle=0) is None
    lab._ssh["server"] = GuestSSH("server", port, lab.paths.client_key, "")  # kept, and not connected: broken
    fault = lab.vm_fault("server", settle=0)
    listener.close()
    assert "sshd answers again" in fault and "SSH-2.0-OpenSSH_9.2p1" in fault


def test_ssh_to_a_dead_vm_fails_at_once_with_the_cause(lab):
    _state(lab, _dead_pid())
    with pytest.raises(LabError, match="QEMU of server .* exited"):
        lab.ssh("server", timeout=30)


def test_the_lock_names_its_holder_and_what_it_runs(lab):
    with lab.locked():
        with pytest.raises(LabError) as caught:
            with Lab(lab.paths).locked():
                pass
    message = str(caught.value)
    assert message.startswith(f"another socklab command is changing this lab (pid {os.getpid()}), running `")
    assert message.endswith(" s; wait for it or stop it") and "\n" not in message


def test_console_logs_of_earlier_labs_are_kept(tmp_path):
    logs, run_dir = tmp_path / "logs", tmp_path / "run"
    logs.mkdir()
    run_dir.mkdir()
    for text in ["panic\n", "", "second\n", "", "third\n"]:
        (run_dir / "server.console.log").write_text(text)
        _keep_log(run_dir / "server.console.log", logs, kept=5)
    # Empty logs (restored guests that printed nothing) never push a real one out.
    assert (logs / "server.console.log").read_text() == "third\n"
    assert (logs / "server.console.log.1").read_text() == "second\n"
    assert (logs / "server.console.log.2").read_text() == "panic\n"
    for index in range(10):
        (run_dir / "server.console.log").write_text(f"lab {index}\n")
        _keep_log(run_dir / "server.console.log", logs, kept=3)
    assert sorted(p.name for p in logs.iterdir()) == ["server.console.log", "server.console.log.1",
                                                     "server.console.log.2", "server.console.log.3"]


CROSS = """\
name: cross
hosts: [server, client]
params: {}
---
steps:
  - {on: server, call: socket, args: {family: AF_INET, type: SOCK_STREAM}, as: l}
  - {on: server, call: bind, args: {fd: $l, addr: [0.0.0.0, 7000]}, expect: 0}
  - {on: server, call: listen, args: {fd: $l, backlog: 2}, expect: 0}
  - {on: client, call: socket, args: {family: AF_INET, type: SOCK_STREAM}, as: c}
  - {on: client, call: connect, args: {fd: $c, addr: [198.51.100.2, 7000]}, expect: 0}
  - {on: client, call: connect, args: {fd: $c, addr: [198.51.100.2, 7000]}, expect: 0}
"""


class Replay(QuietBackend):
    """A kernel side answering from a list; it counts how often the segment is checked."""

    def __init__(self, outcomes, faults=()):
        self.outcomes = list(outcomes)
        self.faults = list(faults)
        self.checks = 0

    def call(self, host, user, op, args):
        return self.outcomes.pop(0)

    def segment_faults(self):
        self.checks += 1
        return self.faults


@pytest.fixture
def cross(tmp_path):
    path = tmp_path / "cross.yaml"
    path.write_text(textwrap.dedent(CROSS))
    return load(path)


def test_only_steps_to_another_vm_cross_the_segment(cross):
    assert [crosses_hosts(step) for step in cross.steps] == [False, False, False, False, True, True]


def test_a_failed_cross_host_step_names_the_nic_that_is_down(cross):
    blocked = Outcome(None, blocked=True)
    kernel = Replay([Outcome(3), Outcome(0), Outcome(0), Outcome(3), blocked, blocked],
                    faults=["lab0 on server is DOWN"])
    result = run(cross, kernel, ModelBackend(cross))
    first, second = result.records[4], result.records[5]
    assert "lab segment: lab0 on server is DOWN" in first.verdict.problems
    assert result.diagnosis == ["lab segment: lab0 on server is DOWN"]
    assert kernel.checks == 1 and not any("lab segment" in p for p in second.verdict.problems)


def test_a_healthy_segment_adds_nothing(cross):
    kernel = Replay([Outcome(3), Outcome(0), Outcome(0), Outcome(3), Outcome(None, blocked=True), Outcome(0)])
    result = run(cross, kernel, ModelBackend(cross))
    assert kernel.checks == 1 and result.diagnosis == []
    assert all("lab segment" not in p for r in result.records if r.verdict for p in r.verdict.problems)
