"""Score a predictions sheet against what the kernel did, and explain every wrong answer from the model.

The answer key is a check's kernel run (``AnswerKey.from_report``): each
step's real return value or errno, each asked statistic's real value. The
model is consulted only for the explanation: the rule and the kernel function
it applied at that step, or the template's ``why:`` for a statistic.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..scenario.check import CheckReport
from ..scenario.compare import normalize
from .sheet import TOLERANCE, Answer, Prediction, Question


@dataclass(frozen=True)
class KernelAnswer:
    """What the kernel did for one question, and what the model says about why."""

    id: str
    available: bool
    ret: Any = None
    errno: str | None = None
    blocked: bool = False
    rule: str = ""
    kernel_fn: str = ""
    model: str = ""  # the model's answer, as shown; "" when the model does not predict it

    def describe(self) -> str:
        if not self.available:
            return "(not run)"
        if self.blocked:
            return "blocks"
        if self.errno:
            return self.errno
        return self.ret if isinstance(self.ret, str) else json.dumps(normalize(self.ret))


@dataclass
class AnswerKey:
    """The kernel's answers to every question of one lab, from one check run."""

    lab: str
    answers: dict[str, KernelAnswer] = field(default_factory=dict)

    @classmethod
    def from_report(cls, lab: str, report: CheckReport, lab_questions: Iterable[Question]) -> "AnswerKey":
        runs = {run.scenario.name: run for run in report.runs}
        key = cls(lab)
        asked: dict[str, list[Any]] = {}
        for name, outcomes in report.outcomes_by_scenario.items():
            asked[name] = [o for o in outcomes if o.assertion.ask]
        for question in lab_questions:
            key.answers[question.id] = _answer(question, runs.get(question.scenario), asked.get(question.scenario))
        return key

    def to_json(self) -> str:
        return json.dumps({"lab": self.lab, "answers": [asdict(a) for a in self.answers.values()]}, indent=1,
                          default=str)


def _answer(question: Question, run: Any, asked: list[Any] | None) -> KernelAnswer:
    if run is None:
        return KernelAnswer(question.id, False)
    if question.kind == "step":
        try:
            record = run.record(question.step_index)
        except KeyError:
            return KernelAnswer(question.id, False)
        if record.kernel is None:
            return KernelAnswer(question.id, False)
        model = record.model
        return KernelAnswer(question.id, True, normalize(record.kernel.ret), record.kernel.errno, record.kernel.blocked,
                            rule=model.rule if model else "", kernel_fn=model.kernel_fn if model else "",
                            model=model.describe() if model else "")
    number = int(question.id.rsplit("-", 1)[1])
    if not asked or number > len(asked) or asked[number - 1].error:
        return KernelAnswer(question.id, False, rule=question.assertion.why if question.assertion else "")
    outcome = asked[number - 1]
    return KernelAnswer(question.id, True, normalize(outcome.value), rule=outcome.assertion.why,
                        model=outcome.model)


@dataclass(frozen=True)
class Mark:
    """One question, marked."""

    question: Question
    answer: Answer | None
    key: KernelAnswer
    correct: bool


@dataclass
class Score:
    """A sheet's marks: one per question of the lab (blank and missing entries score 0)."""

    lab: str
    marks: list[Mark] = field(default_factory=list)

    @property
    def correct(self) -> int:
        return sum(m.correct for m in self.marks)

    @property
    def total(self) -> int:
        return len(self.marks)

    @property
    def answered(self) -> int:
        return sum(m.answer is not None for m in self.marks)


def is_correct(question: Question, answer: Answer | None, key: KernelAnswer) -> bool:
    """Whether the answer is what the kernel did (a timing-dependent statistic: within the tolerance)."""
    if answer is None or not key.available:
        return False
    if question.kind == "step":
        if answer.blocked or key.blocked:
            return answer.blocked and key.blocked
        if answer.errno or key.errno:
            return answer.errno == key.errno
        return normalize(answer.ret) == normalize(key.ret)
    got, wanted = answer.ret, key.ret
    if isinstance(got, bool) or isinstance(wanted, bool) or not isinstance(got, (int, float)) \
            or not isinstance(wanted, (int, float)):
        return normalize(got) == normalize(wanted)
    if question.timing_dependent:
        if abs(got - wanted) <= max(1.0, TOLERANCE * abs(wanted)):
            return True
        # A figure the template bounds rather than fixes (SYNs retransmitted before the snapshot, say):
        # an answer within the rule's bound counts, unless it is more than twice what the kernel showed.
        return _within_bound(question, got) and got <= 2 * max(wanted, 1)
    return got == wanted


def _within_bound(question: Question, value: float) -> bool:
    assertion = question.assertion
    if assertion is None:  # timing_dependent questions have one
        return False
    operand = assertion.operand
    if assertion.comparison == "at_least":
        return value >= operand
    if assertion.comparison == "at_most":
        return value <= operand
    return operand[0] <= value <= operand[1]


def score(lab: str, lab_questions: list[Question], predictions: list[Prediction] | None, key: AnswerKey) -> Score:
    """Mark every question of the lab; ``predictions`` None (no sheet) marks them all unanswered."""
    given = {p.question.id: p.answer for p in predictions or []}
    result = Score(lab)
    for question in lab_questions:
        answer = given.get(question.id)
        kernel = key.answers.get(question.id) or KernelAnswer(question.id, False)
        result.marks.append(Mark(question, answer, kernel, is_correct(question, answer, kernel)))
    return result


def explain(mark: Mark) -> str:
    """Why the kernel did what it did, from the model's rule (a step) or the template's why (a statistic)."""
    key = mark.key
    if not key.available:
        return "the kernel run did not reach this step (see the check's report)"
    parts = []
    if key.kernel_fn:
        parts.append(f"{key.kernel_fn}: {key.rule}" if key.rule else key.kernel_fn)
    elif key.rule:
        parts.append(key.rule)
    if key.model and key.model.removeprefix("-1 ").strip("'") != key.describe():
        parts.append(f"(the model said {key.model})")
    return " ".join(parts) or "no rule recorded for this figure"


def markdown(score_: Score, student: str) -> str:
    """The marked sheet as Markdown: every question, the answer given, the kernel's, and why when wrong."""
    def cell(text: object) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    lines = [f"# {score_.lab}: predictions of {student}", "",
             f"**{score_.correct}/{score_.total}** correct ({score_.answered} answered).", "",
             "| question | asked | your answer | kernel | verdict | why the kernel did it |",
             "|---|---|---|---|---|---|"]
    for mark in score_.marks:
        verdict = "right" if mark.correct else ("blank" if mark.answer is None else "wrong")
        lines.append("| " + " | ".join(cell(x) for x in (
            mark.question.id, mark.question.text, mark.answer.describe() if mark.answer else "",
            mark.key.describe(), verdict, "" if mark.correct else explain(mark))) + " |")
    return "\n".join(lines) + "\n"


def save(score_: Score, key: AnswerKey, student: str, directory: Path) -> Path:
    """``checked.md`` (the marked sheet) and ``kernel.json`` (the answer key of that run) in the lab's workspace."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "kernel.json").write_text(key.to_json() + "\n")
    path = directory / "checked.md"
    path.write_text(markdown(score_, student))
    return path
