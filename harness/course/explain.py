"""Written answers: one slot per question of a guide's "Predict, then observe", in ``answers.md``.

``lab.predict`` writes the file with the questions as headings and an empty
slot under each; the student writes below. ``written()`` reads it back: a
slot counts as written when it holds at least ``MIN_WORDS`` words of the
student's own (the question and the comment line do not count).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

MIN_WORDS = 3
_SLOT = "<!-- your answer below: say what the kernel does and which function decides -->"
_HEADING = re.compile(r"^## Q(\d+)\b")


@dataclass(frozen=True)
class Slot:
    number: int
    question: str
    answer: str = ""

    @property
    def written(self) -> bool:
        return len(re.findall(r"\w+", self.answer)) >= MIN_WORDS


def guide_questions(guide: Path) -> list[str]:
    """The numbered questions of the guide's "Predict, then observe" section, each joined into one line."""
    try:
        text = guide.read_text()
    except OSError:
        return []
    section = re.search(r"^## Predict, then observe\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    if not section:
        return []
    questions: list[str] = []
    for line in section.group(1).splitlines():
        item = re.match(r"^(\d+)\.\s+(.*)$", line)
        if item:
            questions.append(item.group(2).strip())
        elif questions and line.startswith("   ") and line.strip():
            questions[-1] += " " + line.strip()
        elif not line.strip() and questions:
            continue
    return questions


def render(lab: str, student: str, questions: list[str]) -> str:
    lines = [f"# {lab}: explanations of {student}", "",
             "Answer each question in your own words, under its heading. Say what the kernel does and",
             "which function decides; `invoke lab.model FILE --explain --reveal` shows the rules after your run.", ""]
    for number, question in enumerate(questions, start=1):
        lines += [f"## Q{number}. {question}", "", _SLOT, "", ""]
    return "\n".join(lines)


def write(lab: str, student: str, guide: Path, path: Path) -> bool:
    """Write the blank answers file unless the student already has one. True if written."""
    if path.exists():
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(lab, student, guide_questions(guide)))
    return True


def read(path: Path, questions: list[str]) -> list[Slot]:
    """Every question's slot, with whatever the student wrote under its heading (missing file: all empty)."""
    answers: dict[int, list[str]] = {}
    if path.is_file():
        current = None
        for line in path.read_text(errors="replace").splitlines():
            heading = _HEADING.match(line)
            if heading:
                current = int(heading.group(1))
                answers[current] = []
            elif line.startswith("# "):
                current = None
            elif current is not None and line.strip() != _SLOT:
                answers[current].append(line)
    return [Slot(n, q, "\n".join(answers.get(n, [])).strip()) for n, q in enumerate(questions, start=1)]
