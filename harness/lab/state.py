"""A lab's state on disk: what it started (``run/lab.json``, 0600), its key, and its kept console logs.

Everything a lab starts is written to its state file the moment it exists, so
``down`` can always find and remove it: after a failure, after Ctrl-C, or from
another process after a crash. Reading the file back checks every field's
type, so a damaged file is one sentence, not a traceback in ``down``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from harness import load as textio
from harness.errors import LabError
from harness.paths import DEFAULT_LAB, Paths

STATE_VERSION = 1
# Console logs of earlier labs kept in home/logs, per VM, beside the latest.
KEPT_LOGS = 5


@dataclass
class VMState:
    """One guest as started: what ``down`` needs to stop it and ``ssh`` needs to reach it."""

    name: str
    index: int
    ssh_port: int
    lab_ip: str
    mgmt_mac: str
    lab_mac: str
    tap: str = ""
    # What it boots: the image entry (userland), the kernel's release, its host key.
    image: str = ""
    kernel: str = ""
    kernel_image: str = ""
    host_key: str = ""
    pid: int = 0
    overlay: str = ""
    qmp: str = ""
    console: str = ""
    console_log: str = ""
    # Who the QEMU is: its -uuid (set before it starts) and its start time in /proc (set right after).
    uuid: str = ""
    start_ticks: int = 0
    # The snapshot store key of this VM's setup (harness/vm/vmstate.py snapshot_key): what a restore
    # of this setup reads and a save writes, whether or not this up did either (`--cold` does neither).
    snapshot: str = ""

    @property
    def console_path(self) -> Path:
        return Path(self.console)

    @property
    def address(self) -> str:
        """The lab-segment address without its prefix length."""
        return self.lab_ip.split("/")[0]


@dataclass
class LabState:
    """The running lab, as written to ``run/lab.json``."""

    lab_id: str
    topology: str
    name: str = DEFAULT_LAB
    accel: str = ""
    accel_reason: str = ""
    segment: str = ""
    segment_reason: str = ""
    netns: str = ""
    image: str = ""
    host_key: str = ""
    started_at: float = 0.0
    # First QEMU start to the last guest ready: sshd logged in to (cold), or answering and woken (restored:
    # its banner and the serial wake, or the login and the SSH wake when the serial wake failed).
    boot_seconds: float = 0.0
    boot_mode: str = ""
    ready: bool = False
    owner_pid: int = 0
    vms: list[VMState] = field(default_factory=list)
    version: int = STATE_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "LabState":
        data = json.loads(text)
        if data.get("version") != STATE_VERSION:
            raise LabError(f"lab state has version {data.get('version')}, this socklab writes {STATE_VERSION}")
        vms = [VMState(**vm) for vm in data.pop("vms", [])]
        return cls(**data, vms=vms)

    def vm(self, name: str) -> VMState:
        for vm in self.vms:
            if vm.name == name:
                return vm
        raise LabError(f"no VM named {name!r} in this lab; it has: {', '.join(v.name for v in self.vms)}")


def check_field_types(state: LabState) -> None:
    """Every field of a loaded state has its declared type: ``down`` must not trip over a pid that is a string."""
    kinds: dict[str, type | tuple[type, ...]] = {"int": int, "str": str, "float": (int, float), "bool": bool}
    records: list[LabState | VMState] = [state, *state.vms]
    for record in records:
        for spec in fields(record):
            kind = kinds.get(str(spec.type))
            value = getattr(record, spec.name)
            if kind is not None and (not isinstance(value, kind) or (isinstance(value, bool) and kind is int)):
                raise ValueError(f"`{spec.name}` is {value!r}")
        if isinstance(record, LabState) and not all(isinstance(vm, VMState) for vm in record.vms):
            raise ValueError("`vms` is not a list of VMs")


def lab_key(paths: Paths, name: str = DEFAULT_LAB) -> str:
    """8 hex digits, stable per install and lab name; the first 6 name the netns and taps, all 8 start VM UUIDs.

    The lab named ``default`` keeps the key of a home alone, so its netns and
    taps are named as before lab names existed.
    """
    where = str(paths.home.resolve()) + ("" if name == DEFAULT_LAB else f"\0{name}")
    return hashlib.sha256(where.encode()).hexdigest()[:8]


def lab_id(paths: Paths, name: str = DEFAULT_LAB) -> str:
    """Short, stable per install and lab name: names the netns and taps so two labs never collide."""
    return lab_key(paths, name)[:6]


def lab_names(paths: Paths) -> list[str]:
    """The names of the labs this install has state for (running or not cleaned up)."""
    names = [DEFAULT_LAB] if (paths.run / "lab.json").exists() else []
    labs = paths.home / "labs"
    if labs.is_dir():
        names += sorted(entry.name for entry in labs.iterdir() if (entry / "run" / "lab.json").exists())
    return names


def read_state(state_file: Path) -> LabState | None:
    """The state in ``state_file``, None when there is none; a damaged file is a LabError naming it."""
    if not state_file.exists() and not state_file.is_symlink():
        return None
    try:
        text = textio.read_text(state_file, "lab state", error=LabError)
        if not text.strip():
            raise ValueError("the file is empty")
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError(f"it holds {textio.describe_type(data) if data is not None else 'null'}, "
                             "not the lab's record")
        state = LabState.from_json(text)
        check_field_types(state)
        return state
    except LabError as exc:
        message = str(exc)
        reason = message[len(str(state_file)):].lstrip(":0123456789 ") if message.startswith(
            str(state_file)) else message
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
    raise LabError(f"{state_file}: unreadable lab state ({reason}); run `invoke lab.down` to clear it")


def write_state(state_file: Path, state: LabState) -> None:
    """Replace ``state_file`` atomically with ``state``, mode 0600 (its directory must exist)."""
    tmp = state_file.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(state.to_json())
    tmp.replace(state_file)


def keep_log(log: Path, logs: Path, kept: int = KEPT_LOGS) -> None:
    """Move a console log into ``logs``; earlier ones become ``NAME.1`` (newest) to ``NAME.<kept>``.

    A log the guest wrote nothing to (a restored guest that printed nothing)
    is dropped, so it never pushes out one that shows a panic.
    """
    target = logs / log.name
    try:
        empty = log.stat().st_size == 0
    except OSError:
        return
    if empty and target.exists():
        log.unlink(missing_ok=True)
        return
    if target.exists() and target.stat().st_size > 0:
        for index in range(kept - 1, 0, -1):
            older = logs / f"{log.name}.{index}"
            if older.exists():
                older.replace(logs / f"{log.name}.{index + 1}")
        target.replace(logs / f"{log.name}.1")
    shutil.move(str(log), target)
