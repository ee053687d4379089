"""The bench's floor and peer (harness/perf/peer.py, virtiofsd_compat.py), with QEMU, vng and virtiofsd faked."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from harness.perf import peer, virtiofsd_compat
from harness.vm import qemu

SHAPE = peer.Shape("tcg", 512, 1)


def option_values(argv: list[str], option: str) -> list[str]:
    return [argv[i + 1] for i, arg in enumerate(argv) if arg == option]


def lab_spec(tmp_path: Path) -> qemu.VMSpec:
    return qemu.VMSpec(name="server", run_dir=tmp_path, kernel=tmp_path / "vmlinuz", initrd=tmp_path / "initrd.img",
                       overlay=tmp_path / "server.qcow2", ssh_port=40022, mgmt_mac="52:54:00:00:00:02",
                       lab_ip="198.51.100.1/24", lab_nic=None, accel="tcg", memory_mib=512, cpus=1)


# -- the floor ---------------------------------------------------------------

def test_the_floor_boots_a_lab_vms_machine_kernel_and_initrd_with_nothing_attached(tmp_path):
    floor = peer.floor_argv(tmp_path / "vmlinuz", tmp_path / "initrd.img", SHAPE)
    lab = qemu.qemu_argv(lab_spec(tmp_path))
    for option in ("-accel", "-cpu", "-m", "-smp", "-kernel", "-initrd"):
        assert option_values(floor, option) == option_values(lab, option), option
    for option in ("-drive", "-netdev", "-device"):
        assert option_values(floor, option) == []
    assert option_values(floor, "-serial") == ["stdio"] and "-nodefaults" in floor and "-daemonize" not in floor


def test_the_floor_keeps_the_lab_kernel_command_line_and_only_swaps_the_initrd_program(tmp_path):
    append = option_values(peer.floor_argv(tmp_path / "vmlinuz", tmp_path / "initrd.img", SHAPE), "-append")[0]
    lab_words = option_values(qemu.qemu_argv(lab_spec(tmp_path)), "-append")[0].split()
    head, _, init = append.partition(" -- ")
    assert {"console=ttyS0", "quiet", "panic=-1", "norandmaps"} <= set(head.split()) & set(lab_words)
    assert head.split()[-1] == "rdinit=/bin/busybox"
    assert init == f'sh -c "echo {peer.FLOOR_MARK}; /bin/busybox poweroff -f"'


class FakeQEMU:
    """A Popen whose stdout yields scripted lines, each read advancing a fake clock by one second."""

    def __init__(self, lines: list[str], clock: list[float], block: bool = False) -> None:
        self.lines, self.clock, self.block = lines, clock, block
        self.killed = threading.Event()
        self.returncode: int | None = None
        self.argv: list[str] = []

    def __call__(self, argv, **kwargs):
        self.argv = argv
        assert kwargs["stdin"] is subprocess.DEVNULL and kwargs["stdout"] is subprocess.PIPE
        self.stdout = self._read()
        return self

    def _read(self):
        for line in self.lines:
            self.clock[0] += 1.0
            yield line + "\n"
        if self.block:  # a guest that never powers off: the pipe stays open until QEMU is killed
            self.killed.wait(5)

    def poll(self):
        return self.returncode

    def wait(self, timeout=None):
        self.returncode = -9 if self.killed.is_set() else 0
        return self.returncode

    def kill(self):
        self.killed.set()


def test_the_floor_is_timed_to_its_line_not_to_the_kernel_echoing_the_command_line():
    clock = [100.0]
    fake = FakeQEMU(["SeaBIOS", f"[    0.000000] Kernel command line: ... echo {peer.FLOOR_MARK}; ...",
                     peer.FLOOR_MARK + "\r", "reboot: Power down"], clock)
    assert peer.time_floor(["qemu"], popen=fake, clock=lambda: clock[0]) == 3.0
    assert fake.returncode == 0


def test_a_floor_that_never_prints_its_line_says_how_it_ended():
    clock = [0.0]
    fake = FakeQEMU(["Kernel panic - not syncing: VFS: Unable to mount root fs"], clock)
    with pytest.raises(peer.PeerError, match="without printing .*Unable to mount root fs"):
        peer.time_floor(["qemu"], popen=fake, clock=lambda: clock[0])


def test_a_floor_guest_that_hangs_is_killed_at_the_timeout():
    clock = [0.0]
    fake = FakeQEMU(["booting"], clock, block=True)
    with pytest.raises(peer.PeerError, match="exit -9"):
        peer.time_floor(["qemu"], popen=fake, clock=lambda: clock[0], timeout=0.2)
    assert fake.killed.is_set()


# -- finding virtme-ng -------------------------------------------------------

def host(tools: dict[str, str], files: set[str], helps: dict[str, str]):
    """which, run and exists for a host with ``tools`` on PATH, ``files`` on disk and ``--help`` texts."""
    def run(argv, **kwargs):
        return SimpleNamespace(returncode=0, stdout=helps.get(argv[0], ""), stderr="")
    return dict(which=tools.get, run=run, exists=lambda path: path in files or path in tools.values())


FULL = {"vng": "/venv/bin/vng", "modprobe": "/sbin/modprobe", "busybox": "/bin/busybox", "debugfs": "/sbin/debugfs"}
UDEVD = {"/lib/systemd/systemd-udevd"}
RUST_HELP = "Usage: virtiofsd [OPTIONS] --shared-dir <shared-dir> --socket-path <socket-path>"
C_HELP = "usage: virtiofsd [options]\n    -o source=PATH             shared directory tree"


def test_without_virtme_ng_the_bench_is_told_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))  # no vng beside this Python either
    found = peer.peer_problem(tmp_path, **host({}, set(), {}))
    assert found == "virtme-ng is not installed (pip install 'socklab[peer]')"


def test_missing_host_tools_are_named_with_their_debian_packages(tmp_path):
    tools = {"vng": "/venv/bin/vng", "debugfs": "/sbin/debugfs"}
    found = peer.peer_problem(tmp_path, **host(tools, set(), {}))
    assert isinstance(found, str)
    for needed in ("modprobe (Debian: kmod)", "busybox (Debian: busybox-static)", "udevd (Debian: udev)"):
        assert needed in found
    assert "debugfs" not in found


def test_a_rust_virtiofsd_is_used_as_it_is(tmp_path):
    found = peer.peer_problem(tmp_path, **host(FULL, UDEVD | {"/usr/libexec/virtiofsd"},
                                               {"/usr/libexec/virtiofsd": RUST_HELP}))
    assert found == peer.Peer("/venv/bin/vng")


def test_qemus_c_virtiofsd_is_put_behind_the_adapter(tmp_path):
    found = peer.peer_problem(tmp_path, **host(FULL, UDEVD | {"/usr/lib/qemu/virtiofsd"},
                                               {"/usr/lib/qemu/virtiofsd": C_HELP}))
    assert isinstance(found, peer.Peer) and found.path_prefix == (str(tmp_path / "bin"),)
    adapter = tmp_path / "bin" / "virtiofsd"
    script = adapter.read_text()
    assert adapter.stat().st_mode & 0o111
    assert str(Path(virtiofsd_compat.__file__)) in script and '"/usr/lib/qemu/virtiofsd" "$@"' in script
    assert "C virtiofsd" in found.note


def test_no_virtiofsd_at_all_means_9p_which_the_cloud_kernel_lacks(tmp_path):
    found = peer.peer_problem(tmp_path, **host(FULL, UDEVD, {}))
    assert isinstance(found, str) and "9p" in found and "cloud kernel" in found


# -- running virtme-ng -------------------------------------------------------

def test_vng_runs_true_with_its_defaults_and_kvm_off_when_socklab_has_it_off():
    found = peer.Peer("/venv/bin/vng")
    assert peer.vng_argv(found, Path("/k/boot/vmlinuz-6.1"), "tcg") == [
        "/venv/bin/vng", "--run", "/k/boot/vmlinuz-6.1", "--exec", "true", "--disable-kvm"]
    assert "--disable-kvm" not in peer.vng_argv(found, Path("/k/boot/vmlinuz-6.1"), "kvm")


def test_vng_in_socklabs_shape_gets_its_vcpus_memory_and_cpu_model():
    argv = peer.vng_argv(peer.Peer("vng"), Path("/k/vmlinuz"), "tcg", peer.Shape("tcg", 768, 2))
    assert argv[argv.index("--cpus") + 1] == "2" and argv[argv.index("--memory") + 1] == "768M"
    # One word with `=`: argparse would take a separate "-cpu ..." for an option of its own.
    assert "--qemu-opts=-cpu qemu64,+rdrand" in argv


def test_vng_is_timed_with_the_adapter_first_on_path(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", "/usr/bin")
    seen = {}
    clock = iter([10.0, 22.5])

    def run(argv, **kwargs):
        seen.update(kwargs)
        return SimpleNamespace(returncode=0, stdout="", stderr="")
    found = peer.Peer("vng", ("/tmp/x/bin",))
    assert peer.time_vng(found, ["vng"], tmp_path, run=run, clock=lambda: next(clock)) == 12.5
    assert seen["env"]["PATH"] == "/tmp/x/bin:/usr/bin" and seen["cwd"] == tmp_path


def test_a_failed_vng_run_says_its_exit_and_last_lines(tmp_path):
    def run(argv, **kwargs):
        return SimpleNamespace(returncode=255, stdout="", stderr="booting\nvhost_backend_init failed\nProtocol error\n")
    with pytest.raises(peer.PeerError, match=re.escape("exited 255: vhost_backend_init failed | Protocol error")):
        peer.time_vng(peer.Peer("vng"), ["vng"], tmp_path, run=run)


def test_a_hung_vng_run_is_a_peer_error(tmp_path):
    def run(argv, **kwargs):
        raise subprocess.TimeoutExpired(argv, kwargs["timeout"])
    with pytest.raises(peer.PeerError, match="did not finish within 300 s"):
        peer.time_vng(peer.Peer("vng"), ["vng"], tmp_path, run=run)


def test_the_kernel_is_staged_with_its_modules_read_out_of_the_root_image(tmp_path):
    (tmp_path / "vmlinuz").write_bytes(b"bzImage")
    img = SimpleNamespace(kernel_release="6.1.0-57-cloud-amd64", kernel=tmp_path / "vmlinuz",
                          rootfs=tmp_path / "rootfs.ext4")
    calls = []

    def run(argv, **kwargs):
        calls.append(argv)
        target = Path(argv[2].split()[2]) / "6.1.0-57-cloud-amd64"
        target.mkdir(parents=True)
        (target / "modules.dep").write_text("")
        return SimpleNamespace(returncode=0, stdout="", stderr="")
    work = tmp_path / "work"
    kernel = peer.stage_kernel(img, work, run=run)
    assert kernel == work / "boot" / "vmlinuz-6.1.0-57-cloud-amd64" and kernel.read_bytes() == b"bzImage"
    assert calls == [["debugfs", "-R", f"rdump /usr/lib/modules/6.1.0-57-cloud-amd64 {work / 'lib/modules'}",
                      str(tmp_path / "rootfs.ext4")]]
    assert peer.stage_kernel(img, work, run=run) == kernel and len(calls) == 1  # staged once per bench


def test_a_module_tree_debugfs_could_not_copy_is_a_peer_error(tmp_path):
    (tmp_path / "vmlinuz").write_bytes(b"bzImage")
    img = SimpleNamespace(kernel_release="6.1", kernel=tmp_path / "vmlinuz", rootfs=tmp_path / "rootfs.ext4")

    def run(argv, **kwargs):
        return SimpleNamespace(returncode=1, stdout="", stderr="debugfs: Bad magic number in super-block")
    with pytest.raises(peer.PeerError, match="Bad magic number"):
        peer.stage_kernel(img, tmp_path / "work", run=run)


# -- the virtiofsd adapter ---------------------------------------------------

def test_virtme_ngs_rust_options_become_the_c_daemons():
    translated = virtiofsd_compat.translate("/usr/lib/qemu/virtiofsd", [
        "--syslog", "--no-announce-submounts", "--socket-path", "/tmp/virtmeX", "--shared-dir", "/",
        "--sandbox", "none", "--cache", "always"])
    assert translated == virtiofsd_compat.Translated(
        ["/usr/lib/qemu/virtiofsd", "--socket-path=/tmp/virtmeX", "-o", "source=/,cache=always,sandbox=chroot"],
        "/tmp/virtmeX")


def test_posix_acls_need_xattrs_in_the_c_daemon():
    translated = virtiofsd_compat.translate("c", ["--socket-path=/s", "--shared-dir=/r", "--posix-acl"])
    assert translated.argv[-1] == "source=/r,cache=auto,sandbox=chroot,posix_acl,xattr"


@pytest.mark.parametrize("args,message", [
    (["--socket-path", "/s", "--shared-dir", "/", "--thread-pool-size", "4"], "--thread-pool-size"),
    (["--shared-dir", "/"], "--socket-path and --shared-dir"),
])
def test_options_the_c_daemon_has_no_match_for_are_refused(args, message):
    with pytest.raises(ValueError, match=message):
        virtiofsd_compat.translate("c", args)


def test_the_adapter_writes_the_pid_file_virtme_ng_waits_for_once_the_socket_is_there(tmp_path):
    daemon = tmp_path / "c-virtiofsd"  # stands in for QEMU's daemon: makes its socket, then serves a while
    daemon.write_text('#!/bin/sh\nfor a; do case "$a" in --socket-path=*) s="${a#--socket-path=}";; esac; done\n'
                      'touch "$s"; sleep 0.2\n')
    daemon.chmod(0o755)
    sock = tmp_path / "virtmeX"
    sock.write_text("")  # virtme-ng's mkstemp leaves a file there
    assert virtiofsd_compat.main([str(daemon), "--socket-path", str(sock), "--shared-dir", "/"]) == 0
    assert int((tmp_path / "virtmeX.pid").read_text()) > 0


def test_the_adapter_answers_virtme_ngs_probes_without_starting_a_daemon(tmp_path, capsys):
    daemon = tmp_path / "c-virtiofsd"
    daemon.write_text("#!/bin/sh\necho virtiofsd version 7.2.22\n")
    daemon.chmod(0o755)
    assert virtiofsd_compat.main([str(daemon), "--version"]) == 0
    assert virtiofsd_compat.main([str(daemon), "--help"]) == 0
    assert "--readonly" not in capsys.readouterr().out  # so virtme-ng asks for no read-only mode it cannot get
