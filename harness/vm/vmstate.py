"""Ready snapshots: a booted, SSH-ready guest saved to a file so the next ``lab.up`` resumes it.

A snapshot of one VM is two files: the QEMU migration stream (RAM and device
state) and a frozen copy of the VM's disk overlay taken while the guest was
paused. A restore starts QEMU with ``-incoming`` on a fresh overlay whose
backing file is that frozen copy, so each restored guest starts from the same
ready state and writes nothing back: two restores in a row are independent.

Snapshots live in the image's cache entry (``snapshots/<key>/``) and go with
it. The key covers everything a restored guest depends on: the image's
digests, QEMU's version, and the VM's configuration (memory, CPUs, NICs,
kernel command line, accelerator). Ports, sockets and tap names are not in
it: the host side is new on every restore.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Collection
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from harness.vm import owner
from harness.vm import qemu
from harness.image.build import file_sha256, file_stamp

# 2: the saved guests run their agent servers; 3: and a wake listener on their second serial port
# (Lab._prepare_snapshot), which meta.json's "running" names.
SNAPSHOT_FORMAT = 3
STATE = "state.migration"
DISK = "disk.qcow2"
META = "meta.json"
# The state file's (size, mtime_ns, inode, digest) when its digest last matched: a restore
# hashes 80 MB per VM otherwise (0.08 s each, before QEMU can start). Any write to the
# file moves its mtime, and then it is hashed again, as image files are (image.build).
VERIFIED = "verified.json"


@lru_cache(maxsize=1)
def qemu_version() -> str:
    try:
        result = subprocess.run([qemu.QEMU, "--version"], capture_output=True, text=True, stdin=subprocess.DEVNULL)
    except OSError:
        return "unknown"
    return result.stdout.splitlines()[0].strip() if result.stdout else "unknown"


def vm_config(spec: qemu.VMSpec) -> dict:
    """The parts of a VM's setup a saved guest depends on (not ports, paths or tap names)."""
    return {
        "name": spec.name,
        "memory_mib": spec.memory_mib,
        "cpus": spec.cpus,
        "accel": spec.accel,
        # A bzImage and its PVH ELF run the same kernel, but QEMU loads different option ROMs for them.
        "kernel_file": spec.kernel.name,
        "kernel_append": spec.kernel_append(),
        "mgmt_mac": spec.mgmt_mac,
        "lab_nic": None if spec.lab_nic is None else {"mode": spec.lab_nic.mode, "mac": spec.lab_nic.mac},
    }


def snapshot_key(image_digests: dict, spec: qemu.VMSpec, version: str) -> str:
    payload = json.dumps({"format": SNAPSHOT_FORMAT, "image": image_digests, "qemu": version,
                          "vm": vm_config(spec)}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class SavedVM:
    """One VM's saved state in the store."""

    directory: Path

    @property
    def state(self) -> Path:
        return self.directory / STATE

    @property
    def disk(self) -> Path:
        return self.directory / DISK

    @property
    def running(self) -> frozenset[str]:
        """What the saved guest keeps running, as its save recorded (e.g. "wake-listener"); empty if unreadable."""
        try:
            meta = json.loads((self.directory / META).read_text())
        except (OSError, ValueError):
            return frozenset()
        names = meta.get("running") if isinstance(meta, dict) else None
        return frozenset(name for name in names if isinstance(name, str)) if isinstance(names, list) else frozenset()

    def problem(self) -> str | None:
        """Why this snapshot cannot be used, or None. A missing one is not a problem worth a warning."""
        try:
            meta = json.loads((self.directory / META).read_text())
        except FileNotFoundError:
            return "missing"
        except (OSError, ValueError) as exc:
            return f"unreadable metadata ({exc})"
        if not isinstance(meta, dict):
            return "unreadable metadata (not a JSON object)"
        for path, key in ((self.state, "state"), (self.disk, "disk")):
            if not path.is_file():
                return f"{path.name} is missing"
            if path.stat().st_size != meta.get(f"{key}_size"):
                return f"{path.name} has {path.stat().st_size} bytes, {meta.get(f'{key}_size')} were saved"
        digest = meta.get("state_sha256")
        stamp = self._stamp(digest)
        try:
            if json.loads((self.directory / VERIFIED).read_text()) == stamp:
                return None
        except (OSError, ValueError):
            pass
        if file_sha256(self.state) != digest:
            return f"{self.state.name} does not match its recorded digest"
        self.mark_verified(digest)
        return None

    def _stamp(self, digest: object) -> list:
        return [*file_stamp(self.state.stat()), digest]

    def mark_verified(self, digest: str) -> None:
        """Record that the state file, as it is now, has ``digest`` (a cache: failing to write it costs speed only)."""
        try:
            (self.directory / VERIFIED).write_text(json.dumps(self._stamp(digest)))
        except OSError:
            pass


class SavedVMStore:
    """Snapshots of one image, under ``<image entry>/snapshots/``."""

    def __init__(self, image_dir: Path) -> None:
        self.root = image_dir / "snapshots"

    def get(self, key: str) -> SavedVM:
        return SavedVM(self.root / key)

    def save(self, key: str, qmp_socket: Path, overlay: Path, running: Collection[str] = ()) -> SavedVM:
        """Save a running guest (paused meanwhile, resumed by the caller) under ``key``.

        Files are written into a temporary directory of this process's own
        (``.tmp-<key>-<pid>-<start ticks>-*``) and renamed into place, so a
        save that fails or is killed never leaves a snapshot that looks whole,
        two labs saving at once never write into one directory, and the next
        ``remove_interrupted`` knows a leftover by its dead owner. A snapshot
        another lab saved meanwhile is kept (a running lab may be using it).
        ``running`` names what the saved guest keeps running for its restores (``SavedVM.running``).
        """
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        final = self.root / key
        work = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-{os.getpid()}-{owner.start_ticks(os.getpid())}-",
                                     dir=self.root))
        try:
            qemu.migrate_to_file(qmp_socket, work / STATE)
            # The guest is paused and its disks flushed: the overlay is consistent.
            shutil.copyfile(overlay, work / DISK)
            digest = file_sha256(work / STATE)
            meta = {"format": SNAPSHOT_FORMAT, "state_size": (work / STATE).stat().st_size,
                    "disk_size": (work / DISK).stat().st_size, "state_sha256": digest, "running": sorted(running)}
            (work / META).write_text(json.dumps(meta, indent=2) + "\n")
            SavedVM(work).mark_verified(digest)  # just hashed: the first restore need not hash it again
            if SavedVM(final).problem() is not None:
                shutil.rmtree(final, ignore_errors=True)
                work.rename(final)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        self.remove_older_formats()
        return SavedVM(final)

    def remove_older_formats(self) -> list[Path]:
        """Delete the snapshots of an older SNAPSHOT_FORMAT: no key of this socklab names them again."""
        removed = []
        for path in self.root.iterdir() if self.root.is_dir() else ():
            try:
                meta = json.loads((path / META).read_text())
            except (OSError, ValueError):
                continue  # a save in progress, or not ours to judge
            if isinstance(meta, dict) and isinstance(meta.get("format"), int) and meta["format"] < SNAPSHOT_FORMAT:
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
        return removed

    def remove_interrupted(self, proc: Path = owner.PROC) -> list[Path]:
        """Delete the temporary directories of saves whose process is gone (socklab was killed mid-save)."""
        removed = []
        for path in self.root.glob(".tmp-*") if self.root.is_dir() else ():
            parts = path.name.split("-")
            try:
                pid, ticks = int(parts[2]), int(parts[3])
            except (IndexError, ValueError):
                pid, ticks = 0, 0  # an older layout, or a name we never wrote: not a live save
            info = owner.process_info(pid, proc) if pid else None
            if info is not None and info.state != "Z" and info.start_ticks == ticks:
                continue  # another lab is saving right now
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        return removed

    def discard(self, key: str) -> None:
        shutil.rmtree(self.root / key, ignore_errors=True)
