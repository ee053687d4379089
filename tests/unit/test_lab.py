"""Lab state and lifecycle without VMs: the state file, the lock, and cleanup when up fails."""

from __future__ import annotations

import os
import shutil
import stat
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from harness.lab import lifecycle as lab_mod
from harness.host.accel import Choice
from harness.deadline import QMP_PROBE
from harness.errors import LabError
from harness.image.kernel import Boot
from harness.lab.lifecycle import Lab, check_up_args
from harness.lab import state as lab_state
from harness.lab.state import LabState, VMState
from harness.lab.topology import topology
from harness.paths import Paths


@pytest.fixture
def lab(tmp_path) -> Lab:
    return Lab(Paths(images=tmp_path / "images", home=tmp_path / "home"))


def sample_state() -> LabState:
    vm = VMState(name="server", index=1, ssh_port=40022, lab_ip="198.51.100.2/24",
                 mgmt_mac="52:54:00:00:00:02", lab_mac="52:54:00:5a:00:02", pid=123)
    return LabState(lab_id="abc123", topology="default", accel="tcg", segment="tap", vms=[vm])


def test_state_round_trips_through_json():
    state = sample_state()
    assert LabState.from_json(state.to_json()) == state
    assert state.vm("server").address == "198.51.100.2"


def test_state_of_another_version_is_refused():
    text = sample_state().to_json().replace('"version": 1', '"version": 99')
    with pytest.raises(LabError, match="version 99"):
        LabState.from_json(text)


def test_unknown_vm_lists_the_lab_s_vms():
    with pytest.raises(LabError, match="no VM named 'router' in this lab; it has: server"):
        sample_state().vm("router")


def test_state_file_is_private(lab):
    lab.save(sample_state())
    assert stat.S_IMODE(lab.state_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(lab.run_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE(lab.paths.home.stat().st_mode) == 0o700
    assert lab.load() == sample_state()


def test_corrupt_state_says_how_to_recover(lab):
    lab.paths.ensure_private(lab.run_dir)
    lab.state_file.write_text("{not json")
    with pytest.raises(LabError, match="run `invoke lab.down`"):
        lab.load()


@pytest.mark.parametrize("args,message", [
    (("mesh", "auto", "auto", 60), "unknown topology 'mesh'; known: default, lossy, mixed, single"),
    (("default", "hvf", "auto", 60), "unknown accelerator 'hvf'"),
    (("default", "auto", "vde", 60), "unknown segment mode 'vde'"),
    (("default", "auto", "auto", 0), "--timeout must be a positive"),
])
def test_bad_up_arguments_are_refused_before_anything_starts(args, message):
    with pytest.raises(LabError, match=message):
        check_up_args(*args)


def test_second_command_is_told_who_holds_the_lock(lab):
    with lab.locked():
        other = Lab(lab.paths)
        with pytest.raises(LabError, match=f"another socklab command is changing this lab \\(pid {os.getpid()}\\)"):
            with other.locked():
                pass


def test_lab_ids_differ_per_install(tmp_path):
    first = lab_state.lab_id(Paths(images=tmp_path, home=tmp_path / "a"))
    second = lab_state.lab_id(Paths(images=tmp_path, home=tmp_path / "b"))
    assert first != second and len(first) == 6
    assert len(f"sl{first}7") <= 15  # a tap name must fit IFNAMSIZ


@pytest.mark.parametrize("content, reason", [
    (b"", "the file is empty"),
    (b"[]", "it holds a list, not the lab's record"),
    (b"null", "it holds null, not the lab's record"),
    (b'{"lab_id": "abc", "topol', "Unterminated string"),
    (b"\xff\xfe{}", "not UTF-8 text"),
    (b'{"version": 1, "lab_id": "a", "topology": "default", "vms": 5}', "not iterable"),
    (b'{"version": 1, "lab_id": "a", "topology": "default", "vms": [{"name": "server", "index": 1, '
     b'"ssh_port": 1, "lab_ip": "x", "mgmt_mac": "m", "lab_mac": "l", "pid": "123"}]}', "`pid` is '123'"),
])
def test_damaged_state_is_named_with_its_path(lab, content, reason):
    lab.paths.ensure_private(lab.run_dir)
    lab.state_file.write_bytes(content)
    with pytest.raises(LabError) as caught:
        lab.load()
    message = str(caught.value)
    assert message.startswith(f"{lab.state_file}: unreadable lab state (")
    assert reason in message and "\n" not in message


def test_state_path_that_is_a_directory_is_named_as_such(lab):
    lab.state_file.mkdir(parents=True)
    with pytest.raises(LabError, match="is a directory"):
        lab.load()


def test_down_clears_damaged_state_and_kills_what_uses_the_run_dir(lab, monkeypatch):
    lab.paths.ensure_private(lab.run_dir)
    lab.state_file.write_text("[]")
    killed = []
    monkeypatch.setattr(lab, "qemu_pids", lambda: [4242])  # found by the lab's key, with no state to go on
    monkeypatch.setattr(lab_mod.os, "kill", lambda pid, sig: killed.append(pid))
    done = lab.down()
    assert killed == [4242]
    assert "state, overlays and sockets: removed" in done
    assert not lab.run_dir.exists()
    assert lab.load() is None


def test_down_without_a_lab_is_a_no_op(lab):
    assert lab.down() == []
    assert lab.down() == []


class FakeImage:
    def __init__(self, tmp_path: Path) -> None:
        self.directory = tmp_path / "image"
        self.rootfs = self.kernel = self.boot_kernel = self.initrd = tmp_path / "image" / "file"
        self.host_key = "ssh-ed25519 AAAA"
        self.sha256 = {"rootfs.ext4": "0" * 64}

    kernel_release = "6.1.0-57-cloud-amd64"
    recipe = "bookworm"

    def damaged(self):
        return []


def fake_boots(monkeypatch, tmp_path: Path) -> None:
    """Every VM boots one fake image's own kernel."""
    img = FakeImage(tmp_path)
    monkeypatch.setattr(Lab, "boots", lambda self, topo, *a: {name: Boot.of_image(img) for name in topo.vms})


def test_a_topology_pins_a_vm_to_its_kernel_and_leaves_the_others_to_lab_up():
    mixed = topology("mixed")
    assert mixed.kernel_of("client", "6.12") == "6.1" and mixed.kernel_of("server", "6.12") == "7.2"
    assert topology("default").kernel_of("server", "6.12") == "6.12"


def test_failed_up_stops_everything_it_started(lab, tmp_path, monkeypatch):
    """The second QEMU fails to start: the first one is stopped, the state and overlays are gone."""
    started, stopped = [], []
    monkeypatch.setattr(lab_mod.hostdeps, "ensure", lambda *a, **k: None)
    fake_boots(monkeypatch, tmp_path)
    monkeypatch.setattr(lab_mod.accel_mod, "choose", lambda *a: Choice("tcg", "test"))
    monkeypatch.setattr(lab_mod.net, "can_use_taps", lambda: (False, "test"))
    monkeypatch.setattr(lab_mod.qemu, "create_overlay", lambda base, overlay: overlay.write_text("qcow2"))

    def start(spec):
        if spec.name == "server":
            raise LabError("QEMU for server did not start: boom")
        started.append(spec.name)
        return 4000 + len(started)

    monkeypatch.setattr(lab_mod.qemu, "start", start)
    monkeypatch.setattr(lab_mod.qemu, "stop", lambda name, pid, qmp, **k: stopped.append((name, pid)) or "quit")
    with pytest.raises(LabError, match="server did not start"):
        lab.up("default", "auto", "socket")
    assert started == ["client"]
    assert stopped == [("client", 4001)]
    assert not lab.run_dir.exists()


def test_interrupted_up_stops_everything_it_started(lab, tmp_path, monkeypatch):
    stopped = []
    monkeypatch.setattr(lab_mod.hostdeps, "ensure", lambda *a, **k: None)
    fake_boots(monkeypatch, tmp_path)
    monkeypatch.setattr(lab_mod.accel_mod, "choose", lambda *a: Choice("tcg", "test"))
    monkeypatch.setattr(lab_mod.net, "can_use_taps", lambda: (False, "test"))
    monkeypatch.setattr(lab_mod.qemu, "create_overlay", lambda base, overlay: overlay.write_text("qcow2"))
    monkeypatch.setattr(lab_mod.qemu, "start", lambda spec: 5000 + spec.lab_ip.count("2"))
    monkeypatch.setattr(lab_mod.qemu, "stop", lambda name, pid, qmp, **k: stopped.append(name) or "quit")

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Lab, "_wait_ssh", ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        lab.up("default", "auto", "socket")
    assert sorted(stopped) == ["client", "server"]
    assert lab.load() is None


def test_socket_segment_refuses_more_than_two_vms(lab, tmp_path, monkeypatch):
    trio = tmp_path / "trio.yaml"
    trio.write_text("name: trio\nvms:\n  - {name: a}\n  - {name: b}\n  - {name: c}\n")
    monkeypatch.setattr(lab_mod.hostdeps, "ensure", lambda *a, **k: None)
    fake_boots(monkeypatch, tmp_path)
    monkeypatch.setattr(lab_mod.accel_mod, "choose", lambda *a: Choice("tcg", "test"))
    monkeypatch.setattr(lab_mod.net, "can_use_taps", lambda: (False, "not root"))
    with pytest.raises(LabError, match="socket segment joins two VMs only"):
        lab.up(str(trio), "auto", "auto")


def test_a_restore_that_fails_falls_back_to_a_cold_boot(lab, tmp_path, monkeypatch):
    """A snapshot that never reaches SSH is discarded, the lab torn down and booted cold."""
    from harness.vm import vmstate as snapshot

    monkeypatch.setattr(lab_mod.hostdeps, "ensure", lambda *a, **k: None)
    fake_boots(monkeypatch, tmp_path)
    monkeypatch.setattr(lab_mod.accel_mod, "choose", lambda *a: Choice("tcg", "test"))
    monkeypatch.setattr(lab_mod.net, "can_use_taps", lambda: (False, "test"))
    monkeypatch.setattr(Lab, "_usable_snapshots", lambda self, stores, keys: {n: snapshot.SavedVM(tmp_path) for n in keys})
    discarded, boots, saved = [], [], []
    monkeypatch.setattr(snapshot.SavedVMStore, "discard", lambda self, key: discarded.append(key))
    monkeypatch.setattr(Lab, "_save_snapshots", lambda self, state, store, keys: saved.append(sorted(keys)))

    def boot(self, state, topo, plan, snapshots, deadline):
        boots.append(bool(snapshots))
        if snapshots:
            raise LabError("client never became reachable over SSH")

    monkeypatch.setattr(Lab, "_boot", boot)
    state, started = lab.up("default", "auto", "socket")
    assert boots == [True, False]
    assert len(discarded) == 2
    assert state.boot_mode == "cold boot" and state.ready
    assert saved == [["client", "server"]]  # the next up gets a fresh snapshot


def test_cold_up_neither_restores_nor_saves(lab, tmp_path, monkeypatch):
    monkeypatch.setattr(lab_mod.hostdeps, "ensure", lambda *a, **k: None)
    fake_boots(monkeypatch, tmp_path)
    monkeypatch.setattr(lab_mod.accel_mod, "choose", lambda *a: Choice("tcg", "test"))
    monkeypatch.setattr(lab_mod.net, "can_use_taps", lambda: (False, "test"))
    monkeypatch.setattr(Lab, "_usable_snapshots", lambda *a: pytest.fail("--cold must not look for snapshots"))
    monkeypatch.setattr(Lab, "_save_snapshots", lambda *a: pytest.fail("--cold must not save snapshots"))
    monkeypatch.setattr(Lab, "_boot", lambda self, state, topo, plan, snapshots, deadline: None)
    state, _ = lab.up("default", "auto", "socket", cold=True)
    assert state.boot_mode == "cold boot"


# -- ownership and lab names -------------------------------------------------------------------

def _fake_qemu(uuid: str):
    """A real process whose command line carries ``-uuid UUID`` as its own arguments, as our QEMUs do."""
    import subprocess
    import sys
    import time

    from harness.vm import owner

    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "-uuid", uuid])
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        info = owner.process_info(proc.pid)
        if info is not None and owner.argv_uuid(info.argv) == uuid:
            break
        time.sleep(0.01)
    return proc


def test_lab_names_get_their_own_dirs_ids_and_locks(tmp_path):
    paths = Paths(images=tmp_path / "images", home=tmp_path / "home")
    default, second = Lab(paths), Lab(paths, "second")
    assert default.run_dir == paths.home / "run" and default.id == lab_state.lab_id(paths)
    assert second.run_dir == paths.home / "labs/second/run"
    assert len({default.id, second.id, Lab(paths, "third").id}) == 3
    assert len(f"sl{second.id}7") <= 15
    with default.locked():
        with second.locked():  # another name is another lab: no refusal
            pass


def test_down_kills_only_its_own_qemus_even_when_every_run_dir_is_the_same(tmp_path):
    """Two labs (two homes, or two names of one home): each one's down and crash sweep leaves the other's QEMU."""
    from harness.vm import owner

    paths = Paths(images=tmp_path / "images", home=tmp_path / "home")
    mine, theirs = Lab(paths, "mine"), Lab(paths, "theirs")
    lost = _fake_qemu(owner.new_vm_uuid(mine.key))  # ours, but the state file never learnt its pid
    other = _fake_qemu(owner.new_vm_uuid(theirs.key))
    try:
        assert mine.qemu_pids() == [lost.pid]
        done = mine.down()
        assert done == [f"pid {lost.pid}: killed (not in state)"]
        assert lost.wait(5) == -9
        assert other.poll() is None
        assert theirs.qemu_pids() == [other.pid]
    finally:
        for proc in (lost, other):
            proc.kill()
            proc.wait()


def test_a_recycled_pid_is_not_stopped(lab, monkeypatch):
    """The state names pid P, but P is now somebody else's process: down leaves it alone."""
    import os
    import subprocess
    import sys

    from harness.vm import owner

    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "socklab-server,"])
    try:
        vm = VMState(name="server", index=0, ssh_port=1, lab_ip="198.51.100.1/24", mgmt_mac="m", lab_mac="l",
                     pid=stranger.pid, uuid=owner.new_vm_uuid(lab.key), start_ticks=1)
        lab.save(LabState(lab_id=lab.id, topology="single", vms=[vm]))
        assert not lab.owned(vm)
        assert lab.down() == ["server: not running", "state, overlays and sockets: removed"]
        assert stranger.poll() is None
    finally:
        os.kill(stranger.pid, 9)
        stranger.wait()


def test_a_sigstopped_qemu_is_reported_as_stopped(lab):
    import os
    import signal
    import time

    from harness.vm import owner

    vm_uuid = owner.new_vm_uuid(lab.key)
    proc = _fake_qemu(vm_uuid)
    try:
        vm = VMState(name="server", index=0, ssh_port=1, lab_ip="198.51.100.1/24", mgmt_mac="m", lab_mac="l",
                     pid=proc.pid, uuid=vm_uuid, start_ticks=owner.start_ticks(proc.pid))
        lab.save(LabState(lab_id=lab.id, topology="single", vms=[vm]))
        assert lab.paused(vm) is None
        os.kill(proc.pid, signal.SIGSTOP)
        while not owner.stopped(proc.pid):
            time.sleep(0.01)
        started = time.monotonic()
        fault = lab.vm_fault("server")
        assert time.monotonic() - started < 1
        assert fault.startswith(f"QEMU of server (pid {proc.pid}) is stopped (process state T")
        assert f"kill -CONT {proc.pid}" in fault
        with pytest.raises(LabError, match="is stopped"):
            lab.ssh("server")
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("status,paused", [("paused", True), ("postmigrate", True), ("running", False)])
def test_a_guest_paused_over_qmp_is_reported_as_paused(lab, tmp_path, status, paused):
    from .fakes import FakeQMPServer

    from harness.vm import owner

    vm_uuid = owner.new_vm_uuid(lab.key)
    proc = _fake_qemu(vm_uuid)
    qmp = FakeQMPServer(tmp_path / "server.qmp", replies={"query-status": {"status": status, "running": False}})
    try:
        vm = VMState(name="server", index=0, ssh_port=1, lab_ip="198.51.100.1/24", mgmt_mac="m", lab_mac="l",
                     pid=proc.pid, uuid=vm_uuid, qmp=str(tmp_path / "server.qmp"))
        lab.save(LabState(lab_id=lab.id, topology="single", vms=[vm]))
        fault = lab.guest_paused("server")
        if paused:
            assert fault.startswith(f"the guest server is not running: QMP says {status!r}")
        else:
            assert fault is None
        assert "query-status" in qmp.commands
    finally:
        qmp.close()
        proc.kill()
        proc.wait()


def test_a_monitor_that_never_answers_does_not_hang_the_pause_check(lab, tmp_path):
    import time

    from .fakes import FakeQMPServer

    qmp = FakeQMPServer(tmp_path / "server.qmp", silent=True)
    vm = VMState(name="server", index=0, ssh_port=1, lab_ip="198.51.100.1/24", mgmt_mac="m", lab_mac="l",
                 pid=os.getpid(), qmp=str(tmp_path / "server.qmp"))
    started = time.monotonic()
    assert lab.paused(vm) is None
    assert time.monotonic() - started < 4 * QMP_PROBE
    qmp.close()


def test_the_lab_is_marked_ready_only_after_its_snapshots_are_saved_and_names_their_keys(lab, tmp_path, monkeypatch):
    """A socklab killed while saving leaves ready=False, so the next up cleans the lab instead of trusting it.

    The state then names each VM's snapshot key: a test (or a person) that must remove one lab's
    snapshots finds them there, not by hashing the VM's setup again.
    """
    monkeypatch.setattr(lab_mod.hostdeps, "ensure", lambda *a, **k: None)
    fake_boots(monkeypatch, tmp_path)
    monkeypatch.setattr(lab_mod.accel_mod, "choose", lambda *a: Choice("tcg", "test"))
    monkeypatch.setattr(lab_mod.net, "can_use_taps", lambda: (False, "test"))
    monkeypatch.setattr(Lab, "_usable_snapshots", lambda self, store, keys: {})

    def boot(self, state, topo, plan, snapshots, deadline):
        state.vms = [VMState(name=spec.name, index=i, ssh_port=1 + i, lab_ip="198.51.100.1/24", mgmt_mac="m",
                             lab_mac="l") for i, spec in enumerate(plan)]
        self.save(state)

    monkeypatch.setattr(Lab, "_boot", boot)
    seen, saved = [], {}

    def save_snapshots(self, state, store, keys):
        seen.append(self.load().ready)
        saved.update(keys)

    monkeypatch.setattr(Lab, "_save_snapshots", save_snapshots)
    state, _ = lab.up("default", "auto", "socket")
    assert seen == [False] and state.ready and lab.load().ready
    assert set(saved) == {"client", "server"} and saved["client"] != saved["server"]
    assert {vm.name: vm.snapshot for vm in lab.load().vms} == saved


def test_status_shows_a_paused_vm_and_does_not_ask_it_over_ssh():
    from rich.console import Console

    from harness.lab.status import status_table

    state = sample_state()
    state.name = "second"

    class PausedLab:
        def alive(self, state):
            return {"server": True}

        def paused(self, vm):
            return "QEMU of server (pid 123) is stopped"

        def ssh(self, name, timeout=30):
            raise AssertionError("a paused VM must not be asked over SSH")

    console = Console(width=120, record=True)
    console.print(status_table(PausedLab(), state, live=True))
    text = console.export_text()
    assert "socklab lab 'second': abc123 (default)" in text and "paused" in text


class _Stage:
    def __init__(self) -> None:
        self.updates: list[str] = []

    def update(self, text: str) -> None:
        self.updates.append(text)


def _console_vm(tmp_path: Path) -> VMState:
    log = tmp_path / "client.console.log"
    log.write_bytes(b"")
    return VMState(name="client", index=0, ssh_port=1, lab_ip="198.51.100.1/24", mgmt_mac="m", lab_mac="l",
                   console_log=str(log))


def test_a_cold_guest_is_reached_for_once_its_console_says_its_nics_are_up(lab, tmp_path, monkeypatch):
    import threading
    import time

    vm = _console_vm(tmp_path)
    monkeypatch.setattr(Lab, "owned", staticmethod(lambda vm: True))
    written = []

    def boot_prints() -> None:
        Path(vm.console_log).write_bytes(b"socklab: server ready for sshd\n")  # another VM's line is not ours
        time.sleep(0.2)
        written.append(time.monotonic())
        Path(vm.console_log).write_bytes(b"socklab: server ready for sshd\nsocklab: client ready for sshd\n")

    threading.Thread(target=boot_prints).start()
    stage = _Stage()
    assert lab._console_ready(vm, time.monotonic() + 5, threading.Event(), stage)
    assert written and time.monotonic() - written[0] < 0.2  # polled, not waited out
    assert stage.updates == ["client: NICs up, waiting for sshd"]


def test_waiting_for_the_console_ends_when_qemu_exits_or_time_runs_out(lab, tmp_path, monkeypatch):
    import threading
    import time

    vm = _console_vm(tmp_path)
    monkeypatch.setattr(Lab, "owned", staticmethod(lambda vm: False))
    started = time.monotonic()
    assert not lab._console_ready(vm, started + 5, threading.Event(), _Stage())
    assert time.monotonic() - started < 0.5
    monkeypatch.setattr(Lab, "owned", staticmethod(lambda vm: True))
    assert not lab._console_ready(vm, time.monotonic() + 0.2, threading.Event(), _Stage())
    abandon = threading.Event()
    abandon.set()
    assert not lab._console_ready(vm, time.monotonic() + 5, abandon, _Stage())


def test_the_wake_command_is_one_perl_program_with_the_seed_clock_and_peers():
    import shlex
    import shutil
    import subprocess

    from harness.lab.lifecycle import wake_command

    line = wake_command("ab" * 32, 1764650000.25, ["198.51.100.2", "198.51.100.3"])
    words = shlex.split(line)
    assert words[:2] == ["perl", "-e"] and len(words) == 3  # one exec, the shell's own
    script = words[2]
    assert 'my ($seed, $sec, $nsec) = ("' + "ab" * 32 + '", 1764650000, 250000000)' in script
    assert 'my @peers = ("198.51.100.2", "198.51.100.3")' in script and "0x5207" in script
    if shutil.which("perl"):  # compiles, without running it (it would set the host's clock)
        for peers in (["198.51.100.2"], []):  # a one-VM topology has no peer to reach
            alone = shlex.split(wake_command("ab" * 32, 1764650000.25, peers))[2]
            checked = subprocess.run(["perl", "-c", "-e", alone], capture_output=True, text=True)
            assert checked.returncode == 0, checked.stderr
    with pytest.raises(ValueError):
        wake_command("ab'; rm -rf /", 0.0, [])
    with pytest.raises(ValueError):
        wake_command("ab", 0.0, ["198.51.100.2'"])


def test_the_wake_line_carries_the_seed_clock_and_peers_and_takes_nothing_else():
    from harness.lab.lifecycle import wake_line

    assert wake_line("ab" * 4, 1764650000.25, ["198.51.100.2"]) == b"wake abababab 1764650000 250000000 198.51.100.2\n"
    assert wake_line("ab", 7.0, []) == b"wake ab 7 0\n"  # a one-VM lab has no peer
    for seed, peers in (("ab zz", []), ("ab\nwake", []), ("ab", ["198.51.100.2 x"])):
        with pytest.raises(ValueError):
            wake_line(seed, 0.0, peers)


def _read_line(fd: int, timeout: float = 10.0) -> bytes:
    import select

    got = b""
    deadline = time.monotonic() + timeout
    while not got.endswith(b"\n") and time.monotonic() < deadline:
        if select.select([fd], [], [], 0.1)[0]:
            got += os.read(fd, 4096)
    return got


@pytest.mark.skipif(not shutil.which("perl") or not shutil.which("setsid"), reason="the listener is perl, under setsid")
def test_the_wake_listener_refuses_a_line_that_is_not_a_wake_waits_on_and_ends_with_its_tty():
    """The listener on a pty instead of ttyS1. Only refusals are tried: a real wake would set the host's clock."""
    import pty
    import subprocess

    from harness.lab.lifecycle import WAKE_NAME, wake_listener_command

    master, slave = pty.openpty()
    try:
        # The slave stays open here too: closed before the listener opens it, the pty would hang up.
        subprocess.run(["bash", "-c", wake_listener_command(os.ttyname(slave))], check=True, timeout=30)
        for line in (b"hello\n", b"wake zz 1 2\n", b"wake ab 1 2 198.51.100.2;reboot\n", b"wake ab x 2\n"):
            os.write(master, line)
            assert _read_line(master) == b"wake failed: not a wake line\n", line  # raw: no echo of what was sent
        listening = subprocess.run(["pgrep", "-f", f"^{WAKE_NAME}$"], capture_output=True, text=True).stdout.split()
        assert listening, "the listener ended after a refusal"
    finally:
        os.close(master)  # the listener's next read fails: its tty hung up
        os.close(slave)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_running(int(pid)) for pid in listening):
        time.sleep(0.05)
    assert not any(_running(int(pid)) for pid in listening), "the listener outlived its tty"


def _fake_wake_port(path: Path, answer: bytes) -> tuple[list[bytes], "object"]:
    """A UNIX socket where QEMU's wake chardev would be: records the line it gets and answers ``answer``."""
    import socket
    import threading

    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    got: list[bytes] = []

    def serve():
        connection, _ = server.accept()
        with connection:
            got.append(_read_socket_line(connection))
            connection.sendall(answer)
        server.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return got, thread


def _read_socket_line(connection) -> bytes:
    line = b""
    while not line.endswith(b"\n"):
        chunk = connection.recv(4096)
        if not chunk:
            break
        line += chunk
    return line


@pytest.mark.parametrize("answer, woken", [
    (b"offloads 1 0\nwoken\n", "serial"),
    (b"wake failed: 198.51.100.2:22 did not answer in 5 s\n", None),
    (b"", None),  # the listener is gone: QEMU's chardev closes without a word
])
def test_the_serial_wake_sends_one_wake_line_and_only_a_woken_answer_counts(tmp_path, answer, woken):
    lab = Lab(Paths(images=tmp_path, home=tmp_path))
    state = LabState(lab_id="x", topology="default", name="default", image="", host_key="")
    client = VMState(name="client", index=0, ssh_port=1, lab_ip="198.51.100.1/24", mgmt_mac="", lab_mac="", qmp=str(tmp_path / "client.qmp"))
    server = VMState(name="server", index=1, ssh_port=2, lab_ip="198.51.100.2/24", mgmt_mac="", lab_mac="", qmp=str(tmp_path / "server.qmp"))
    state.vms += [client, server]
    got, thread = _fake_wake_port(tmp_path / "client.wake", answer)
    started = time.time()
    lab._serial_wake(state, client, timeout=10)
    thread.join(10)
    words = got[0].split()
    assert words[0] == b"wake" and len(words[1]) == 64 and words[4:] == [b"198.51.100.2"]
    assert abs(int(words[2]) + int(words[3]) / 1e9 - started) < 5
    assert lab.woken_by.get("client") == woken
    assert lab.woken_offloads("client") == (("on", "off") if woken else None)


def test_no_wake_port_leaves_the_wake_to_ssh(tmp_path):
    lab = Lab(Paths(images=tmp_path, home=tmp_path))
    state = LabState(lab_id="x", topology="default", name="default", image="", host_key="")
    vm = VMState(name="client", index=0, ssh_port=1, lab_ip="198.51.100.1/24", mgmt_mac="", lab_mac="", qmp=str(tmp_path / "client.qmp"))
    state.vms.append(vm)
    started = time.monotonic()
    lab._serial_wake(state, vm, timeout=10)
    assert "client" not in lab.woken_by and time.monotonic() - started < 1  # refused at once: no waiting


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_the_wake_reads_the_offloads_as_ethtool_would():
    """The perl part of the wake asks SIOCETHTOOL what Python's own ioctl gets for the same NIC (lo here)."""
    import fcntl
    import shutil
    import socket
    import struct
    import subprocess

    from harness.lab.lifecycle import ETHTOOL_GSG, ETHTOOL_GTXCSUM, SIOCETHTOOL, offloads_perl, wake_command

    assert offloads_perl("lab0") in wake_command("ab" * 32, 1.0, ["198.51.100.2"])
    if not shutil.which("perl"):
        pytest.skip("perl is not installed on this host")

    def python_ioctl(cmd: int) -> str:
        value = bytearray(struct.pack("II", cmd, 0))
        import ctypes

        buffer = (ctypes.c_char * len(value)).from_buffer(value)
        ifr = struct.pack("16sP16x", b"lo", ctypes.addressof(buffer))
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            fcntl.ioctl(sock.fileno(), SIOCETHTOOL, ifr)
        return "1" if struct.unpack("II", bytes(value))[1] else "0"

    ran = subprocess.run(["perl", "-e", offloads_perl("lo")], capture_output=True, text=True, timeout=30)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout == f"offloads {python_ioctl(ETHTOOL_GSG)} {python_ioctl(ETHTOOL_GTXCSUM)}\n"
    missing = subprocess.run(["perl", "-e", offloads_perl("nosuchnic0")], capture_output=True, text=True, timeout=30)
    assert missing.returncode != 0 and missing.stderr.startswith("ethtool nosuchnic0: No such device")
    with pytest.raises(ValueError):
        offloads_perl("lab0; reboot")


def test_the_status_table_uses_the_offloads_the_wake_read_once(monkeypatch):
    """After a restore the status asks no `ethtool -k`; later statuses ask the guest again."""
    from harness.lab import status as status_mod

    lab = Lab(Paths(images=Path("/nonexistent"), home=Path("/nonexistent")))
    asked = []

    class Guest:
        def run(self, command, timeout=None, check=False):
            asked.append(command)
            return SimpleNamespace(stdout="Features for lab0:\nscatter-gather: off\ntx-checksumming: on\n")

    monkeypatch.setattr(lab, "ssh", lambda name, timeout=None: Guest())
    lab._woken_offloads["server"] = ("on", "off")
    assert status_mod.offloads(lab, "server") == ("on", "off") and asked == []
    assert status_mod.offloads(lab, "server") == ("off", "on") and asked == ["ethtool -k lab0"]


def test_a_home_too_deep_for_qemu_s_sockets_is_named_before_anything_starts(tmp_path, monkeypatch):
    deep = tmp_path / ("d" * 100)
    lab = Lab(Paths(images=tmp_path / "images", home=deep))
    monkeypatch.setattr(lab_mod.hostdeps, "ensure", lambda *a, **k: None)
    fake_boots(monkeypatch, tmp_path)
    monkeypatch.setattr(lab_mod.accel_mod, "choose", lambda *a: Choice("tcg", "test"))
    monkeypatch.setattr(lab_mod.net, "can_use_taps", lambda: (False, "test"))
    monkeypatch.setattr(lab_mod.qemu, "start", lambda spec: pytest.fail("QEMU must not start"))
    with pytest.raises(LabError, match="a UNIX socket path must be under 108: point SOCKLAB_HOME"):
        lab.up("default", "auto", "socket")
    assert lab.load() is None


class _Events:
    """What the threads of a restore did, in order: ``record("running", "client")`` from any of them."""

    def __init__(self) -> None:
        import threading

        self.events: list[tuple[str, str]] = []
        self._lock = threading.Lock()

    def record(self, what: str, name: str) -> None:
        with self._lock:
            self.events.append((what, name))

    def of(self, name: str) -> list[str]:
        return [what for what, who in self.events if who == name]


def _restored_pair(tmp_path) -> LabState:
    vms = [VMState(name=name, index=i, ssh_port=1 + i, lab_ip=f"198.51.100.{i + 1}/24", mgmt_mac="m", lab_mac="l",
                   qmp=str(tmp_path / f"{name}.qmp")) for i, name in enumerate(("client", "server"))]
    return LabState(lab_id="abc123", topology="default", accel="tcg", segment="tap", vms=vms)


def test_a_restored_guest_logs_in_at_once_and_is_woken_once_every_guest_runs(lab, tmp_path, monkeypatch):
    import time

    log, state = _Events(), _restored_pair(tmp_path)
    events, record = log.events, log.record

    def resume(qmp: Path) -> None:
        if qmp.stem == "server":
            time.sleep(0.3)  # its state takes longer to load
        record("running", qmp.stem)

    monkeypatch.setattr(lab_mod.qemu, "resume_incoming", resume)
    monkeypatch.setattr(Lab, "_connect_watching", lambda self, guest, vm, *a, **k: record("logged in", vm.name))
    monkeypatch.setattr(Lab, "_wake", lambda self, state, vm: record("woken", vm.name))
    lab._wait_ssh(state, time.monotonic() + 5, _Stage(), restored=True)
    assert events.index(("logged in", "client")) < events.index(("running", "server"))  # not held back
    assert events.index(("woken", "client")) > events.index(("running", "server"))  # its peer runs first
    assert {what for what, name in events if name == "server"} == {"running", "logged in", "woken"}


def test_a_restored_guest_woken_on_its_serial_port_is_not_logged_in_and_one_not_woken_there_is(lab, tmp_path,
                                                                                                monkeypatch):
    import time

    log, state = _Events(), _restored_pair(tmp_path)
    record = log.record

    def serial_wake(self, state, vm, timeout):
        record("serial wake", vm.name)
        if vm.name == "client":  # the server's listener does not answer: it is woken over SSH
            self.woken_by[vm.name] = "serial"

    def connect_watching(self, guest, vm, timeout, abandon=None, guest_up=False, login=True):
        assert guest_up
        record("logged in" if login else "answers", vm.name)

    monkeypatch.setattr(lab_mod.qemu, "resume_incoming", lambda qmp: record("running", qmp.stem))
    monkeypatch.setattr(Lab, "_serial_wake", serial_wake)
    monkeypatch.setattr(Lab, "_connect_watching", connect_watching)
    monkeypatch.setattr(Lab, "_wake", lambda self, state, vm: record("woken over SSH", vm.name))
    lab._wait_ssh(state, time.monotonic() + 5, _Stage(), restored=True, listening={"client", "server"})
    client, server = log.of("client"), log.of("server")
    assert client[0] == "running" and sorted(client[1:]) == ["answers", "serial wake"]  # no login
    assert server[-2:] == ["logged in", "woken over SSH"] and sorted(server[1:-2]) == ["answers", "serial wake"]
    assert lab.woken_by == {"client": "serial"} and "client" not in lab._ssh and "server" in lab._ssh


@pytest.mark.parametrize("failing", ["resume", "login"])
def test_a_failed_restore_leaves_no_thread_waiting_for_a_wake(lab, tmp_path, monkeypatch, failing):
    """The server fails (its state does not load, or its login): the client's threads give up at once,
    not when the wake or the deadline would have ended them (a Ctrl-C must end `lab.up` promptly)."""
    import threading

    from harness.errors import SSHError

    state, stuck = _restored_pair(tmp_path), threading.Event()

    def resume(qmp: Path) -> None:
        if failing == "resume" and qmp.stem == "server":
            raise LabError("server: the state does not load")

    def connect_watching(self, guest, vm, timeout, abandon=None, guest_up=False, login=True):
        if vm.name == "server":
            time.sleep(0.1)  # the client is waiting for its wake by now
            raise SSHError("server: no SSH")

    monkeypatch.setattr(lab_mod.qemu, "resume_incoming", resume)
    monkeypatch.setattr(Lab, "_serial_wake", lambda self, state, vm, timeout: stuck.wait(30))  # never answers
    monkeypatch.setattr(Lab, "_connect_watching", connect_watching)
    monkeypatch.setattr(Lab, "_wake", lambda self, state, vm: pytest.fail("nothing is woken over SSH"))
    try:
        with pytest.raises(LabError, match="server"):
            lab._wait_ssh(state, time.monotonic() + 20, _Stage(), restored=True, listening={"client"})
        ended = time.monotonic() + 1
        threads = [t for t in threading.enumerate() if t.name.startswith(("socklab-up", "socklab-wake"))]
        waiting = [t for t in threads if t.name.startswith("socklab-up") or failing == "resume"]
        for thread in waiting:  # the wake itself is stuck in the fake when the login fails: only its waiter ends
            thread.join(max(0.0, ended - time.monotonic()))
        assert not [t.name for t in waiting if t.is_alive()]
    finally:
        stuck.set()


def test_a_guest_woken_over_ssh_counts_as_ready_once_woken(lab, tmp_path, monkeypatch):
    state, woken = _restored_pair(tmp_path), {}

    def wake(self, state, vm):
        time.sleep(0.2)
        woken[vm.name] = time.monotonic()

    monkeypatch.setattr(lab_mod.qemu, "resume_incoming", lambda qmp: None)
    monkeypatch.setattr(Lab, "_connect_watching", lambda self, guest, vm, *a, **k: None)
    monkeypatch.setattr(Lab, "_wake", wake)
    ready = lab._wait_ssh(state, time.monotonic() + 5, _Stage(), restored=True)
    assert ready >= max(woken.values())


@pytest.mark.parametrize("boot_mode, discarded", [("restored from snapshot", True), ("cold boot", False)])
def test_a_refused_login_discards_the_snapshot_the_guest_was_restored_from(lab, tmp_path, monkeypatch,
                                                                            boot_mode, discarded):
    from harness.errors import GuestUnreachable, SSHRefused

    image = tmp_path / "image"
    (image / "snapshots" / "k1").mkdir(parents=True)
    vm = VMState(name="server", index=0, ssh_port=1, lab_ip="198.51.100.2/24", mgmt_mac="m", lab_mac="l", pid=1,
                 image=str(image), snapshot="k1")
    lab.save(LabState(lab_id=lab.id, topology="single", ready=True, boot_mode=boot_mode, vms=[vm]))
    seen = {}

    def connect_watching(self, guest, vm, timeout, abandon=None, guest_up=False, login=True):
        seen["guest_up"] = guest_up
        raise SSHRefused("server: the guest refused the socklab key")

    monkeypatch.setattr(Lab, "owned", staticmethod(lambda vm: True))
    monkeypatch.setattr(Lab, "paused", lambda self, vm: None)
    monkeypatch.setattr(Lab, "_connect_watching", connect_watching)
    monkeypatch.setattr(Lab, "vm_fault", lambda self, name, settle=3.0: pytest.fail("a refusal is its own answer"))
    with pytest.raises(GuestUnreachable, match="refused the socklab key") as caught:
        lab.ssh("server")
    assert seen["guest_up"]  # a ready lab's guest is up: the banner is waited for, not probed for
    assert (image / "snapshots" / "k1").exists() is not discarded
    assert ("now discarded" in str(caught.value)) is discarded
