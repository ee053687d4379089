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


# Of the unit modules, the share kept for the end of the run, after the last live module.
UNIT_TAIL = 0.25
# Live modules of long items (9-22 s) run first. Last in collection order, with test_trace, they left
# one worker on a traced check while the other two had finished: 16 of a run's 50 idle core-s fell in
# its last 20 s.
LONG_ITEMS_FIRST = ("test_three_labs.py", "test_zerocopy_bench.py")
# The traced checks (5-14 s an item) come right after the guides, not first: code a guest translates
# while function_graph is on is translated again once it is off. lab 07's traced check on a freshly
# restored lab took 12.1 core-s of QEMU, 8.7-9.8 after an untraced check of the lab.
AFTER_GUIDES = ("test_trace.py",)


def pytest_collection_modifyitems(session, config, items) -> None:
    """Unit test modules between the live ones, a quarter of them left for the end.

    The suite is bound by the host's two cores: the live tests keep both busy, and what is left
    idle is time when every worker waits. In collection order the unit tests came last, and many
    of them wait on purpose (a timeout against a fake server, a fake console that stays silent):
    the last 34 s ran at 1.0-1.3 cores of 2. Spread among the live modules, their waits overlap
    the other workers' guests; a run's idle went from 48-51 to 44-49 core-s. The live modules of
    long items (LONG_ITEMS_FIRST) go first and the traced checks after the guides (AFTER_GUIDES), so
    the run ends on short tests and the workers finish together. Each module stays in one piece and
    in its own order: a module's fixtures (a fault lab, a traced check) are set up once per worker
    that runs it, as before.
    """
    live_dir = REPO_ROOT / "tests" / "live"
    modules: dict[Path, list] = {}
    for item in items:
        modules.setdefault(Path(item.path), []).append(item)
    live = [group for path, group in modules.items() if live_dir in path.parents]
    name = lambda group: Path(group[0].path).name  # noqa: E731
    moved = [group for group in live if name(group) in AFTER_GUIDES]
    live = [group for group in live if name(group) not in AFTER_GUIDES]
    at = next((index + 1 for index, group in enumerate(live) if name(group) == "test_guides.py"), len(live))
    live[at:at] = moved
    live.sort(key=lambda group: name(group) not in LONG_ITEMS_FIRST)  # stable: the rest keep their order
    unit = [group for path, group in modules.items() if live_dir not in path.parents]
    if not live or not unit:
        return
    spread = unit[:len(unit) - int(len(unit) * UNIT_TAIL)]
    order: list = []
    for index, group in enumerate(live):
        order += group
        # After live module i, the unit modules whose share of the spread falls before i + 1.
        order += [item for part in spread[len(spread) * index // len(live):len(spread) * (index + 1) // len(live)]
                  for item in part]
    order += [item for part in unit[len(spread):] for item in part]
    assert len(order) == len(items)
    items[:] = order
