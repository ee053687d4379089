"""Run generated programs on the kernel (batched) and the model, shrink every disagreement, write the corpus."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import yaml

from ..scenario.batch import run_batched
from ..scenario.format import ScenarioError, from_body
from ..scenario.runner import ModelBackend, RunResult
from .coverage import Coverage, coverage, rule_id
from .generate import PROGRAM_LENGTH, SHRINK_BLOCKS, Program, generate, relocate
from .live import SysctlRefused

MAX_SHRINK_RUNS = 80


class Kernel(Protocol):
    """The kernel side of a fuzz run: ``begin`` readies the guests for a program, then batched segments."""

    def begin(self, program: Program) -> None: ...

    def run_segment(self, host: str, user: str, steps: list[dict[str, Any]]) -> list[Any]: ...

    def sleep(self, seconds: float) -> None: ...

    def snapshot(self, name: str) -> Any: ...


@dataclass(frozen=True)
class Disagreement:
    """The first step of a program where kernel and model differ, and the program shrunk around it."""

    program: Program
    step: int  # index into program.steps
    signature: str
    kernel: str
    model: str
    model_rule: str
    kernel_fn: str
    shrunk: Program | None = None
    shrunk_step: int = -1


@dataclass
class FuzzReport:
    seed: int
    programs: int = 0
    steps: int = 0
    kernel_seconds: float = 0.0
    model_seconds: float = 0.0
    disagreements: list[Disagreement] = field(default_factory=list)
    reached: set[str] = field(default_factory=set)
    invalid: int = 0
    known_met: dict[str, int] = field(default_factory=dict)  # filed open disagreements seen again

    @property
    def coverage(self) -> Coverage:
        return coverage(self.reached)

    @property
    def shrunk(self) -> int:
        return sum(1 for d in self.disagreements if d.shrunk is not None)


def scenario_of(program: Program):
    return from_body(f"fuzz-{program.seed}-{program.number}", program.hosts,
                     {"sysctls": program.sysctls, "steps": program.steps})


def run_program(program: Program, kernel: Kernel | None, model_kernels: dict[str, str] | None = None,
                model_kernel: str = "6.1") -> RunResult:
    """One program on the model (each host on its own kernel series when given) and, with ``kernel``, live."""
    scenario = scenario_of(program)
    model = ModelBackend(scenario, kernels=model_kernels, kernel=model_kernel)
    if kernel is None:
        from ..scenario.runner import run
        return run(scenario, None, model)
    kernel.begin(program)
    return run_batched(scenario, kernel, model)


def first_disagreement(result: RunResult) -> int | None:
    for index, record in enumerate(result.records):
        if record.verdict is not None and not record.verdict.ok:
            return index
    return None


def signature(result: RunResult, index: int) -> str:
    """What makes two disagreements the same: the call, and each side's answer (errno, or the value)."""
    record = result.records[index]
    return f"{record.step.call}: kernel {_answer(record.kernel)}, model {_answer(record.model)}"


def _answer(outcome: Any) -> str:
    if outcome is None:
        return "-"
    if outcome.blocked:
        return "blocks"
    if outcome.errno:
        return outcome.errno
    if isinstance(outcome.ret, dict) and "stopped" in outcome.ret:
        return f"loop stopped by {outcome.ret['stopped']}"
    return "ok " + type(outcome.ret).__name__


def shrink(program: Program, still_fails: Callable[[Program], int | None], budget: int = MAX_SHRINK_RUNS,
           blocks_from: int | None = None) -> tuple[Program, int]:
    """The smallest program (by delta debugging over steps, then sysctls) for which ``still_fails`` holds.

    ``still_fails`` returns the index of the disagreeing step, or None. Candidates that are no
    longer valid scenarios (a step refers to a name whose step was removed) do not count. With
    ``blocks_from``, each run is relocated to ports and names of its own (program numbers from
    there on), so TIME_WAIT left by earlier runs never decides it.
    """
    runs = 0
    next_block = blocks_from or 0

    def fresh(candidate: Program) -> Program:
        nonlocal next_block
        next_block += 1
        return relocate(candidate, next_block)

    def check(candidate: Program) -> int | None:
        return still_fails(fresh(candidate) if blocks_from is not None else candidate)

    best = program
    best_index = check(program)
    if best_index is None:
        return program, -1
    # Steps after the first disagreement cannot change it: start from the prefix that ends there.
    prefix = Program(program.seed, program.number, program.hosts, program.sysctls, program.steps[:best_index + 1])
    if len(prefix.steps) < len(program.steps) and (index := check(prefix)) is not None:
        runs += 1
        best, best_index = prefix, index

    def attempt(steps: list[dict], sysctls: dict) -> bool:
        nonlocal best, best_index, runs
        if runs >= budget:
            return False
        candidate = Program(program.seed, program.number, program.hosts, sysctls, steps)
        try:
            scenario_of(candidate)
        except ScenarioError:
            return False
        runs += 1
        index = check(candidate)
        if index is None:
            return False
        best, best_index = candidate, index
        return True


    chunk = max(1, len(best.steps) // 2)
    while chunk >= 1 and runs < budget:
        start = 0
        progressed = False
        while start < len(best.steps) and runs < budget:
            steps = best.steps[:start] + best.steps[start + chunk:]
            if steps and attempt(steps, best.sysctls):
                progressed = True
            else:
                start += chunk
        if not progressed:
            chunk //= 2
    for host in list(best.sysctls):
        for name in list(best.sysctls[host]):
            trimmed = {h: {k: v for k, v in s.items() if (h, k) != (host, name)} for h, s in best.sysctls.items()}
            attempt(best.steps, {h: s for h, s in trimmed.items() if s})
    # Tail steps after the disagreement never matter.
    best = Program(best.seed, best.number, best.hosts, best.sysctls, best.steps[:best_index + 1])
    return best, best_index


def fuzz(steps: int, seed: int, kernel: Kernel | None, hosts: tuple[str, ...] = ("server", "client"),
         length: int = PROGRAM_LENGTH, do_shrink: bool = True, progress: Callable[[str], None] | None = None,
         known: Iterable[str] = (), model_kernels: dict[str, str] | None = None, model_kernel: str = "6.1"
         ) -> FuzzReport:
    """Generate and run programs until ``steps`` call steps ran; shrink each new kind of disagreement."""
    report = FuzzReport(seed)
    if kernel is not None and hasattr(kernel, "start"):
        kernel.start(hosts)  # every agent at once, before the first program
    known = set(known)
    seen: set[str] = set()
    number = 0
    while report.steps < steps:
        program = generate(seed, number, hosts, min(length, max(1, steps - report.steps)))
        number += 1
        started = time.perf_counter()
        try:
            result = run_program(program, kernel, model_kernels, model_kernel)
        except (ScenarioError, SysctlRefused) as exc:
            report.invalid += 1
            if progress:
                progress(f"program {program.number} skipped: {exc}")
            continue
        report.kernel_seconds += time.perf_counter() - started
        report.programs += 1
        report.steps += sum(1 for r in result.records if r.step.kind == "call")
        for record in result.records:
            if record.model is not None and record.model.kernel_fn:
                report.reached.add(rule_id(record.model.kernel_fn, record.model.errno))
        index = first_disagreement(result)
        if index is None:
            continue
        sig = signature(result, index)
        if sig in known:
            report.known_met[sig] = report.known_met.get(sig, 0) + 1
            continue
        if sig in seen:
            continue
        seen.add(sig)
        record = result.records[index]
        shrunk, shrunk_index = (None, -1)
        if do_shrink:
            def still_fails(candidate: Program) -> int | None:
                try:
                    again = run_program(candidate, kernel, model_kernels, model_kernel)
                except ScenarioError:
                    return None
                at = first_disagreement(again)
                # shrink() calls this within the iteration, while `sig` is still this disagreement's
                return at if at is not None and signature(again, at) == sig else None  # noqa: B023
            shrunk, shrunk_index = shrink(program, still_fails,
                                          blocks_from=SHRINK_BLOCKS + 100 * len(report.disagreements))
            if shrunk_index < 0:
                shrunk = None  # it did not happen again: timing, reported as found
        report.disagreements.append(Disagreement(
            program, index, sig, record.kernel.describe() if record.kernel else "-",
            record.model.describe() if record.model else "-", record.model.rule if record.model else "",
            record.model.kernel_fn if record.model else "", shrunk, shrunk_index))
        if progress:
            progress(f"program {program.number}: {sig} (shrunk to {len(shrunk.steps) if shrunk else '?'} steps)")
    # Model time is what the model alone costs: run the same programs again without the kernel.
    started = time.perf_counter()
    for n in range(number):
        try:
            run_program(generate(seed, n, hosts, length), None, model_kernels, model_kernel)
        except ScenarioError:
            pass
    report.model_seconds = time.perf_counter() - started
    return report


SIGNATURE_IN_DESCRIPTION = re.compile(r"\(program \d+\): (.+?)\. The kernel said")


def known_signatures(directory: Path) -> dict[str, Path]:
    """The signatures of the disagreements filed in ``directory`` (open ones, with the reason in the file)."""
    found = {}
    for path in sorted(directory.glob("*.yaml")):
        header = yaml.safe_load(path.read_text().split("\n---\n", 1)[0]) or {}
        match = SIGNATURE_IN_DESCRIPTION.search(" ".join(str(header.get("description", "")).split()))
        if match:
            found[match.group(1)] = path
    return found


def corpus_text(disagreement: Disagreement, reason: str = "") -> str:
    """A shrunk disagreement as an ordinary scenario file, with the kernel's and the model's answers.

    The disagreeing step expects the kernel's answer when it is one an expectation can hold (an
    errno, or a number that is no descriptor), so the file fails on the model until the model is
    fixed, and keeps the kernel to its word when it runs live.
    """
    program = disagreement.shrunk or disagreement.program
    step_index = disagreement.shrunk_step if disagreement.shrunk else disagreement.step
    if disagreement.shrunk is None:
        program = Program(program.seed, program.number, program.hosts, program.sysctls,
                          program.steps[:step_index + 1])
        reason = (reason + " " if reason else "") + "Not shrunk: it did not happen again when the program was rerun."
    # Every host of the program stays: a step may address one it no longer runs on (a connect to the
    # client's address needs the client there to answer with an RST).
    used = list(program.hosts)
    header = {
        "name": f"fuzz-{program.seed}-{program.number}",
        "description": (f"found by lab.fuzz --seed {program.seed} (program {program.number}): {disagreement.signature}. "
                        f"The kernel said {disagreement.kernel}; the model said {disagreement.model} "
                        f"({disagreement.model_rule}; {disagreement.kernel_fn})" + (f". {reason}" if reason else "")),
        "hosts": used or list(program.hosts[:1]),
    }
    steps = [dict(step) for step in program.steps]
    steps[step_index]["label"] = "disagreement"
    expect = _expectable(disagreement.kernel, steps[step_index]["call"])
    if expect is not None:
        steps[step_index]["expect"] = expect
    lines = [yaml.safe_dump(header, sort_keys=False, width=110).rstrip(), "---"]
    sysctls = {host: settings for host, settings in program.sysctls.items() if host in header["hosts"]}
    if sysctls:
        lines.append("sysctls: " + _flow(sysctls))
    lines.append("steps:")
    lines += [f"  - {_flow(step)}" for step in steps]
    return "\n".join(lines) + "\n"


def _flow(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=10_000).strip()


def _expectable(kernel: str, call: str) -> Any:
    """The kernel's answer as an `expect:` value, or None when it is not one to hold a model to."""
    if kernel.startswith("-1 E"):
        return kernel[3:]
    if call not in ("socket", "accept", "accept4") and kernel.lstrip("-").isdigit():
        return int(kernel)
    return None


def write_corpus(disagreement: Disagreement, directory: Path) -> Path:
    program = disagreement.shrunk or disagreement.program
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"fuzz-{program.seed}-{program.number}.yaml"
    path.write_text(corpus_text(disagreement))
    return path
