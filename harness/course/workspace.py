"""Where a student's work lives: ``work/NAME/NN/`` (predictions, own scenario, written answers)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import SocklabError
from ..paths import project_root

# A name becomes a directory: letters, digits, '.', '_', '-', and never '..' or a path separator.
_STUDENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

PREDICTIONS = "predictions.yaml"
OWN_SCENARIO = "own.yaml"
ANSWERS = "answers.md"


class CourseError(SocklabError):
    """A student's file or name is not usable; the message names the file and line."""


def check_student(name: str | None) -> str:
    """The student's name, if it can be a directory name of the workspace."""
    if not name:
        raise CourseError("name the student: --student NAME (letters, digits, '.', '_' or '-')")
    if "/" in name or "\\" in name or ".." in name or not _STUDENT.match(name):
        raise CourseError(f"--student {name!r}: a name is letters, digits, '.', '_' or '-', "
                          "without '/' or '..' (it becomes a directory of the workspace)")
    return name


def default_root(option: str | None = None) -> Path:
    """``--workspace``, else $SOCKLAB_WORKSPACE, else ``work/`` in the checkout (installed: the current directory)."""
    return Path(option or os.environ.get("SOCKLAB_WORKSPACE") or project_root() / "work")


def lab_number(lab_name: str) -> str:
    """``01-sockets-are-files`` -> ``01``: the workspace keeps one directory per lab number."""
    head = lab_name.split("-", 1)[0]
    return head if head.isdigit() else lab_name


@dataclass(frozen=True)
class Workspace:
    """The workspace root: one directory per student, one per lab inside it."""

    root: Path

    def lab_dir(self, student: str, lab_name: str) -> Path:
        return self.root / check_student(student) / lab_number(lab_name)

    def students(self) -> list[str]:
        """Every student with a directory in the workspace (names that could not be students are skipped)."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and _STUDENT.match(p.name) and ".." not in p.name)
