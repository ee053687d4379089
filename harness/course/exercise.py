"""A lab's "write your own scenario" exercise: a task in words and a goal a run can be checked against.

``lab.yaml`` gives it::

    exercise:
      task: a scenario in which bind() fails with EADDRINUSE although both sockets set SO_REUSEADDR
      goal:
        - {call: setsockopt, args: {optname: SO_REUSEADDR, value: 1}, ret: 0, count: 2, distinct_fd: true}
        - {call: bind, errno: EADDRINUSE, fd_in: 0}

The goal is a list of step patterns that must match the run's call steps in
order, on one side (kernel or model) at a time. A pattern names the ``call``
and may give ``args`` (a subset; constant names are resolved), ``ret``,
``errno`` (``null`` for "succeeded"), ``count`` (how many matching steps,
default 1), ``distinct_fd`` (the matches use different sockets) and
``fd_in: N`` (the socket is one the N-th pattern matched). The student's
scenario passes when the goal holds on the kernel and on the model.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..model.constants import resolve
from ..scenario.compare import normalize
from ..scenario.format import CALLS, Scenario, ScenarioError
from ..scenario.runner import RunResult

_PATTERN_KEYS = {"call", "args", "ret", "errno", "count", "distinct_fd", "fd_in"}


@dataclass(frozen=True)
class Pattern:
    call: str
    args: Mapping[str, Any]
    ret: Any = None
    has_ret: bool = False
    errno: Any = None
    has_errno: bool = False
    count: int = 1
    distinct_fd: bool = False
    fd_in: int | None = None


@dataclass(frozen=True)
class Exercise:
    task: str
    goal: tuple[Pattern, ...]

    @classmethod
    def parse(cls, raw: Mapping[str, Any] | None, where: str) -> "Exercise | None":
        if raw is None:
            return None
        if not isinstance(raw.get("task"), str) or not isinstance(raw.get("goal"), list) or not raw["goal"]:
            raise ScenarioError(f"{where}: `exercise:` needs `task:` (words) and `goal:` (a list of step patterns)")
        patterns = []
        for number, item in enumerate(raw["goal"]):
            at = f"{where}: exercise goal {number + 1}"
            if not isinstance(item, dict) or set(item) - _PATTERN_KEYS or item.get("call") not in CALLS:
                raise ScenarioError(f"{at}: a pattern is a mapping with a known `call:` and keys from "
                                    f"{', '.join(sorted(_PATTERN_KEYS))}")
            fd_in = item.get("fd_in")
            if fd_in is not None and not (isinstance(fd_in, int) and 0 <= fd_in < number):
                raise ScenarioError(f"{at}: `fd_in:` names an earlier pattern by number from 0")
            patterns.append(Pattern(item["call"], dict(item.get("args") or {}), item.get("ret"), "ret" in item,
                                    item.get("errno"), "errno" in item, int(item.get("count", 1)),
                                    bool(item.get("distinct_fd", False)), fd_in))
        return cls(raw["task"], tuple(patterns))


@dataclass(frozen=True)
class Verdict:
    """How an own scenario did: ``status`` is pass, fail, missing or error."""

    status: str
    detail: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "pass"


def _same(pattern_value: Any, step_value: Any) -> bool:
    try:
        if isinstance(pattern_value, (str, int)) and not isinstance(pattern_value, bool) and \
                isinstance(step_value, (str, int)):
            return resolve(pattern_value) == resolve(step_value)
    except ValueError:
        pass
    return normalize(pattern_value) == normalize(step_value)


def _matches(pattern: Pattern, step: Any, outcome: Any) -> bool:
    if step.call != pattern.call or outcome is None or outcome.blocked:
        return False
    for key, value in pattern.args.items():
        if key not in step.args or not _same(value, step.args[key]):
            return False
    if pattern.has_errno and outcome.errno != pattern.errno:
        return False
    if pattern.has_ret and (outcome.errno is not None or normalize(outcome.ret) != normalize(pattern.ret)):
        return False
    return True


def goal_holds(exercise: Exercise, result: RunResult, side: str) -> tuple[bool, str]:
    """Whether the patterns match, in order, on ``side`` ("kernel" or "model"); and if not, which did not."""
    records = [r for r in result.records if r.step.kind == "call"]
    position = 0
    matched_fds: list[set[Any]] = []
    for number, pattern in enumerate(exercise.goal):
        fds: set[Any] = set()
        found = 0
        while position < len(records) and found < pattern.count:
            record = records[position]
            position += 1
            outcome = getattr(record, side)
            if not _matches(pattern, record.step, outcome):
                continue
            # A socket is known by its name: the `fd:` a call takes and the `as:` of the one it makes.
            names = {n for n in (record.step.args.get("fd"),
                                 f"${record.step.save_as}" if record.step.save_as else None) if n}
            if pattern.fd_in is not None and not names & matched_fds[pattern.fd_in]:
                continue
            fd = record.step.args.get("fd") or f"${record.step.save_as}"
            if pattern.distinct_fd and fd in fds:
                continue
            fds |= names
            found += 1
        if found < pattern.count:
            what = f"{pattern.call}()" + (f" with {dict(pattern.args)}" if pattern.args else "")
            if pattern.has_errno:
                what += f" failing with {pattern.errno}" if pattern.errno else " succeeding"
            if pattern.has_ret:
                what += f" returning {pattern.ret!r}"
            return False, f"goal {number + 1} not met on the {side}: {pattern.count} x {what}"
        matched_fds.append(fds)
    return True, ""


def judge(exercise: Exercise, scenario: Scenario, result: RunResult, kernel: bool) -> Verdict:
    """Pass when the goal holds on the model and (when it ran) on the kernel."""
    if result.error:
        return Verdict("fail", f"the run stopped: {result.error}")
    problems = []
    for side in (("kernel", "model") if kernel else ("model",)):
        holds, why = goal_holds(exercise, result, side)
        if not holds:
            problems.append(why)
    if problems:
        return Verdict("fail", "; ".join(problems))
    return Verdict("pass", "goal met on the kernel and the model" if kernel else "goal met on the model")


def own_path(lab_dir: Path) -> Path:
    return lab_dir / "own.yaml"
