"""QEMU command line, start and stop, with the process and QMP mocked."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from harness.vm import qemu
from harness.errors import LabError

from .fakes import FakePopen, FakeQMPServer, kill_quietly, spawn_marked_process


def make_spec(tmp_path: Path, lab_nic=None, **overrides) -> qemu.VMSpec:
    values = dict(
        name="server", run_dir=tmp_path, kernel=tmp_path / "vmlinuz", initrd=tmp_path / "initrd.img",
        overlay=tmp_path / "server.qcow2", ssh_port=40022, mgmt_mac="52:54:00:00:00:02", lab_ip="198.51.100.2/24",
        lab_nic=lab_nic if lab_nic is not None else qemu.LabNic("tap", "52:54:00:5a:00:02", ifname="slabc1232"),
    )
    values.update(overrides)
    return qemu.VMSpec(**values)


def option_values(argv: list[str], option: str) -> list[str]:
    return [argv[i + 1] for i, arg in enumerate(argv) if arg == option]


def test_management_nic_is_sealed_and_forwarded_on_loopback_only(tmp_path):
    argv = qemu.qemu_argv(make_spec(tmp_path))
    netdevs = option_values(argv, "-netdev")
    assert netdevs[0] == "user,id=mgmt,restrict=on,hostfwd=tcp:127.0.0.1:40022-:22"


def test_lab_nic_is_a_vnet_hdr_tap_qemu_creates_itself(tmp_path):
    argv = qemu.qemu_argv(make_spec(tmp_path))
    assert option_values(argv, "-netdev")[1] == "tap,id=lab,ifname=slabc1232,script=no,downscript=no,vnet_hdr=on"
    assert "virtio-net-pci,netdev=lab,mac=52:54:00:5a:00:02" in option_values(argv, "-device")


@pytest.mark.parametrize("listen,connect,expected", [
    (4000, 0, "socket,id=lab,listen=127.0.0.1:4000"),
    (0, 4000, "socket,id=lab,connect=127.0.0.1:4000"),
])
def test_socket_segment_stays_on_loopback(tmp_path, listen, connect, expected):
    nic = qemu.LabNic("socket", "52:54:00:5a:00:01", listen_port=listen, connect_port=connect)
    assert option_values(qemu.qemu_argv(make_spec(tmp_path, lab_nic=nic)), "-netdev")[1] == expected


def test_socket_nic_without_port_is_refused():
    with pytest.raises(ValueError):
        qemu.LabNic("socket", "52:54:00:5a:00:01").netdev()


def test_only_virtio_devices_and_no_defaults(tmp_path):
    argv = qemu.qemu_argv(make_spec(tmp_path))
    assert "-nodefaults" in argv and "-no-user-config" in argv
    assert all(device.startswith("virtio-net-pci,") for device in option_values(argv, "-device"))
    assert option_values(argv, "-drive") == [f"file={tmp_path / 'server.qcow2'},if=virtio,format=qcow2,discard=unmap"]


def test_console_is_a_logged_socket_the_wake_port_a_second_serial_and_qmp_a_monitor(tmp_path):
    argv = qemu.qemu_argv(make_spec(tmp_path))
    chardevs = option_values(argv, "-chardev")
    assert f"path={tmp_path / 'server.console'},server=on,wait=off,logfile={tmp_path / 'server.console.log'}" in chardevs[0]
    # ttyS0 is the console, ttyS1 the wake port (lifecycle.WAKE_TTY): -serial order is ttyS order.
    assert chardevs[1] == f"socket,id=wake,path={tmp_path / 'server.wake'},server=on,wait=off"
    assert option_values(argv, "-serial") == ["chardev:console", "chardev:wake"]
    assert chardevs[2] == f"socket,id=qmp,path={tmp_path / 'server.qmp'},server=on,wait=off"
    assert option_values(argv, "-mon") == ["chardev=qmp,mode=control"]
    assert "-daemonize" in argv and option_values(argv, "-pidfile") == [str(tmp_path / "server.pid")]


def test_kernel_command_line_names_vm_and_nics(tmp_path):
    append = make_spec(tmp_path).kernel_append()
    for param in ("console=ttyS0", "root=/dev/vda", "panic=-1", "socklab.name=server",
                  "socklab.mgmt_mac=52:54:00:00:00:02", "socklab.lab_mac=52:54:00:5a:00:02",
                  "socklab.lab_ip=198.51.100.2/24"):
        assert param in append.split()


def test_accelerator_is_passed_through(tmp_path):
    assert option_values(qemu.qemu_argv(make_spec(tmp_path, accel="kvm")), "-accel") == ["kvm"]


def test_start_returns_pid_from_pidfile(tmp_path):
    spec = make_spec(tmp_path)
    popen = FakePopen(effect=lambda argv: spec.pidfile.write_text("4242\n"))
    assert qemu.start(spec, popen=popen) == 4242
    assert popen.argv[0] == "qemu-system-x86_64"


def test_start_failure_names_vm_and_qemu_message(tmp_path):
    popen = FakePopen(returncode=1, stderr="qemu-system-x86_64: -netdev user: Could not set up host forwarding rule\n")
    with pytest.raises(LabError, match="QEMU for server did not start: .*host forwarding"):
        qemu.start(make_spec(tmp_path), popen=popen)


def test_start_without_pidfile_is_an_error(tmp_path):
    with pytest.raises(LabError, match="no pid file"):
        qemu.start(make_spec(tmp_path), popen=FakePopen())


def test_stop_sends_qmp_quit(tmp_path):
    proc = spawn_marked_process("stopme")
    server = FakeQMPServer(tmp_path / "stopme.qmp", on_quit=lambda: kill_quietly(proc.pid))
    try:
        assert qemu.stop("stopme", proc.pid, tmp_path / "stopme.qmp", timeout=5) == "quit"
        assert "quit" in server.commands
    finally:
        server.close()
        kill_quietly(proc.pid)
        proc.wait()


def test_stop_kills_when_quit_is_ignored(tmp_path):
    proc = spawn_marked_process("stubborn")
    server = FakeQMPServer(tmp_path / "stubborn.qmp")  # answers quit but never exits
    try:
        started = time.monotonic()
        assert qemu.stop("stubborn", proc.pid, tmp_path / "stubborn.qmp", timeout=0.5) == "killed"
        assert time.monotonic() - started < 5
    finally:
        server.close()
        proc.wait()


def test_stop_of_a_dead_or_foreign_pid_does_nothing(tmp_path):
    proc = spawn_marked_process("other")
    try:
        assert qemu.stop("server", proc.pid, tmp_path / "none.qmp") == "not running"
        assert proc.poll() is None  # a pid that is not our QEMU is never killed
    finally:
        kill_quietly(proc.pid)
        proc.wait()


def test_is_running_ignores_zombies_and_recycled_pids():
    proc = spawn_marked_process("zombie")
    assert qemu.is_running(proc.pid, "zombie")
    assert not qemu.is_running(proc.pid, "someone-else")
    kill_quietly(proc.pid)
    deadline = time.monotonic() + 5
    while qemu.is_running(proc.pid, "zombie") and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not qemu.is_running(proc.pid, "zombie")  # dead, not yet reaped: still "not running"
    proc.wait()


def test_a_vm_carries_its_uuid_and_the_sandbox_as_whole_arguments(tmp_path):
    argv = qemu.qemu_argv(make_spec(tmp_path, uuid="a1b2c3d4-0000-4000-8000-000000000001", sandbox=True))
    assert option_values(argv, "-uuid") == ["a1b2c3d4-0000-4000-8000-000000000001"]
    assert option_values(argv, "-sandbox") == [qemu.SANDBOX]
    assert "spawn=deny" not in qemu.SANDBOX  # -daemonize forks: a sandbox that forbids it kills QEMU at start
    assert "-uuid" not in qemu.qemu_argv(make_spec(tmp_path)) and "-runas" not in argv


def test_a_snapshot_is_loaded_from_a_descriptor_qemu_inherits(tmp_path):
    """No `exec:cat PATH`: socklab opens the snapshot and QEMU reads the inherited fd."""
    import os

    state = tmp_path / "state.migration"
    state.write_bytes(b"QEVM")
    spec = make_spec(tmp_path, incoming=state)
    seen = {}

    def effect(argv):
        fd = int(option_values(argv, "-incoming")[0].removeprefix("fd:"))
        seen["fd"], seen["head"] = fd, os.pread(fd, 4, 0)
        spec.pidfile.write_text("4242\n")

    popen = FakePopen(effect=effect)
    assert qemu.start(spec, popen=popen) == 4242
    assert seen["head"] == b"QEVM"
    with pytest.raises(OSError):
        os.fstat(seen["fd"])  # closed again once QEMU has it
