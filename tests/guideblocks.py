"""The lab guides' shell blocks, as tests read them: what each block runs and what it must show.

A fenced ```sh block in labs/README.md or labs/*/README.md is run as one `bash -e` script from the
repository root. HTML comments on the lines right before its fence say what to expect:

    <!-- expect: exit 1 -->           the block must exit 1 (default: 0)
    <!-- expect: contains ino:0 -->   its output (stdout and stderr) must contain the text; repeatable
    <!-- interactive -->              a person types into it (lab.ssh, lab.console): not run
    <!-- setup -->                    the README's own two commands: CI runs them before the tests

Any other comment there is an error, so a typo cannot turn a check off.
"""

from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[\w-]*)[ \t]*$")
COMMENT = re.compile(r"^\s*<!--\s*(?P<body>.*?)\s*-->\s*$")
KINDS = ("interactive", "setup")


@dataclass(frozen=True)
class Block:
    """One ```sh block of a guide."""

    path: Path
    line: int  # of the opening fence, 1-based
    script: str
    exit_status: int = 0
    contains: tuple[str, ...] = ()
    kind: str = "run"  # run | interactive | setup
    problems: tuple[str, ...] = field(default=())

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(REPO_ROOT / 'labs')}:{self.line}"


def guides(root: Path = REPO_ROOT) -> list[Path]:
    """The course path first, then each lab's guide in lab order."""
    return [root / "labs" / "README.md", *sorted((root / "labs").glob("[0-9]*/README.md"))]


def _annotations(lines: list[str], fence_index: int) -> list[str]:
    found = []
    index = fence_index - 1
    while index >= 0:
        match = COMMENT.match(lines[index])
        if not match:
            break
        found.insert(0, match["body"])
        index -= 1
    return found


def _apply(annotations: list[str]) -> dict:
    exit_status, contains, kind, problems = 0, [], "run", []
    for note in annotations:
        if note in KINDS:
            kind = note
        elif note.startswith("expect:"):
            what = note[len("expect:"):].strip()
            if re.fullmatch(r"exit \d+", what):
                exit_status = int(what.split()[1])
            elif what.startswith("contains "):
                contains.append(what[len("contains "):])
            else:
                problems.append(f"unknown expectation {what!r} (use `exit N` or `contains TEXT`)")
        else:
            problems.append(f"unknown annotation {note!r}")
    return {"exit_status": exit_status, "contains": tuple(contains), "kind": kind, "problems": tuple(problems)}


def blocks(path: Path) -> list[Block]:
    """Every ```sh block of one guide, with what its annotations ask."""
    lines = path.read_text().splitlines()
    found, index = [], 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if not opening or not opening["lang"]:
            index += 1
            continue
        end = index + 1
        while end < len(lines) and not re.match(rf"^{re.escape(opening['indent'])}```\s*$", lines[end]):
            end += 1
        if opening["lang"] == "sh":
            body = textwrap.dedent("\n".join(lines[index + 1:end])).strip("\n") + "\n"
            found.append(Block(path, index + 1, body, **_apply(_annotations(lines, index))))
        index = end + 1
    return found


def all_blocks(root: Path = REPO_ROOT) -> list[Block]:
    return [block for guide in guides(root) for block in blocks(guide)]
