"""Every command of every lab guide, run as written on the live lab, in the order a student meets them.

See tests/guideblocks.py for the block format. A block fails on an exit status other than the one it
expects, on a Python traceback anywhere in its output, or when a text it promises is missing.
Blocks run through ``guide_shell`` (tests/live/conftest.py): a guide's `invoke lab.check NN` is the
run tests/live/test_labs.py checks too, done once.
"""

from __future__ import annotations

import pytest

from tests.guideblocks import all_blocks

pytestmark = pytest.mark.vm


def _runnable():
    for block in all_blocks():
        if block.kind == "run":
            # One xdist group per guide: its blocks stay in order on one worker, with that lab's test_labs check.
            group = block.path.parent.name if block.path.name == "README.md" and block.path.parent.name[:2].isdigit() \
                else "course-path"
            yield pytest.param(block, id=block.id, marks=pytest.mark.xdist_group(f"guide-{group}"))


@pytest.mark.parametrize("block", list(_runnable()))
def test_guide_block_runs_as_written(guide_shell, block):
    result = guide_shell(block.script)
    shown = result.shown(block.id)
    assert result.returncode == block.exit_status, shown
    assert "Traceback (most recent call last)" not in result.output, shown
    for text in block.contains:
        assert text in result.output, f"{shown}\nmissing: {text!r}"
