"""The fuzz corpus (tests/corpus/) on a live lab: every file whose answers hold on the lab's kernel.

The same runs serve the live test (tests/live/test_fuzz.py) and the kernel matrix's corpus row, so
a file skipped or failed on one kernel is skipped or failed the same way in both.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..scenario.check import CheckReport, lab_kernels, run_scenario
from ..scenario.format import Scenario, load
from ..scenario.matrix import cell_of

CORPUS = Path(__file__).resolve().parents[2] / "tests" / "corpus"


@dataclass(frozen=True)
class CorpusRun:
    """What the corpus did on one lab: the files that agreed, those that did not (with what), those for other kernels."""

    series: tuple[str, ...]
    passed: tuple[str, ...]
    failed: tuple[tuple[str, tuple[str, ...]], ...]
    skipped: tuple[str, ...]
    seconds: float

    @property
    def ok(self) -> bool:
        return not self.failed

    def summary(self) -> str:
        return (f"corpus on {', '.join(self.series) or 'the lab'}: {len(self.passed)} of "
                f"{len(self.passed) + len(self.failed)} files agree, {len(self.skipped)} for other kernels skipped, "
                f"{self.seconds:.0f} s")


def files(directory: Path = CORPUS) -> list[Path]:
    """The settled corpus files (open/ below it holds the unsettled ones, which are not run)."""
    return sorted(directory.glob("*.yaml"))


def applies(scenario: Scenario, series: set[str]) -> bool:
    """Whether a file's answers hold on every kernel series the lab's VMs run."""
    return all(scenario.holds_on(s) for s in series)


def run_corpus(lab: Any, directory: Path = CORPUS, progress: Callable[[str], None] | None = None,
               run_one: Callable[[Scenario, Any], Any] = run_scenario) -> CorpusRun:
    """Every corpus file that holds on ``lab``'s kernels, on the lab and the model of those kernels."""
    started = time.monotonic()
    running = set(lab_kernels(lab).values())
    passed: list[str] = []
    failed: list[tuple[str, tuple[str, ...]]] = []
    skipped: list[str] = []
    for path in files(directory):
        scenario = load(path, known_hosts=("client", "server"))
        if not applies(scenario, running):
            skipped.append(scenario.name)
            continue
        result = run_one(scenario, lab)
        if result.ok:
            passed.append(scenario.name)
        else:
            failed.append((scenario.name, tuple(cell_of(CheckReport(scenario.name, runs=[result])).differences)))
            if progress:
                progress(f"corpus: {scenario.name} disagrees")
    return CorpusRun(tuple(sorted(running)), tuple(passed), tuple(failed), tuple(skipped),
                     time.monotonic() - started)
