"""The guides' shell blocks, checked without a VM: annotations that parse, the README's own commands, no machine paths."""

from __future__ import annotations

import re

import pytest

from tests.guideblocks import REPO_ROOT, all_blocks, blocks

BLOCKS = all_blocks()


def test_every_guide_has_blocks_to_run():
    assert len([b for b in BLOCKS if b.kind == "run"]) >= 40
    for guide in sorted((REPO_ROOT / "labs").glob("[0-9]*/README.md")):
        assert any(b.kind == "run" for b in blocks(guide)), guide


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_annotations_are_understood(block):
    assert not block.problems, f"{block.id}: {block.problems}"


def test_the_setup_block_is_the_readme_s_quick_start():
    """The course path repeats the README's two commands; CI runs those, so the guide test does not."""
    readme = (REPO_ROOT / "README.md").read_text()
    quick = re.search(r"## Quick start.*?```sh\n(.*?)```", readme, re.S)[1]
    setups = [b for b in BLOCKS if b.kind == "setup"]
    assert setups and all(b.script == quick for b in setups), (quick, [b.script for b in setups])


def test_no_run_block_stops_a_shared_lab():
    """Others may be using the lab: the guides never tell a student to run `lab.down`."""
    assert [b.id for b in BLOCKS if b.kind == "run" and "lab.down" in b.script] == []


def test_a_block_annotation_parses(tmp_path):
    guide = tmp_path / "README.md"
    guide.write_text("text\n<!-- expect: exit 1 -->\n<!-- expect: contains ino:0 -->\n```sh\nfalse\n```\n"
                     "<!-- interactive -->\n```sh\ninvoke lab.ssh server\n```\n"
                     "<!-- expect: exitt 1 -->\n   ```sh\n   true\n   ```\n```python\nx\n```\n")
    found = blocks(guide)
    assert [(b.line, b.script, b.exit_status, b.contains, b.kind) for b in found[:2]] == [
        (4, "false\n", 1, ("ino:0",), "run"), (8, "invoke lab.ssh server\n", 0, (), "interactive")]
    assert found[2].script == "true\n" and found[2].problems and len(found) == 3


@pytest.mark.parametrize("path", sorted([*(REPO_ROOT / "labs").rglob("*.md"), *(REPO_ROOT / "docs").rglob("*.md"),
                                         *(REPO_ROOT / "labs").rglob("*.yaml")]), ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_no_machine_path_in_the_course_or_the_docs(path):
    """The course cites the article by its title and kernel code by file and function, never a path on one machine."""
    text = path.read_text()
    assert not re.search(r"/work/|/home/\w|/root/|shared/seed", text), path


def test_every_lab_s_guide_runs_its_check():
    """The guide test is also every lab's live test: each guide runs `invoke lab.check NN` as written."""
    for guide in sorted((REPO_ROOT / "labs").glob("[0-9]*/README.md")):
        name = guide.parent.name
        assert any(b.kind == "run" and re.search(rf"^invoke lab\.check {name}\s*$", b.script, re.M)
                   for b in blocks(guide)), name
