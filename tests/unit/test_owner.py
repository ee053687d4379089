"""Which processes a lab owns: by -uuid as a whole argument and start time, on a fake /proc and on real processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.vm import owner


def fake_process(proc: Path, pid: int, argv: list[str], state: str = "S", start: int = 1000,
                 comm: str = "qemu-system-x86") -> None:
    entry = proc / str(pid)
    entry.mkdir(parents=True)
    (entry / "cmdline").write_bytes(b"".join(arg.encode() + b"\0" for arg in argv))
    # Field 22 (starttime) is the 20th after the ") " that ends the command name.
    fields = [state, "1", *(["0"] * 17), str(start), "0"]
    (entry / "stat").write_text(f"{pid} ({comm}) {' '.join(fields)}\n")


LAB = "a1b2c3d4"
OTHER = "ffee0011"


@pytest.fixture
def proc(tmp_path) -> Path:
    root = tmp_path / "proc"
    root.mkdir()
    return root


def qemu_argv(uuid: str, run_dir: str = "/x/.socklab/run") -> list[str]:
    return ["qemu-system-x86_64", "-name", "socklab-server,process=socklab-server", "-uuid", uuid,
            "-pidfile", f"{run_dir}/server.pid"]


def test_a_vm_uuid_starts_with_the_lab_key_and_is_new_every_time():
    first, second = owner.new_vm_uuid(LAB), owner.new_vm_uuid(LAB)
    assert first != second
    assert first.startswith(LAB + "-") and len(first) == 36


def test_ownership_needs_the_whole_uuid_argument_and_the_start_time(proc):
    mine = owner.new_vm_uuid(LAB)
    fake_process(proc, 100, qemu_argv(mine), start=5000)
    assert owner.owns(100, mine, 5000, proc)
    assert owner.owns(100, mine, 0, proc)  # start time not recorded yet
    assert not owner.owns(100, mine, 5001, proc)  # a recycled pid
    assert not owner.owns(100, owner.new_vm_uuid(LAB), 5000, proc)
    assert not owner.owns(101, mine, 0, proc)  # no such process


def test_a_uuid_inside_another_argument_is_not_ownership(proc):
    mine = owner.new_vm_uuid(LAB)
    fake_process(proc, 200, ["qemu-system-x86_64", "-name", f"x-uuid {mine}", "-append", f"-uuid {mine}"])
    fake_process(proc, 201, ["qemu-system-x86_64", "-uuid", mine + "0"])
    assert not owner.owns(200, mine, 0, proc)
    assert not owner.owns(201, mine, 0, proc)


def test_a_zombie_is_not_alive(proc):
    mine = owner.new_vm_uuid(LAB)
    fake_process(proc, 300, qemu_argv(mine), state="Z")
    assert not owner.owns(300, mine, 0, proc)
    assert owner.lab_qemus(LAB, proc) == []


def test_a_lab_finds_its_qemus_by_key_and_never_another_lab_s(proc):
    """Two checkouts with the same relative home, or two names in one: the run dir matches, the key does not."""
    fake_process(proc, 400, qemu_argv(owner.new_vm_uuid(LAB), "run"))
    fake_process(proc, 401, qemu_argv(owner.new_vm_uuid(LAB), "run"))
    fake_process(proc, 402, qemu_argv(owner.new_vm_uuid(OTHER), "run"))
    fake_process(proc, 403, ["qemu-system-x86_64", "-name", "socklab-server,", "-pidfile", "run/server.pid"])
    fake_process(proc, 404, ["vim", "run/lab.json"], comm="vim")
    (proc / "self").mkdir()
    assert owner.lab_qemus(LAB, proc) == [400, 401]
    assert owner.lab_qemus(OTHER, proc) == [402]


def test_a_command_name_with_spaces_and_parentheses_still_parses(proc):
    fake_process(proc, 500, qemu_argv(owner.new_vm_uuid(LAB)), comm="a) (b", start=77, state="T")
    info = owner.process_info(500, proc)
    assert info is not None and info.start_ticks == 77 and info.state == "T"
    assert owner.stopped(500, proc)


def test_a_real_process_is_owned_until_it_exits_and_stopped_while_sigstopped():
    mine = owner.new_vm_uuid(LAB)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", "-uuid", mine])
    try:
        deadline = time.monotonic() + 5
        while owner.argv_uuid(owner.process_info(child.pid).argv) != mine and time.monotonic() < deadline:
            time.sleep(0.01)
        ticks = owner.start_ticks(child.pid)
        assert ticks > 0 and owner.owns(child.pid, mine, ticks)
        assert child.pid in owner.lab_qemus(LAB)
        os.kill(child.pid, signal.SIGSTOP)
        deadline = time.monotonic() + 5
        while not owner.stopped(child.pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert owner.stopped(child.pid)
    finally:
        child.kill()
        child.wait()
    assert not owner.owns(child.pid, mine, ticks)
