"""`invoke lab.fuzz`: run a seeded fuzz on the lab (or the model alone) and print what it found."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .engine import FuzzReport, fuzz, known_signatures, write_corpus
from .live import LiveKernel


@dataclass(frozen=True)
class FuzzRun:
    report: FuzzReport
    written: tuple[Path, ...]
    round_trips: int
    live_steps_per_s: float | None
    kernels: str = ""

    def text(self, never_reached: int = 25) -> str:
        report = self.report
        cov = report.coverage
        lines = [
            f"seed: {report.seed}" + (f"; model kernels: {self.kernels}" if self.kernels else ""),
            f"steps run: {report.steps} in {report.programs} programs"
            + (f", {self.round_trips} agent round trips" if self.round_trips else " (model only)"),
            f"disagreements found: {len(report.disagreements)}"
            + (f" new; {sum(report.known_met.values())} more met the {len(report.known_met)} open one(s) "
               "filed in tests/corpus/open" if report.known_met else ""),
            f"shrunk: {report.shrunk}",
        ]
        for signature, count in sorted(report.known_met.items()):
            lines.append(f"  open: {signature}  [{count}x]")
        if report.invalid:
            lines.append(f"programs skipped: {report.invalid} (a sysctl value the guest refused)")
        for disagreement, path in zip(report.disagreements, self.written):
            size = len(disagreement.shrunk.steps) if disagreement.shrunk else len(disagreement.program.steps)
            lines.append(f"  {disagreement.signature}  [{size} steps: {path}]")
        lines.append(f"rule coverage: {cov.summary()}")
        missing = cov.functions_never_reached
        lines.append(f"kernel functions never reached ({len(missing)}): {', '.join(missing[:never_reached])}"
                     + (" ..." if len(missing) > never_reached else ""))
        rules = cov.never_reached
        lines.append(f"model rules never reached ({len(rules)}): {', '.join(rules[:never_reached])}"
                     + (" ..." if len(rules) > never_reached else ""))
        if self.live_steps_per_s is not None:
            lines.append(f"throughput: live {self.live_steps_per_s:,.0f} steps/s over the batched segments; "
                         f"model {report.steps / max(report.model_seconds, 1e-9):,.0f} steps/s")
        else:
            lines.append(f"throughput: model {report.steps / max(report.model_seconds, 1e-9):,.0f} steps/s")
        return "\n".join(lines)


OPEN = Path(__file__).resolve().parents[2] / "tests" / "corpus" / "open"


def run(lab: Any | None, steps: int, seed: int, corpus: Path, hosts: tuple[str, ...] = ("server", "client"),
        progress: Callable[[str], None] | None = None, shrink: bool = True, open_dir: Path = OPEN,
        model_kernel: str = "6.1") -> FuzzRun:
    """Fuzz ``steps`` steps from ``seed`` on ``lab`` (None: the model against itself, a smoke test).

    Disagreements filed in ``open_dir`` (found before, not yet fixed, the reason in each file) are
    counted but not reported as new.
    """
    kernel = LiveKernel(lab) if lab is not None else None
    known = known_signatures(open_dir) if open_dir.is_dir() else {}
    kernels = None
    if lab is not None:
        from ..scenario.check import lab_kernels

        kernels = lab_kernels(lab)  # each VM is modelled on its own kernel's series
    try:
        report = fuzz(steps, seed, kernel, hosts=hosts, do_shrink=shrink, progress=progress, known=known,
                      model_kernels=kernels, model_kernel=model_kernel)
    finally:
        if kernel is not None:
            kernel.close()
    written = tuple(write_corpus(d, corpus) for d in report.disagreements)
    rate = kernel.steps / kernel.segment_seconds if kernel is not None and kernel.segment_seconds else None
    described = ", ".join(f"{host} {series}" for host, series in sorted((kernels or {}).items())) or model_kernel
    return FuzzRun(report, written, kernel.round_trips if kernel else 0, rate, described)
