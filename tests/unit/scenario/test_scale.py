"""Loading and running a scenario is linear in its steps: doubling the steps doubles the work, not more.

Work is counted as executed lines of the scenario loader, the runner and harness/load.py (a trace,
not a clock: the count does not depend on how loaded the machine is). The figure in seconds is in
`invoke bench` (model section).
"""

from __future__ import annotations

import sys
from pathlib import Path

from harness.perf.bench import BIG_SCENARIO, BIG_SCENARIO_STEPS_PER_ROUND
from harness.scenario.check import run_scenario
from harness.scenario.format import load

WATCHED = ("scenario/runner.py", "scenario/format.py", "harness/load.py")


def _lines_executed(path: Path, rounds: int) -> int:
    count = 0

    def local(frame, event, arg):
        nonlocal count
        if event == "line":
            count += 1
        return local

    def global_(frame, event, arg):
        return local if frame.f_code.co_filename.endswith(WATCHED) else None

    sys.settrace(global_)
    try:
        scenario = load(path, {"rounds": rounds})
        result = run_scenario(scenario, None)
    finally:
        sys.settrace(None)
    assert result.ok, result.error
    assert len(scenario.steps) == 3 + rounds * BIG_SCENARIO_STEPS_PER_ROUND
    return count


def test_doubling_the_steps_at_most_doubles_the_lines_executed(tmp_path):
    path = tmp_path / "generated.yaml"
    path.write_text(BIG_SCENARIO)
    small, big = _lines_executed(path, 150), _lines_executed(path, 300)
    # Linear work gives 2.0; the per-step rebuild of every socket name this replaced gave 2.3 here, growing with size.
    assert big / small < 2.1, (small, big)
