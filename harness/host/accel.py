"""Choose the accelerator: KVM only if it really runs a guest, else TCG.

On some hosts /dev/kvm opens and KVM_CREATE_VM succeeds, yet a guest hangs
before its kernel prints a line. So the probe boots the lab's own kernel under
KVM with no root file system and waits for it to panic (``panic=-1`` with
``-no-reboot`` makes QEMU exit): a kernel that got that far has run its whole
early boot. A working KVM does this in well under a second. The verdict is
cached per host boot (keyed by /proc/sys/kernel/random/boot_id).

Some cloud hosts offer /dev/kvm from ``kvm_pvm`` (pagetable-based
virtualization, for VMs without nested VMX/SVM): it runs only guest kernels
built for PVM, and a stock Debian kernel hangs there after its real-mode
setup. ``auto`` recognises such a host from /sys/module/kvm_pvm and uses TCG
without spending the probe's 8 s; ``--accel kvm`` still probes the chosen
kernel, so a PVM guest kernel given with ``--kernel-image`` gets KVM.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from harness.errors import LabError

PROBE_TIMEOUT = 8.0
ACCELS = ("auto", "kvm", "tcg")


@dataclass(frozen=True)
class ProbeResult:
    """What the KVM probe saw."""

    boots: bool
    detail: str
    seconds: float


@dataclass(frozen=True)
class Choice:
    """The accelerator to use and a sentence saying why."""

    accel: str
    reason: str


def kvm_device_usable(path: str = "/dev/kvm") -> tuple[bool, str]:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return False, f"{path}: {exc.strerror}"
    os.close(fd)
    return True, f"{path} opens"


def probe_kvm(kernel: Path, timeout: float = PROBE_TIMEOUT, popen: Callable[..., Any] = subprocess.Popen) -> ProbeResult:
    """Boot ``kernel`` under KVM until it panics for want of a root file system."""
    with tempfile.TemporaryDirectory(prefix="socklab-kvm-probe-") as tmp:
        log = Path(tmp) / "console.log"
        argv = [
            "qemu-system-x86_64", "-accel", "kvm", "-nodefaults", "-no-user-config", "-display", "none",
            "-no-reboot", "-m", "256", "-serial", f"file:{log}", "-kernel", str(kernel),
            "-append", "console=ttyS0 panic=-1 root=/dev/socklab-probe-no-root",
        ]
        started = time.monotonic()
        proc = popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            _out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            printed = log.read_text(errors="replace") if log.exists() else ""
            lines = len(printed.splitlines())
            return ProbeResult(False, f"a KVM guest hung: no panic within {timeout:.0f} s, {lines} console lines", timeout)
        elapsed = time.monotonic() - started
        printed = log.read_text(errors="replace") if log.exists() else ""
        if "Kernel panic" in printed:
            return ProbeResult(True, f"a KVM guest booted to its expected panic in {elapsed:.2f} s", elapsed)
        message = (err or "").strip().splitlines()
        return ProbeResult(False, f"QEMU under KVM exited {proc.returncode}: {message[-1] if message else 'no output'}", elapsed)


PVM_MODULE = Path("/sys/module/kvm_pvm")


def kvm_flavour(module_dir: Path = PVM_MODULE) -> str:
    """``pvm`` when /dev/kvm comes from kvm_pvm, else ``kvm``."""
    return "pvm" if module_dir.exists() else "kvm"


def decide(requested: str, device: tuple[bool, str], probe: Callable[[], ProbeResult],
           flavour: str = "kvm") -> Choice:
    """Pure decision: what to run, given the request, the device check, the KVM flavour and a (lazy) probe."""
    if requested not in ACCELS:
        raise LabError(f"unknown accelerator {requested!r}; use one of: {', '.join(ACCELS)}")
    if requested == "tcg":
        return Choice("tcg", "TCG requested with --accel tcg")
    usable, why = device
    if not usable:
        if requested == "kvm":
            raise LabError(f"--accel kvm, but KVM is unusable: {why}")
        return Choice("tcg", f"KVM unusable ({why}); using TCG")
    if flavour == "pvm" and requested == "auto":
        return Choice("tcg", "/dev/kvm is kvm_pvm (PVM), which runs only PVM guest kernels, not the stock Debian "
                             "ones; using TCG (for KVM speed: --kernel-image with a PVM guest kernel and --accel kvm)")
    result = probe()
    if result.boots:
        return Choice("kvm", f"KVM works: {result.detail}")
    if requested == "kvm":
        raise LabError(f"--accel kvm, but KVM does not run guests here: {result.detail}; use --accel tcg")
    return Choice("tcg", f"{why}, but {result.detail}; using TCG")


def boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def choose(requested: str, kernel: Path, cache_file: Path) -> Choice:
    """``decide`` with the probe's verdict cached in ``cache_file`` for this host boot."""

    def cached_probe() -> ProbeResult:
        current = boot_id()
        try:
            saved = json.loads(cache_file.read_text())
            # One verdict per host boot and kernel: a PVM guest kernel may boot where Debian's hangs.
            if saved.get("boot_id") == current and saved.get("kernel", str(kernel)) == str(kernel):
                result = ProbeResult(**saved["result"])
                return ProbeResult(result.boots, result.detail + " (probed earlier this boot)", result.seconds)
        except (OSError, ValueError, KeyError, TypeError, AttributeError):  # a damaged cache: probe again
            pass
        result = probe_kvm(kernel)
        cache_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        cache_file.write_text(json.dumps({"boot_id": current, "kernel": str(kernel), "result": asdict(result)}))
        return result

    return decide(requested, kvm_device_usable(), cached_probe, kvm_flavour())
