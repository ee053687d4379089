"""The kernel matrix's differential rows: the fuzz corpus and a fixed-seed fuzz on each kernel's lab.

`invoke lab.matrix --corpus --fuzz-steps N` adds them after the labs, so CI runs on 6.12 and 7.2
what tests/live/test_fuzz.py runs on 6.1, through the same functions (``run_corpus``, ``cli.run``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..scenario.matrix import Cell, KernelCheck
from . import cli
from .corpus import CORPUS, run_corpus

CI_SEED = 1
CI_STEPS = 5000


def corpus_check(directory: Path = CORPUS, run: Callable[..., Any] = run_corpus) -> KernelCheck:
    """The corpus row: every file that holds on the kernel must agree, kernel and model."""

    def check(lab: Any) -> Cell:
        outcome = run(lab, directory)
        differences = [difference for _name, found in outcome.failed for difference in found]  # each names its file
        return Cell(outcome.ok, differences, figures=[outcome.summary()])

    return KernelCheck("corpus", check)


def fuzz_check(steps: int, seed: int, out: Callable[[Any], Path], run: Callable[..., Any] = cli.run,
               say: Callable[[str], None] | None = None) -> KernelCheck:
    """The fuzz row: ``steps`` steps from ``seed`` must meet no disagreement that is not filed in tests/corpus/open.

    ``out(lab)`` is where the shrunk disagreements of that kernel's run go.
    """

    def check(lab: Any) -> Cell:
        started = time.monotonic()
        outcome = run(lab, steps, seed, out(lab), progress=say, shrink=True)
        report = outcome.report
        differences = [f"{d.signature} [{path}]" for d, path in zip(report.disagreements, outcome.written)]
        figures = [line for line in outcome.text().splitlines()
                   if not line.startswith(("kernel functions never reached", "model rules never reached"))]
        figures.append(f"wall time {time.monotonic() - started:.0f} s, shrinking included")
        return Cell(not report.disagreements, differences, figures=figures)

    return KernelCheck(f"fuzz (seed {seed}, {steps} steps)", check)
