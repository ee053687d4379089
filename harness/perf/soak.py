"""Leak check: cycles of ``lab.up`` → one lab's check → ``lab.down``, counting what each cycle leaves behind.

After every cycle it counts, for the lab under test:

- ``qemu``: the lab's QEMU processes (by the lab key their ``-uuid`` starts with,
  ``harness/vm/owner.py``; by run directory for a lab without a key);
- ``taps``: network links named like the lab's taps (``sl<id>*``), in the root
  namespace and in the lab's own;
- ``netns``: network namespaces named ``socklab-<id>``;
- ``fds``: open descriptors of this process (the harness: SSH sockets, QMP, logs);
- ``threads``: threads of this process (paramiko transports, executors);
- ``run_files``: files left in the lab's run directory.

Each count must come back to what it was before the first cycle. A count that
is off right after ``down`` gets a moment to settle (a QEMU being reaped, a
transport thread ending) before it is called a leak.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from harness import progress
from harness.vm import owner
from harness.errors import LabError, SocklabError
from harness.lab.lifecycle import Lab
from harness.paths import Paths
from harness.vm.qemu import QEMU

# How long a count may take to come back after ``down`` before it is a leak.
SETTLE_SECONDS = 3.0


class LeakFound(LabError):
    """A soak cycle left something behind; the message names the cycle and the counts."""


@dataclass(frozen=True)
class Counts:
    """What one lab has on the host, and what this process holds, at one moment."""

    qemu: int
    taps: int
    netns: int
    fds: int
    threads: int
    run_files: int

    def differences(self, baseline: "Counts") -> dict[str, tuple[int, int]]:
        """``{name: (baseline, now)}`` for every count that is not back to ``baseline``."""
        return {f.name: (getattr(baseline, f.name), getattr(self, f.name))
                for f in fields(self) if getattr(self, f.name) != getattr(baseline, f.name)}

    def line(self) -> str:
        return " ".join(f"{name}={value}" for name, value in asdict(self).items())


def _ip(argv: list[str]) -> str:
    result = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    return result.stdout if result.returncode == 0 else ""


@dataclass
class Probe:
    """Where the counts come from; tests point it at a fake ``/proc`` and a fake ``ip``."""

    proc: Path = Path("/proc")
    ip: Callable[[list[str]], str] = _ip
    threads: Callable[[], int] = threading.active_count

    def counts(self, lab_id: str, run_dir: Path, lab_key: str | None = None) -> Counts:
        netns = f"socklab-{lab_id}"
        namespaces = {line.split()[0] for line in self.ip(["ip", "netns", "list"]).splitlines() if line.strip()}
        links = _link_names(self.ip(["ip", "-o", "link", "show"]))
        if netns in namespaces:
            links += _link_names(self.ip(["ip", "-n", netns, "-o", "link", "show"]))
        return Counts(
            qemu=len(owner.lab_qemus(lab_key, self.proc) if lab_key else self.qemu_pids(run_dir)),
            taps=sum(name.startswith(f"sl{lab_id}") for name in links),
            netns=int(netns in namespaces),
            fds=self.open_fds(),
            threads=self.threads(),
            run_files=sum(1 for path in run_dir.rglob("*") if not path.is_dir()) if run_dir.exists() else 0,
        )

    def qemu_pids(self, run_dir: Path) -> list[int]:
        """Live (not zombie) QEMU processes whose command line names ``run_dir``."""
        marker = str(run_dir).encode()
        pids = []
        for entry in self.proc.iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes()
                status = (entry / "status").read_bytes()
            except OSError:
                continue
            if cmdline.startswith(QEMU.encode()) and marker in cmdline and b"State:\tZ" not in status:
                pids.append(int(entry.name))
        return pids

    def open_fds(self) -> int:
        """Descriptors this process holds (the directory listing's own descriptor included, every time)."""
        return len(list((self.proc / "self" / "fd").iterdir()))


def _link_names(output: str) -> list[str]:
    """Interface names from ``ip -o link show`` (``3: sl2d22c60@if4: <...>`` gives ``sl2d22c60``)."""
    names = []
    for line in output.splitlines():
        parts = line.split(":", 2)
        if len(parts) >= 2 and parts[0].strip().isdigit():
            names.append(parts[1].strip().split("@")[0])
    return names


@dataclass
class Cycle:
    """One up → check → down, and the counts after it."""

    index: int
    counts: Counts
    up_seconds: float = 0.0
    check_seconds: float = 0.0
    down_seconds: float = 0.0
    check: str = ""
    error: str | None = None
    leaks: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def seconds(self) -> float:
        return self.up_seconds + self.check_seconds + self.down_seconds

    def line(self) -> str:
        state = "LEAK " + ", ".join(f"{name} {was}→{now}" for name, (was, now) in self.leaks.items()) \
            if self.leaks else "clean"
        error = f"  ERROR {self.error}" if self.error else ""
        return (f"cycle {self.index:>3}: {self.counts.line()}  up {self.up_seconds:.1f} s, check {self.check_seconds:.1f} s"
                f" ({self.check}), down {self.down_seconds:.1f} s  {state}{error}")


@dataclass
class SoakReport:
    """Every cycle's counts against the baseline taken before the first."""

    lab_name: str
    baseline: Counts
    cycles: list[Cycle] = field(default_factory=list)

    @property
    def leaks(self) -> list[str]:
        return [f"cycle {c.index}: " + ", ".join(f"{name} {was}→{now}" for name, (was, now) in c.leaks.items())
                for c in self.cycles if c.leaks]

    @property
    def errors(self) -> list[str]:
        return [f"cycle {c.index}: {c.error}" for c in self.cycles if c.error]

    @property
    def ok(self) -> bool:
        return not self.leaks and not self.errors

    def table(self) -> str:
        lines = [f"soak of {self.lab_name}: {len(self.cycles)} cycles of up → check → down",
                 f"baseline : {self.baseline.line()}"]
        lines += [cycle.line() for cycle in self.cycles]
        if self.cycles:
            total = sum(c.seconds for c in self.cycles)
            lines.append(f"{len(self.cycles)} cycles in {total:.0f} s ({total / len(self.cycles):.1f} s each); "
                         + ("every count back to the baseline after every cycle" if not self.leaks
                            else f"{len(self.leaks)} cycle(s) leaked")
                         + (f"; {len(self.errors)} cycle(s) failed" if self.errors else ""))
        return "\n".join(lines)

    def assert_clean(self) -> None:
        if self.leaks or self.errors:
            raise LeakFound("; ".join(self.leaks + self.errors))


def settled_counts(probe: Probe, lab: Lab, baseline: Counts, settle: float = SETTLE_SECONDS,
                   clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> Counts:
    """The counts, re-taken for up to ``settle`` s while any differs from ``baseline`` (reaping, threads ending)."""
    deadline = clock() + settle
    while True:
        counts = probe.counts(lab.id, lab.run_dir, getattr(lab, "key", None))
        if not counts.differences(baseline) or clock() >= deadline:
            return counts
        sleep(0.1)


def soak(paths_or_lab_factory: Paths | Callable[[], Lab], cycles: int = 30, lab_name: str = "03-listen", *,
         probe: Probe | None = None, say: Callable[[str], None] = print, stop_on_leak: bool = False,
         check_lab: Callable[[Lab, Any], str] | None = None, settle: float = SETTLE_SECONDS,
         quiet: bool = True) -> SoakReport:
    """Run ``cycles`` of up → check ``lab_name`` → down and count what each leaves behind.

    ``paths_or_lab_factory`` is the install to use (a new ``Lab`` on it per
    cycle, as separate commands would) or a function that makes the ``Lab``.
    A cycle that fails (up, check or down raising) is recorded and the lab
    brought down; the soak goes on. ``check_lab(lab, spec)`` replaces the
    check (tests); it returns a one-line summary. ``quiet`` keeps the
    progress lines of up and down out of the output.
    """
    from harness.scenario.check import LabSpec, prepare

    if cycles < 1:
        raise LabError(f"cycles must be at least 1, not {cycles}")
    make_lab = (lambda: Lab(paths_or_lab_factory)) if isinstance(paths_or_lab_factory, Paths) else paths_or_lab_factory
    probe = probe or Probe()
    spec = LabSpec.load(lab_name)
    prepare(spec)  # a lab that cannot be checked is one line now, not the same failure in every cycle
    check_lab = check_lab or _check
    first = make_lab()
    if first.load() is not None:
        raise LabError(f"a lab is already running in {first.paths.home}: a soak starts from no lab (`invoke lab.down`)")
    report = SoakReport(spec.name, probe.counts(first.id, first.run_dir, getattr(first, "key", None)))
    say(f"soak of {spec.name} in {first.paths.home}: {cycles} cycles of up → check → down")
    say(f"baseline : {report.baseline.line()}")
    for index in range(1, cycles + 1):
        lab = make_lab()
        cycle = Cycle(index, report.baseline)
        with _quiet_progress(quiet):
            _run_cycle(lab, spec, cycle, check_lab)
        cycle.counts = settled_counts(probe, lab, report.baseline, settle)
        cycle.leaks = cycle.counts.differences(report.baseline)
        report.cycles.append(cycle)
        say(cycle.line())
        if cycle.leaks and stop_on_leak:
            break
    say(report.table().splitlines()[-1])
    return report


def _run_cycle(lab: Lab, spec: Any, cycle: Cycle, check_lab: Callable[[Lab, Any], str]) -> None:
    """Up, check, down; times each; an error is recorded and the lab still brought down."""
    started = time.monotonic()
    try:
        lab.up(spec.topology, accel="auto")
        cycle.up_seconds = time.monotonic() - started
        started = time.monotonic()
        cycle.check = check_lab(lab, spec)
        cycle.check_seconds = time.monotonic() - started
    except (SocklabError, OSError) as exc:
        cycle.error = str(exc).splitlines()[0]
    finally:
        started = time.monotonic()
        try:
            lab.down()
        except (SocklabError, OSError) as exc:
            cycle.error = (cycle.error + "; " if cycle.error else "") + f"down: {exc}"
        cycle.down_seconds = time.monotonic() - started


@contextmanager
def _quiet_progress(quiet: bool) -> Iterator[None]:
    """Keep lab.up's and lab.down's progress lines out of the soak's own output."""
    saved = progress.console.quiet
    progress.console.quiet = quiet or saved
    try:
        yield
    finally:
        progress.console.quiet = saved


def _check(lab: Lab, spec: Any) -> str:
    """The lab's check; the summary is ``pass`` or what failed (a failed check is not a leak)."""
    from harness.scenario.check import check

    report = check(spec, lab)
    counts = report.counts
    if report.ok:
        return f"pass {counts['steps']} steps, {counts['assertions']} expectations"
    errors = [run.error.splitlines()[0] for run in report.runs if run.error]
    return (f"FAIL {counts['step_failures']}/{counts['steps']} steps, "
            f"{counts['assertion_failures']}/{counts['assertions']} expectations" + (f": {errors[0]}" if errors else ""))
