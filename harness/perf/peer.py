"""What socklab's boot is held against in ``invoke bench``: bare QEMU's floor, and virtme-ng.

**The floor** is the least any VM of socklab's shape can take: the same QEMU,
kernel, initrd, kernel command line, accelerator, CPU model, memory and vCPUs
as a lab VM, with no disk, NIC or SSH. Only the initrd's program differs:
``rdinit=/bin/busybox`` runs a shell that prints one line and powers off. Time
is counted from QEMU's start to that line on the serial console, so it holds
QEMU's start, the firmware, the kernel's boot and the unpacking of socklab's
own initrd, and nothing a lab adds after its first userspace instruction (the
virtio drivers are modules the initrd loads, so the missing disk and NICs cost
the kernel nothing before that line).

**The peer** is virtme-ng (the ``[peer]`` extra): boot, run ``true``, exit, as
one ``vng`` process. It runs socklab's own kernel, given with the module tree
from the image's root file system beside it (virtme-ng builds its initramfs from
it: the cloud kernel has virtio-fs as a module and no 9p at all), and the
host's root over virtio-fs, which is virtme-ng's default. Once with its defaults,
once in socklab's VM shape. ``peer_problem`` says in one sentence what is missing
when it cannot run here.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.image.build import Image
from harness.vm import qemu

FLOOR_MARK = "socklab-floor: first userspace line"
# Everything after `--` is init's argv (init/main.c); the kernel strips the double quotes.
FLOOR_INIT = ("rdinit=/bin/busybox", "--", "sh", "-c", f'"echo {FLOOR_MARK}; /bin/busybox poweroff -f"')
FLOOR_TIMEOUT = 120.0
PEER_TIMEOUT = 300.0

# Where virtme-ng looks for virtiofsd (virtme/commands/run.py, VirtioFS._get_virtiofsd_path), PATH first.
VIRTIOFSD_PLACES = ("/usr/libexec/virtiofsd", "/usr/lib/virtiofsd/virtiofsd", "/usr/lib/virtiofsd",
                    "/usr/lib/qemu/virtiofsd")
# virtme-ng-init finds its virtio-serial ports through udev's /dev/virtio-ports links; it runs the
# host's udevd inside the guest (the guest's root is the host's).
UDEVD_PLACES = ("/lib/systemd/systemd-udevd", "/usr/lib/systemd/systemd-udevd", "/sbin/udevd")


class PeerError(RuntimeError):
    """A floor or peer run that did not end as it should; the message says how it ended."""


@dataclass(frozen=True)
class Shape:
    """A VM's shape as socklab starts it (``harness.vm.qemu.machine_args``)."""

    accel: str
    memory_mib: int
    cpus: int


# -- the floor ---------------------------------------------------------------

def floor_argv(kernel: Path, initrd: Path, shape: Shape) -> list[str]:
    """QEMU for the floor: a lab VM's machine, kernel, initrd and command line; serial on stdout; nothing else."""
    spec = qemu.VMSpec(name="floor", run_dir=Path("/nonexistent"), kernel=kernel, initrd=initrd,
                       overlay=Path("/nonexistent"), ssh_port=0, mgmt_mac="", lab_ip="", lab_nic=None,
                       accel=shape.accel, memory_mib=shape.memory_mib, cpus=shape.cpus, extra_append=FLOOR_INIT)
    return [qemu.QEMU, *qemu.BASE_ARGS,
            *qemu.machine_args(shape.accel, shape.memory_mib, shape.cpus),
            "-kernel", str(kernel), "-initrd", str(initrd), "-append", spec.kernel_append(),
            "-serial", "stdio"]


def time_floor(argv: Sequence[str], popen: Callable[..., Any] = subprocess.Popen,
               clock: Callable[[], float] = time.monotonic, timeout: float = FLOOR_TIMEOUT) -> float:
    """Seconds from starting ``argv`` to FLOOR_MARK on its console; QEMU is then left to power off (or killed)."""
    started = clock()
    proc = popen(list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                 text=True, errors="replace")
    watchdog = threading.Timer(timeout, proc.kill)  # a guest that never prints must not hang the bench
    watchdog.start()
    elapsed: float | None = None
    tail: list[str] = []
    try:
        for line in proc.stdout:
            if line.strip() == FLOOR_MARK:  # not the kernel echoing its command line, which holds it too
                elapsed = clock() - started
                break
            tail = [*tail[-4:], line.strip()]
        for _ in proc.stdout:  # drain, so QEMU never blocks on a full pipe while powering off
            pass
        proc.wait(timeout=timeout)
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if elapsed is None:
        raise PeerError(f"the floor's QEMU ended without printing {FLOOR_MARK!r} (exit {proc.returncode}): "
                        + " | ".join(line for line in tail if line))
    return elapsed


# -- virtme-ng ---------------------------------------------------------------

@dataclass(frozen=True)
class Peer:
    """A virtme-ng that can run here: its ``vng`` and the PATH entries it needs in front (a virtiofsd adapter)."""

    vng: str
    path_prefix: tuple[str, ...] = ()
    note: str = ""


def find_vng(which: Callable[[str], str | None] = shutil.which) -> str | None:
    """``vng`` on PATH, or beside this Python (an install of the ``[peer]`` extra into a venv not activated)."""
    beside = Path(sys.executable).parent / "vng"
    return which("vng") or (str(beside) if beside.is_file() and os.access(beside, os.X_OK) else None)


def virtiofsd_kind(path: str, run: Callable[..., Any] = subprocess.run) -> str:
    """``rust`` (takes --shared-dir, as virtme-ng passes), ``c`` (QEMU's own, -o source=) or ``""`` (neither)."""
    try:
        helped = run([path, "--help"], stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return ""
    text = helped.stdout + helped.stderr
    if "--shared-dir" in text:
        return "rust"
    if "source=" in text:
        return "c"
    return ""


def peer_problem(workdir: Path, which: Callable[[str], str | None] = shutil.which,
                 run: Callable[..., Any] = subprocess.run,
                 exists: Callable[[str], bool] = os.path.exists) -> Peer | str:
    """A runnable virtme-ng, or one sentence saying what this host lacks for it.

    For QEMU's C virtiofsd an adapter script is written into ``workdir/bin``
    (``harness/perf/virtiofsd_compat.py``).
    """
    vng = find_vng(which)
    if vng is None:
        return "virtme-ng is not installed (pip install 'socklab[peer]')"
    missing = [f"{tool} (Debian: {package})" for tool, package in
               (("modprobe", "kmod"), ("busybox", "busybox-static"), ("debugfs", "e2fsprogs")) if which(tool) is None]
    if not any(exists(place) for place in UDEVD_PLACES):
        missing.append("udevd (Debian: udev), which virtme-ng-init needs to find its I/O ports")
    if missing:
        return f"virtme-ng needs on the host: {', '.join(missing)}"
    places = [found for found in (which("virtiofsd"), *VIRTIOFSD_PLACES) if found and exists(found)]
    kinds = {place: virtiofsd_kind(place, run) for place in places}
    if any(kind == "rust" for kind in kinds.values()):
        return Peer(vng)
    c_daemon = next((place for place, kind in kinds.items() if kind == "c"), None)
    if c_daemon is None:
        return ("no virtiofsd here (Debian: virtiofsd, the Rust one); virtme-ng would fall back to 9p, "
                "which the Debian cloud kernel does not have")
    bin_dir = workdir / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    adapter = bin_dir / "virtiofsd"
    compat = Path(__file__).with_name("virtiofsd_compat.py")
    adapter.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{compat}" "{c_daemon}" "$@"\n')
    adapter.chmod(0o755)
    return Peer(vng, (str(bin_dir),), note=f"QEMU's C virtiofsd ({c_daemon}) behind harness/perf/virtiofsd_compat.py")


def version(found: Peer, run: Callable[..., Any] = subprocess.run) -> str:
    """What ``vng --version`` says (``virtme-ng 1.42``), or empty."""
    try:
        done = run([found.vng, "--version"], stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return ""
    return (done.stdout or done.stderr).strip().splitlines()[0] if (done.stdout or done.stderr).strip() else ""


def stage_kernel(img: Image, workdir: Path, run: Callable[..., Any] = subprocess.run) -> Path:
    """The image's kernel laid out as a package root, with its modules copied out of the image's root file system.

    virtme-ng looks for a kernel's modules in ``lib/modules/RELEASE`` above the
    kernel file; socklab's cache keeps them only inside ``rootfs.ext4``, which
    ``debugfs`` reads without mounting it.
    """
    release = img.kernel_release
    kernel = workdir / "boot" / f"vmlinuz-{release}"
    modules = workdir / "lib" / "modules"
    if (modules / release / "modules.dep").is_file() and kernel.is_file():
        return kernel
    kernel.parent.mkdir(parents=True, exist_ok=True)
    modules.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(img.kernel, kernel)
    done = run(["debugfs", "-R", f"rdump /usr/lib/modules/{release} {modules}", str(img.rootfs)],
               stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    if done.returncode != 0 or not (modules / release / "modules.dep").is_file():
        raise PeerError(f"could not copy the modules of {release} out of {img.rootfs}: {done.stderr.strip()[-300:]}")
    return kernel


def vng_argv(peer: Peer, kernel: Path, accel: str, shape: Shape | None = None) -> list[str]:
    """``vng`` to boot ``kernel``, run ``true`` and exit: its defaults, or (``shape``) socklab's VM shape."""
    argv = [peer.vng, "--run", str(kernel), "--exec", "true"]
    if accel != "kvm":
        argv.append("--disable-kvm")  # socklab found KVM unusable here; so would a guest of virtme-ng
    if shape is not None:
        # --qemu-opts comes after virtme-ng's own -cpu on QEMU's command line, and QEMU takes the last one;
        # `=` keeps argparse from reading the value, which starts with a dash, as an option.
        argv += ["--cpus", str(shape.cpus), "--memory", f"{shape.memory_mib}M",
                 f"--qemu-opts=-cpu {qemu.cpu_model(shape.accel)}"]
    return argv


def time_vng(peer: Peer, argv: Sequence[str], cwd: Path, run: Callable[..., Any] = subprocess.run,
             clock: Callable[[], float] = time.monotonic, timeout: float = PEER_TIMEOUT) -> float:
    """Wall-clock seconds of one ``vng`` run; PeerError unless it exits 0 (``true``'s status, passed through)."""
    env = dict(os.environ)
    if peer.path_prefix:
        env["PATH"] = os.pathsep.join([*peer.path_prefix, env.get("PATH", "")])
    started = clock()
    try:
        done = run(list(argv), cwd=cwd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                   errors="replace", timeout=timeout)
    except subprocess.TimeoutExpired:
        raise PeerError(f"virtme-ng did not finish within {timeout:.0f} s") from None
    elapsed = clock() - started
    if done.returncode != 0:
        last = [line.strip() for line in (done.stderr or done.stdout or "").splitlines() if line.strip()][-2:]
        raise PeerError(f"virtme-ng exited {done.returncode}: {' | '.join(last) or 'no output'}")
    return elapsed
