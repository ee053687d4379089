"""Grading: every lab's check on the live lab, written as a per-student Markdown and CSV report."""

from __future__ import annotations

import csv
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.errors import SocklabError
from harness.lab.status import markdown
from harness.scenario.check import CheckReport, LabSpec, check, known_labs


@dataclass(frozen=True)
class LabGrade:
    """One lab's line in the grade sheet."""

    lab: str
    title: str
    passed: bool
    steps_ok: int
    steps: int
    expectations_ok: int
    expectations: int
    seconds: float
    error: str = ""


def grade(lab: Any, labs: list[str] | None = None,
          on_lab: Callable[[str, CheckReport | None], None] | None = None) -> tuple[list[LabGrade], list[CheckReport]]:
    """Check every lab (or those named); a lab that cannot run is graded as failed, with why."""
    grades, reports = [], []
    for name in labs or known_labs():
        started = time.monotonic()
        try:
            spec = LabSpec.load(name)
            report = check(spec, lab)
        except SocklabError as exc:
            grades.append(LabGrade(name, name, False, 0, 0, 0, 0, time.monotonic() - started, str(exc)))
            if on_lab:
                on_lab(name, None)
            continue
        counts = report.counts
        errors = "; ".join(run.error for run in report.runs if run.error)
        grades.append(LabGrade(name, spec.title, report.ok, counts["steps"] - counts["step_failures"], counts["steps"],
                               counts["assertions"] - counts["assertion_failures"], counts["assertions"],
                               round(time.monotonic() - started, 1), errors))
        reports.append(report)
        if on_lab:
            on_lab(name, report)
    return grades, reports


def write(student: str, grades: list[LabGrade], reports: list[CheckReport], directory: Path, kernel: str) -> None:
    """``grade.csv`` (one row per lab) and ``grade.md`` (summary, then each lab's evidence)."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "grade.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["student", "lab", "title", "verdict", "steps_ok", "steps", "expectations_ok",
                         "expectations", "seconds", "error"])
        for g in grades:
            writer.writerow([student, g.lab, g.title, "pass" if g.passed else "fail", g.steps_ok, g.steps,
                             g.expectations_ok, g.expectations, g.seconds, g.error])
    passed = sum(g.passed for g in grades)
    lines = [f"# socklab grade: {student}", "",
             f"{passed} of {len(grades)} labs pass on kernel {kernel}, checked {time.strftime('%Y-%m-%d %H:%M %Z')}.",
             "", "| lab | title | verdict | steps | expectations |", "|---|---|---|---|---|"]
    for g in grades:
        lines.append(f"| {g.lab} | {g.title} | {'pass' if g.passed else 'FAIL'} | {g.steps_ok}/{g.steps} | "
                     f"{g.expectations_ok}/{g.expectations} |")
    lines += ["", "## Evidence", ""]
    for report in reports:
        lines.append(markdown(report).replace("\n# ", "\n### ").replace("# ", "### ", 1))
    (directory / "grade.md").write_text("\n".join(lines) + "\n")
