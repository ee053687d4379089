"""Shared by every test: socklab's own modules compiled once, before the suite starts its processes.

The suite starts several hundred `invoke` commands (real starts and forks, tests/forkinvoke.py). A
command reads each module's cached bytecode, but writes none when PYTHONDONTWRITEBYTECODE is set
(some sandboxes and CI images set it), so without a cache each command compiled tasks.py and every
harness module it imported from source: about 50 ms of CPU a command. Reading a cache is allowed
whatever that setting says; writing it here is what a first run in a student's shell does anyway.
"""

from __future__ import annotations

import compileall
import re
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

# The test modules too: pytest rewrites their asserts on import and caches the result only when
# bytecode may be written. Without the cache every xdist worker rewrote all 300 test modules again,
# each run: 6.4 s of a worker's collection, 3.3 s with it. (harness/__init__.py, which the socklab
# plugin imported before this file, set it from PYTHONDONTWRITEBYTECODE; the test modules come later.)
sys.dont_write_bytecode = False


def pytest_configure(config) -> None:
    if hasattr(config, "workerinput"):  # an xdist worker: the controller compiled before it started them
        return
    # harness/guest/inside/ is pushed to the guests as source, and compiled there by their own Python.
    compileall.compile_dir(REPO_ROOT / "harness", quiet=1, rx=re.compile(r"[/\\]inside[/\\]"))
    compileall.compile_file(REPO_ROOT / "tasks.py", quiet=1)
