"""The kernel matrix: every lab on every kernel, one lab at a time, as a lab x kernel table.

For each kernel the matrix boots the lab on it, runs every lab's check (kernel
against the model of that kernel, then the expectations), and stops it before
the next kernel boots, so one lab runs at a time. A cell is ``pass`` or the
steps and figures that differ. Each kernel's column names the model's version
rules that make it differ from 6.1, and each guide's "On newer kernels" part
is checked against those rules: every rule it names must exist, and a lab whose
run depends on a rule must say so. Checks that are no lab (``KernelCheck``: the fuzz
corpus and a fixed-seed fuzz, from harness.fuzz.matrix) run after the labs on the
same lab, as rows of their own with their figures under the table.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.errors import LabError
from harness.model import versions
from harness.scenario.check import LabSpec, check, known_labs, prepare

# The guide part, and the rules it names: <!-- kernel-rules: a b --> (or "none").
GUIDE_HEADING = "## On newer kernels"
GUIDE_RULES = re.compile(r"<!--\s*kernel-rules:\s*(?P<names>[^>]*?)\s*-->")
# Which rule decides a lab's figures: the lab's expected template or scenario asks for it.
RULE_USE = re.compile(r"""kernel\.rule\(\s*["'](?P<name>[\w.]+)["']""")


@dataclass
class Cell:
    """One lab (or kernel check) on one kernel: passed, or what differed; a check's figures too."""

    ok: bool
    differences: list[str] = field(default_factory=list)
    seconds: float = 0.0
    figures: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class KernelCheck:
    """A check that is no lab, run on each kernel's lab after the labs: a row of the table of its own.

    The fuzz corpus and a fixed-seed fuzz are such checks (harness.fuzz.matrix); ``run`` gets the
    running lab and returns its cell, figures included.
    """

    name: str
    run: Callable[[Any], Cell]


@dataclass
class MatrixResult:
    kernels: list[str]
    labs: list[str]
    cells: dict[tuple[str, str], Cell] = field(default_factory=dict)
    guide_problems: dict[str, list[str]] = field(default_factory=dict)
    releases: dict[str, str] = field(default_factory=dict)
    checks: list[str] = field(default_factory=list)  # the KernelCheck rows, after the labs

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.cells.values()) and not any(self.guide_problems.values())


def cell_of(report: Any, seconds: float = 0.0) -> Cell:
    """A check report as a cell: each disagreeing step and failed expectation, with both values."""
    differences = []
    for run in report.runs:
        if run.error:
            differences.append(f"{run.scenario.name}: aborted: {run.error.splitlines()[0][:160]}")
        for record in run.records:
            if record.verdict is not None and not record.verdict.ok:
                kernel = record.kernel.describe() if record.kernel else "-"
                model = record.model.describe() if record.model else "-"
                differences.append(f"{run.scenario.name} step {record.step.index} {record.step.describe()}: "
                                   f"kernel {kernel}, model {model}")
    for outcome in report.assertions:
        if not outcome.ok:
            differences.append(f"{outcome.assertion.name}: {outcome.value!r}, expected {outcome.assertion.describe()}"
                               + (f" ({outcome.error})" if outcome.error else ""))
    return Cell(report.ok, differences, seconds)


def rules_used(spec: LabSpec) -> set[str]:
    """The version rules a lab's expectations and scenarios ask for by name."""
    used = set()
    for path in [*spec.scenarios, *([spec.expected] if spec.expected else [])]:
        used |= {m["name"] for m in RULE_USE.finditer(path.read_text())}
    return used


def guide_problems(spec: LabSpec) -> list[str]:
    """What is wrong with a lab guide's "On newer kernels" part, one sentence each; [] when it is right."""
    readme = spec.directory / "README.md"
    text = readme.read_text() if readme.is_file() else ""
    if GUIDE_HEADING not in text:
        return [f"{readme} has no '{GUIDE_HEADING}' part"]
    part = text.split(GUIDE_HEADING, 1)[1].split("\n## ", 1)[0]
    match = GUIDE_RULES.search(part)
    if match is None:
        return [f"{readme}: '{GUIDE_HEADING}' names no rules (<!-- kernel-rules: NAME ... --> or none)"]
    named = set() if match["names"].strip() == "none" else set(match["names"].split())
    problems = [f"{readme} names {name}, which is no version rule of the model"
                for name in sorted(named - set(versions.RULES))]
    problems += [f"{readme}: the lab depends on {name} (it differs between kernels) but the guide does not say so"
                 for name in sorted(rules_used(spec) - named)]
    return problems


def run(kernels: list[str], labs: list[str], boot: Callable[[str], Any], stop: Callable[[Any], None],
        say: Callable[[str], None] = print, check_one: Callable[..., Any] = check,
        checks: Sequence[KernelCheck] = ()) -> MatrixResult:
    """Every lab in ``labs``, then every check in ``checks``, on every kernel in ``kernels``.

    ``boot(kernel)`` returns a running lab. The lab of one kernel is stopped (``stop``) before the
    next boots, whatever happened.
    """
    specs = [LabSpec.load(name) for name in labs]
    for spec in specs:
        prepare(spec)  # every lab checked before the first boot
    result = MatrixResult(kernels, [s.name for s in specs], checks=[c.name for c in checks])
    for spec in specs:
        result.guide_problems[spec.name] = guide_problems(spec)
    for kernel in kernels:
        say(f"kernel {kernel}: booting the lab")
        lab = boot(kernel)
        try:
            state = lab.require()
            result.releases[kernel] = ", ".join(sorted({vm.kernel for vm in state.vms if vm.kernel}))
            for spec in specs:
                started = time.monotonic()
                try:
                    report = check_one(spec, lab)
                    cell = cell_of(report, time.monotonic() - started)
                except LabError as exc:
                    cell = Cell(False, [f"cannot run: {exc}"], time.monotonic() - started)
                result.cells[(spec.name, kernel)] = cell
                say(f"kernel {kernel}: {spec.name}: {'pass' if cell.ok else 'FAIL'} ({cell.seconds:.0f} s)")
            for extra in checks:
                started = time.monotonic()
                try:
                    cell = extra.run(lab)
                except LabError as exc:
                    cell = Cell(False, [f"cannot run: {exc}"])
                cell.seconds = time.monotonic() - started
                result.cells[(extra.name, kernel)] = cell
                say(f"kernel {kernel}: {extra.name}: {'pass' if cell.ok else 'FAIL'} ({cell.seconds:.0f} s)")
        finally:
            stop(lab)
    return result


def markdown(result: MatrixResult) -> str:
    """The lab x kernel table, then each differing cell's details and each kernel's version rules."""
    lines = ["| lab | " + " | ".join(result.kernels) + " | guide |",
             "|---|" + "---|" * len(result.kernels) + "---|"]
    for lab in result.labs:
        cells = []
        for kernel in result.kernels:
            cell = result.cells.get((lab, kernel))
            cells.append("-" if cell is None else "pass" if cell.ok else f"FAIL ({len(cell.differences)})")
        guide = "ok" if not result.guide_problems.get(lab) else "FAIL"
        lines.append(f"| {lab} | " + " | ".join(cells) + f" | {guide} |")
    for name in result.checks:
        cells = []
        for kernel in result.kernels:
            cell = result.cells.get((name, kernel))
            cells.append("-" if cell is None else "pass" if cell.ok else f"FAIL ({len(cell.differences)})")
        lines.append(f"| {name} | " + " | ".join(cells) + " | - |")
    lines.append("")
    for name in result.checks:
        for kernel in result.kernels:
            cell = result.cells.get((name, kernel))
            if cell is not None and cell.figures:
                lines.append(f"**{name}** on {kernel} ({cell.seconds:.0f} s):")
                lines += [f"- {figure}" for figure in cell.figures] + [""]
    for kernel in result.kernels:
        release = result.releases.get(kernel, "")
        rules = versions.differences(kernel) if kernel in versions.KERNELS else []
        lines.append(f"**{kernel}**" + (f" ({release})" if release else "") + ": "
                     + ("the model's 6.1 rules hold" if not rules else "version rules that differ from 6.1:"))
        lines += [f"- {rule}" for rule in rules] + [""]
    for (lab, kernel), cell in sorted(result.cells.items()):
        if not cell.ok:
            lines.append(f"\n{lab} on {kernel}:")
            lines += [f"- {difference}" for difference in cell.differences]
    for _lab, problems in result.guide_problems.items():
        lines += [f"- guide: {problem}" for problem in problems]
    return "\n".join(lines) + "\n"


def all_labs() -> list[str]:
    return known_labs()


def save(result: MatrixResult, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "matrix.md"
    path.write_text(markdown(result))
    return path
