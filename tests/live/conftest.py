"""Shared by the live tests: a guide's shell script run once per session, whichever test asks first.

The guide of each lab tells the student to run `invoke lab.check NN` and tests/live/test_labs.py
checks every lab: the same command on the same lab. Run twice, it cost a whole second pass over every
lab (about a minute under TCG). Both tests now ask ``guide_shell`` for it, and the second gets the
first's run: its exit status, its output and the reports it wrote.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.forkinvoke import ShellServer
from tests.guideblocks import REPO_ROOT

BLOCK_TIMEOUT = 900.0  # a whole lab check under TCG on a loaded host, with room to spare

# The live tests start a few hundred `invoke` processes. With PYTHONDONTWRITEBYTECODE in the
# environment (some sandboxes set it), each one compiled every harness module from source again:
# about 0.2 s of CPU per command. A student's shell does not set it, and __pycache__ is ignored by git.
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)


@dataclass(frozen=True)
class ShellRun:
    """One run of a guide script: what it printed (stdout and stderr, in order) and where its reports went."""

    script: str
    returncode: int
    output: str
    results: Path  # SOCKLAB_RESULTS of this run: every report it wrote is under it

    def shown(self, label: str) -> str:
        return f"{label}\n$ {self.script}exit {self.returncode}\n{self.output[-4000:]}"


@pytest.fixture(scope="session")
def guide_shell(lab, tmp_path_factory):
    """``run(script)``: ``bash -e -c script`` from the repository root, as a student's shell runs it; once per script.

    The reports of each run go to a directory of their own (SOCKLAB_RESULTS), so a test can read the
    reports of the run it was handed, and a test run leaves no reports in the checkout's results/;
    the predictions sheets go to a workspace of the session's own (SOCKLAB_WORKSPACE), not into a
    student's work/, and what a block writes into results/ by name (lab 07's zerocopy plot) is
    removed after it ran. Only names the block's own script mentions go: blocks of other workers
    run meanwhile, and results/ itself stays.

    The scripts' `invoke` is a shim that forks the command from a server that imported invoke and
    the harness once (``ShellServer`` in tests/forkinvoke.py), with the shell's own stdio: the guides
    start about a hundred `invoke`s, and each real start costs 0.35–0.5 core-s of imports on a host
    whose two cores the suite keeps busy. The real start is what every other CLI test of the live
    suite runs; tests/unit/test_forkinvoke.py checks that the shim and a real start agree.
    """
    runs: dict[str, ShellRun] = {}
    guard = threading.Lock()
    # As in a student's shell: pytest's COLUMNS=80 would make every table fold at 80 columns.
    base = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    base["SOCKLAB_WORKSPACE"] = str(tmp_path_factory.mktemp("guide-work"))
    server = ShellServer(tmp_path_factory.mktemp("guide-bin"), base)
    checkout_results = REPO_ROOT / "results"

    def run(script: str) -> ShellRun:
        with guard:
            if script not in runs:
                results = tmp_path_factory.mktemp("guide-results")
                env = dict(base, SOCKLAB_RESULTS=str(results))
                # `invoke` is the shim; `python3` is the Python running the tests, as in an activated
                # virtualenv: not whatever a version manager's shim would pick (and start) first.
                env["PATH"] = os.pathsep.join([str(server.shim.parent), str(Path(sys.executable).parent),
                                               env.get("PATH", "")])
                before = set(checkout_results.iterdir()) if checkout_results.is_dir() else set()
                try:
                    done = subprocess.run(["bash", "-e", "-c", script], cwd=REPO_ROOT, stdin=subprocess.DEVNULL,
                                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                          timeout=BLOCK_TIMEOUT)
                finally:
                    for added in (set(checkout_results.iterdir()) if checkout_results.is_dir() else set()) - before:
                        if added.stem in script:  # results/zerocopy.png names results/zerocopy.json too
                            shutil.rmtree(added) if added.is_dir() else added.unlink()
                runs[script] = ShellRun(script, done.returncode, done.stdout, results)
            return runs[script]

    try:
        yield run
    finally:
        server.close()
