"""A lab's predictions sheet: the questions a student answers before the kernel does.

The questions come from the lab itself: every call step that has an
``expect:`` (its return value or errno) and every assertion of the
expectation template that has an ``ask:`` (a statistic: a listener's Recv-Q,
a counter's delta over the run). The sheet holds the questions in words and a
blank ``answer:`` for each; it never holds the answer.
"""

from __future__ import annotations

import errno as errno_names
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any


from ..scenario import expect
from ..scenario.check import LabSpec, prepare
from .. import load as textio
from ..scenario.format import _strip_lines
from .workspace import CourseError

# Every name the C library knows, aliases included (EOPNOTSUPP and ENOTSUP are both 95).
KNOWN_ERRNOS = frozenset(name for name in dir(errno_names) if name.startswith("E") and name.isupper())
# Statistics that depend on timing (a between:/at_least: assertion) accept an answer this close.
TOLERANCE = 0.10


@dataclass(frozen=True)
class Question:
    """One blank of the sheet: a step's result or a statistic, asked in words."""

    id: str
    kind: str  # "step" or "stat"
    scenario: str
    text: str
    step_index: int = 0
    assertion: expect.Assertion | None = None

    @property
    def numeric(self) -> bool:
        """Whether the statistic is a number (its assertion compares with numbers)."""
        if self.assertion is None:
            return False
        operand = self.assertion.operand
        values = operand if isinstance(operand, list) and self.assertion.comparison == "between" else [operand]
        return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)

    @property
    def timing_dependent(self) -> bool:
        return self.assertion is not None and self.assertion.comparison in ("between", "at_least", "at_most")


@dataclass(frozen=True)
class Answer:
    """A student's answer, read: a return value, an errno, "blocks", or a statistic's value."""

    ret: Any = None
    errno: str | None = None
    blocked: bool = False

    def describe(self) -> str:
        if self.blocked:
            return "blocks"
        if self.errno:
            return self.errno
        return json.dumps(self.ret) if not isinstance(self.ret, str) else self.ret


@dataclass(frozen=True)
class Prediction:
    """One entry of a filled-in sheet; ``answer`` is None when the student left it blank."""

    question: Question
    answer: Answer | None
    line: int


def questions(spec: LabSpec) -> list[Question]:
    """Every question of the lab, in the order the check runs them (scenario by scenario)."""
    found: list[Question] = []
    for scenario in prepare(spec):
        for step in scenario.steps:
            if step.kind != "call" or step.expect is None:
                continue
            who = f"{step.host}" + (f" (as {step.user})" if step.user != "root" else "")
            found.append(Question(f"{scenario.name}/{step.label or f'step-{step.index}'}", "step", scenario.name,
                                  f"step {step.index}, {who}: {step.describe()} returns what? "
                                  "(a value, or the errno name if it fails)", step_index=step.index))
        if spec.expected is None:
            continue
        asked = [a for a in expect.precheck(spec.expected, scenario.params, scenario.hosts) if a.ask]
        for number, assertion in enumerate(asked, start=1):
            found.append(Question(f"{scenario.name}/stat-{number}", "stat", scenario.name, assertion.ask,
                                  assertion=assertion))
    return found


def render_sheet(spec: LabSpec, student: str) -> str:
    """The blank sheet as YAML, with the rules for answering in its comments."""
    lines = [
        f"# Predictions for lab {spec.name} ({spec.title}), student {student}.",
        "# Answer every question before you run the lab; leave blank what you cannot predict (it scores 0).",
        "# A step's answer: its return value (0, 3, [198.51.100.2, 7000]), an errno name (EADDRINUSE) or blocks.",
        "# A statistic's answer: a number (or the name or list it asks for). A counter that depends on timing accepts an "
        f"answer within {TOLERANCE:.0%} (or 1) of the kernel's, or within the rule's bound and at most twice the kernel's.",
        f"# Then: invoke lab.check {spec.name} --student {student}",
        f"lab: {spec.name}",
        f"student: {student}",
        "predictions:",
    ]
    for question in questions(spec):
        lines += [f"  - id: {question.id}", f"    question: {json.dumps(question.text)}", "    answer:"]
    return "\n".join(lines) + "\n"


def write_sheet(spec: LabSpec, student: str, path: Path, force: bool = False) -> bool:
    """Write a blank sheet; an existing one (the student's work) is kept unless ``force``. True if written."""
    if path.exists() and not force:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(render_sheet(spec, student))
    tmp.replace(path)
    return True


def read_sheet(spec: LabSpec, path: Path, lab_questions: list[Question] | None = None) -> list[Prediction]:
    """A filled-in sheet, checked: every id known, every answer readable. Errors name file:line."""
    where = str(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise CourseError(f"{where}: no predictions sheet; `invoke lab.predict {spec.name} --student {path.parent.parent.name}` "
                          "writes a blank one") from None
    except OSError as exc:
        raise CourseError(f"{where}: cannot read: {exc.strerror}") from None
    raw = textio.parse_yaml(text, where, error=CourseError)
    if not isinstance(raw, textio.YamlMap) or not isinstance(raw.get("predictions"), list):
        raise CourseError(f"{where}:1: a predictions sheet is a mapping with `lab:` and a list `predictions:`")
    if raw.get("lab") not in (None, spec.name):
        raise CourseError(f"{where}:{raw.line_of('lab')}: this sheet is for lab {raw.get('lab')!r}, "
                          f"not {spec.name}")
    by_id = {q.id: q for q in (lab_questions if lab_questions is not None else questions(spec))}
    seen: dict[str, int] = {}
    predictions = []
    for index, item in enumerate(raw["predictions"]):
        line = raw["predictions"].line_of(index)
        at = f"{where}:{line}"
        if not isinstance(item, dict) or "id" not in item:
            raise CourseError(f"{at}: each prediction is a mapping with `id:` and `answer:`")
        unknown = set(item) - {"id", "question", "answer"}
        if unknown:
            raise CourseError(f"{at}: unknown key(s) {', '.join(sorted(map(str, unknown)))}")
        qid = str(item["id"])
        if qid not in by_id:
            raise CourseError(f"{at}: unknown step or statistic {qid!r}: lab {spec.name} asks "
                              f"{', '.join(list(by_id)[:4])}{', ...' if len(by_id) > 4 else ''}")
        if qid in seen:
            raise CourseError(f"{at}: {qid!r} is answered twice (first on line {seen[qid]})")
        seen[qid] = line
        question = by_id[qid]
        predictions.append(Prediction(question, parse_answer(question, _strip_lines(item.get("answer")), at), line))
    return predictions


def parse_answer(question: Question, raw: Any, at: str) -> Answer | None:
    """A student's answer as data; None when blank. Anything unreadable is a CourseError naming ``at``."""
    if raw is None or raw == "":
        return None
    if question.kind == "stat":
        if isinstance(raw, dict):
            raise CourseError(f"{at}: {question.id}: {raw!r} is not a number, a name or a list")
        if isinstance(raw, str) and question.numeric:
            raise CourseError(f"{at}: {question.id}: {raw!r} is not a number (this statistic is a number)")
        return Answer(ret=raw)
    if isinstance(raw, dict):
        if set(raw) - {"ret", "errno"} or not raw:
            return Answer(ret=raw)  # a value that is a mapping, e.g. poll's {$listener: 1}
        if "errno" in raw and raw["errno"] is not None:
            return Answer(errno=_errno(raw["errno"], question, at))
        return Answer(ret=raw.get("ret"))
    if isinstance(raw, str):
        word = raw.strip()
        if word.lower() == "blocks":
            return Answer(blocked=True)
        if word.startswith("-1 "):
            word = word[3:].strip()
        if word[:1] == "E" and word.isupper():
            return Answer(errno=_errno(word, question, at))
        raise CourseError(f"{at}: {question.id}: {raw!r} is not a value, an errno name (EINVAL) or `blocks`")
    return Answer(ret=raw)


def _errno(name: Any, question: Question, at: str) -> str:
    if not isinstance(name, str) or name not in KNOWN_ERRNOS:
        raise CourseError(f"{at}: {question.id}: {name!r} is not an errno name (e.g. EADDRINUSE, EINVAL)")
    return name


def filled_in(predictions: list[Prediction]) -> Mapping[str, Answer | None]:
    return {p.question.id: p.answer for p in predictions}
