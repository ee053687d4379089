"""Grade a class: every student's predictions, own scenario and written answers, lab by lab.

The kernel is the answer key: each lab is checked once on the live lab
(``key_for``), and every student's sheet is marked against that run. Own
scenarios are run on the kernel and the model (``judge_own``). A student with
nothing in the workspace scores 0 everywhere. Every sheet is read before
anything runs: one that cannot be read (a malformed value, an unknown step)
stops the grading with its file and line, so the teacher fixes or removes it
instead of a student silently scoring 0.
"""

from __future__ import annotations

import csv
import html
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..scenario.check import LabSpec
from . import explain
from .exercise import Verdict
from .score import AnswerKey, Score, score
from .sheet import Prediction, questions, read_sheet
from .workspace import ANSWERS, PREDICTIONS, Workspace


@dataclass(frozen=True)
class LabMark:
    """One student's line for one lab."""

    student: str
    lab: str
    correct: int
    total: int
    answered: int
    own: Verdict
    explained: int
    asked: int


@dataclass
class ClassGrade:
    marks: list[LabMark] = field(default_factory=list)
    scores: dict[tuple[str, str], Score] = field(default_factory=dict)
    answers: dict[tuple[str, str], list[explain.Slot]] = field(default_factory=dict)
    labs: list[LabSpec] = field(default_factory=list)

    def students(self) -> list[str]:
        return sorted({m.student for m in self.marks})

    def total(self, student: str) -> tuple[int, int]:
        mine = [m for m in self.marks if m.student == student]
        return sum(m.correct for m in mine), sum(m.total for m in mine)


def read_sheets(workspace: Workspace, labs: list[LabSpec],
                students: list[str] | None = None) -> dict[tuple[str, str], list[Prediction]]:
    """Every predictions sheet of the class, read and checked: (student, lab) -> its predictions.

    A student without a sheet for a lab has no entry. The first sheet that cannot be read raises its
    CourseError (file:line and what is wrong), before any lab has run.
    """
    names = students if students is not None else workspace.students()
    found: dict[tuple[str, str], list[Prediction]] = {}
    for spec in labs:
        lab_questions = questions(spec)
        for name in names:
            path = workspace.lab_dir(name, spec.name) / PREDICTIONS
            if path.is_file():
                found[(name, spec.name)] = read_sheet(spec, path, lab_questions)
    return found


def grade_class(workspace: Workspace, labs: list[LabSpec], key_for: Callable[[LabSpec], AnswerKey],
                judge_own: Callable[[LabSpec, Path], Verdict], students: list[str] | None = None,
                on_lab: Callable[[str, str], None] | None = None,
                sheets: dict[tuple[str, str], list[Prediction]] | None = None) -> ClassGrade:
    """Mark every student of the workspace (or those named) in every lab given.

    ``sheets`` is what ``read_sheets`` returned, when the caller read them first (before starting a lab);
    otherwise they are read here, all of them before the first ``key_for``.
    """
    result = ClassGrade(labs=list(labs))
    names = students if students is not None else workspace.students()
    if sheets is None:
        sheets = read_sheets(workspace, labs, names)
    for spec in labs:
        lab_questions = questions(spec)
        guide_questions = explain.guide_questions(spec.directory / "README.md")
        # The kernel runs only when someone has something to mark against it.
        key = key_for(spec) if any((name, spec.name) in sheets for name in names) else AnswerKey(spec.name)
        for name in names:
            directory = workspace.lab_dir(name, spec.name)
            predictions = sheets.get((name, spec.name))
            marked = score(spec.name, lab_questions, predictions, key)
            own = judge_own(spec, directory / "own.yaml")
            slots = explain.read(directory / ANSWERS, guide_questions)
            result.scores[(name, spec.name)] = marked
            result.answers[(name, spec.name)] = slots
            result.marks.append(LabMark(name, spec.name, marked.correct, marked.total, marked.answered, own,
                                        sum(s.written for s in slots), len(slots)))
            if on_lab:
                on_lab(name, spec.name)
    return result


CSV_COLUMNS = ("student", "lab", "predictions_correct", "predictions_total", "predictions_answered",
               "own_scenario", "own_detail", "explanations_written", "explanations_asked")


def write(grade: ClassGrade, directory: Path, kernel: str) -> dict[str, Path]:
    """``class.csv``, ``grade.md`` (the class table and each student's lines), ``answers.md`` (collected)."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = {"csv": directory / "class.csv", "md": directory / "grade.md", "answers": directory / "answers.md",
             "html": directory / "class.html"}
    with open(paths["csv"], "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_COLUMNS)
        for m in grade.marks:
            writer.writerow([m.student, m.lab, m.correct, m.total, m.answered, m.own.status, m.own.detail,
                             m.explained, m.asked])
    labs = [spec.name for spec in grade.labs]
    lines = ["# socklab class grade", "",
             f"{len(grade.students())} student(s), {len(labs)} lab(s), answer key: kernel {kernel}, "
             f"graded {time.strftime('%Y-%m-%d %H:%M %Z')}.", "",
             "Each cell: predictions right/asked · own scenario · explanations written/asked.", "",
             "| student | " + " | ".join(labs) + " | predictions |", "|---|" + "---|" * (len(labs) + 1)]
    for student in grade.students():
        cells = []
        for lab in labs:
            m = next(x for x in grade.marks if x.student == student and x.lab == lab)
            cells.append(f"{m.correct}/{m.total} · {m.own.status} · {m.explained}/{m.asked}")
        right, asked = grade.total(student)
        lines.append(f"| {student} | " + " | ".join(cells) + f" | {right}/{asked} |")
    errors = [m for m in grade.marks if m.own.status in ("fail", "error")]
    if errors:
        lines += ["", "## Notes", ""]
        for m in errors:
            lines.append(f"- {m.student}, {m.lab}: own scenario {m.own.status}: {m.own.detail}")
    paths["md"].write_text("\n".join(lines) + "\n")
    paths["answers"].write_text(collected_answers(grade))
    paths["html"].write_text(class_html(grade, kernel))
    (directory / "class.svg").write_text(class_svg(grade))
    return paths


def collected_answers(grade: ClassGrade) -> str:
    """Every student's written answers, question by question, for the teacher."""
    lines = ["# Written answers, collected", ""]
    for spec in grade.labs:
        slots_by_student = {s: grade.answers.get((s, spec.name), []) for s in grade.students()}
        questions_ = next((slots for slots in slots_by_student.values() if slots), [])
        lines += [f"## {spec.name}", ""]
        for slot in questions_:
            lines += [f"### Q{slot.number}. {slot.question}", ""]
            for student, slots in slots_by_student.items():
                text = slots[slot.number - 1].answer if len(slots) >= slot.number else ""
                lines.append(f"- **{student}**: {text.replace(chr(10), ' ') if text else '*(nothing written)*'}")
            lines.append("")
    return "\n".join(lines) + "\n"


def class_html(grade: ClassGrade, kernel: str) -> str:
    """The class table as one self-contained HTML page (no scripts, no external resources)."""
    esc = html.escape
    labs = [spec.name for spec in grade.labs]
    rows = []
    for student in grade.students():
        cells = []
        for lab in labs:
            m = next(x for x in grade.marks if x.student == student and x.lab == lab)
            share = m.correct / m.total if m.total else 0.0
            cells.append(f'<td class="own-{esc(m.own.status)}" title="{esc(m.own.detail)}">'
                         f'<span class="bar" style="width:{share * 100:.0f}%"></span>'
                         f'<b>{m.correct}/{m.total}</b><br>own: {esc(m.own.status)}<br>'
                         f'written: {m.explained}/{m.asked}</td>')
        right, asked = grade.total(student)
        rows.append(f"<tr><th>{esc(student)}</th>{''.join(cells)}<td><b>{right}/{asked}</b></td></tr>")
    head = "".join(f"<th>{esc(lab)}</th>" for lab in labs)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>socklab class grade</title>
<style>
body {{ font-family: sans-serif; margin: 2em; }}
table {{ border-collapse: collapse; }}
th, td {{ border: 1px solid #999; padding: .4em .6em; vertical-align: top; position: relative; }}
td .bar {{ position: absolute; left: 0; bottom: 0; height: 4px; background: #3a7; }}
td.own-pass {{ background: #e6f6ea; }} td.own-fail, td.own-error {{ background: #fbe9e7; }}
td.own-missing {{ background: #f5f5f5; }}
</style></head><body>
<h1>socklab class grade</h1>
<p>{len(grade.students())} student(s); answer key: the kernel ({esc(kernel)}); graded {esc(time.strftime('%Y-%m-%d %H:%M %Z'))}.
Each cell: predictions right/asked, own scenario, explanations written/asked.</p>
<table><thead><tr><th>student</th>{head}<th>predictions</th></tr></thead>
<tbody>{''.join(rows)}</tbody></table>
<h2>Predictions right, per student</h2>
<img src="class.svg" alt="predictions right per student">
<script>
window.addEventListener("load", function () {{
  var images = Array.prototype.slice.call(document.images);
  var loaded = images.filter(function (img) {{ return img.complete && img.naturalWidth > 0; }}).length;
  document.documentElement.setAttribute("data-images-loaded", loaded + "/" + images.length);
}});
</script>
</body></html>
"""


def class_svg(grade: ClassGrade) -> str:
    """A bar per student: the share of predictions right over every lab graded."""
    students = grade.students()
    width, bar, left = 640, 22, 120
    height = 40 + bar * max(len(students), 1) + 20
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
           'font-family="sans-serif" font-size="12">', f'<rect width="{width}" height="{height}" fill="white"/>']
    for number, student in enumerate(students):
        right, asked = grade.total(student)
        share = right / asked if asked else 0.0
        y = 30 + number * bar
        out.append(f'<text x="{left - 8}" y="{y + 15}" text-anchor="end">{html.escape(student)}</text>'
                   f'<rect x="{left}" y="{y + 3}" width="{(width - left - 90) * share:.1f}" height="{bar - 6}" '
                   f'fill="#3a7"/><text x="{left + (width - left - 90) * share + 6:.1f}" y="{y + 15}">'
                   f'{right}/{asked}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"
