"""Every command of every lab guide, run as written on the live lab, in the order a student meets them.

See tests/guideblocks.py for the block format. A block fails on an exit status other than the one it
expects, on a Python traceback anywhere in its output, or when a text it promises is missing.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.guideblocks import REPO_ROOT, all_blocks

pytestmark = pytest.mark.vm

BLOCK_TIMEOUT = 900.0  # a whole lab check under TCG on a loaded host, with room to spare


def _runnable():
    for block in all_blocks():
        if block.kind == "run":
            yield pytest.param(block, id=block.id)


@pytest.mark.parametrize("block", list(_runnable()))
def test_guide_block_runs_as_written(lab, block):
    # As in a student's shell: pytest's COLUMNS=80 would make every table fold at 80 columns.
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    result = subprocess.run(["bash", "-e", "-c", block.script], cwd=REPO_ROOT, stdin=subprocess.DEVNULL, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=BLOCK_TIMEOUT)
    shown = f"{block.id}\n$ {block.script}exit {result.returncode}\n{result.stdout[-4000:]}"
    assert result.returncode == block.exit_status, shown
    assert "Traceback (most recent call last)" not in result.stdout, shown
    for text in block.contains:
        assert text in result.stdout, f"{shown}\nmissing: {text!r}"
