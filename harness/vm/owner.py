"""Which processes a lab owns: a QEMU is ours by its ``-uuid`` and its start time, never by a substring.

Every VM gets a UUID of its own at boot. Its first 8 hex digits are the lab's
key (a hash of the socklab home and the lab name), the rest is random, and it
is written to the state file before QEMU starts. A process is that VM's QEMU
when ``/proc/PID/cmdline`` holds ``-uuid`` followed by exactly that UUID as a
whole argument and, once recorded, its start time (``/proc/PID/stat`` field
22, clock ticks since boot) is the one seen right after the start. A recycled
pid, another checkout's lab, or another lab name of this checkout can never
match. A lab whose state file is lost is still found by its key prefix.
"""

from __future__ import annotations

import uuid as uuid_mod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")


@dataclass(frozen=True)
class ProcessInfo:
    """What ``/proc`` says about one process right now."""

    pid: int
    argv: tuple[str, ...]
    state: str  # R, S, D, T (stopped), t (traced), Z (zombie), ...
    start_ticks: int


def new_vm_uuid(lab_key: str) -> str:
    """A fresh UUID whose first 8 hex digits are ``lab_key``: unique per VM and boot, and traceable to its lab."""
    rest = uuid_mod.uuid4().hex[8:]
    text = (lab_key + "0" * 8)[:8] + rest
    return str(uuid_mod.UUID(text))


def process_info(pid: int, proc: Path = PROC) -> ProcessInfo | None:
    """The process ``pid`` as ``/proc`` shows it, or None if it is gone or unreadable."""
    try:
        raw_argv = (proc / str(pid) / "cmdline").read_bytes()
        stat = (proc / str(pid) / "stat").read_text(errors="replace")
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may itself hold spaces or ')'.
    after = stat.rpartition(")")[2].split()
    try:
        state, start_ticks = after[0], int(after[19])
    except (IndexError, ValueError):
        return None
    argv = tuple(part.decode(errors="replace") for part in raw_argv.split(b"\0")[:-1]) if raw_argv else ()
    return ProcessInfo(pid, argv, state, start_ticks)


def argv_uuid(argv: tuple[str, ...]) -> str | None:
    """The value of ``-uuid`` in a QEMU command line, as a whole argument; None if there is none."""
    for index, arg in enumerate(argv[:-1]):
        if arg == "-uuid":
            return argv[index + 1]
    return None


def owns(pid: int, vm_uuid: str, start_ticks: int = 0, proc: Path = PROC) -> bool:
    """Whether ``pid`` is alive (not a zombie) and is the QEMU started with ``-uuid vm_uuid``.

    ``start_ticks`` (0 when not recorded yet) must match too, so a pid reused
    by a QEMU that happens to copy our command line still does not count.
    """
    info = process_info(pid, proc) if pid > 0 and vm_uuid else None
    if info is None or info.state == "Z" or argv_uuid(info.argv) != vm_uuid:
        return False
    return not start_ticks or info.start_ticks == start_ticks


def start_ticks(pid: int, proc: Path = PROC) -> int:
    info = process_info(pid, proc)
    return info.start_ticks if info else 0


def pids_with_uuid(match: Callable[[str], bool], proc: Path = PROC) -> list[int]:
    """Live pids whose ``-uuid`` argument satisfies ``match(uuid)`` (zombies excluded)."""
    found: list[int] = []
    try:
        entries = list(proc.iterdir())
    except OSError:
        return found
    for entry in entries:
        if not entry.name.isdigit():
            continue
        info = process_info(int(entry.name), proc)
        if info is None or info.state == "Z":
            continue
        value = argv_uuid(info.argv)
        if value is not None and match(value):
            found.append(info.pid)
    return sorted(found)


def lab_qemus(lab_key: str, proc: Path = PROC) -> list[int]:
    """Pids of every live QEMU started by the lab with key ``lab_key`` (even if its state file is lost)."""
    prefix = lab_key[:8]
    return pids_with_uuid(lambda value: value.replace("-", "")[:8] == prefix, proc)


def stopped(pid: int, proc: Path = PROC) -> bool:
    """Whether ``pid`` is stopped by a signal (SIGSTOP, SIGTSTP: state T) or held by a tracer (t)."""
    info = process_info(pid, proc)
    return info is not None and info.state in ("T", "t")
