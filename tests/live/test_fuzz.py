"""The fuzz corpus and a fixed-seed differential fuzz on the live kernels (what CI runs on each kernel).

The kernel matrix (`invoke lab.matrix --corpus --fuzz-steps 5000`) runs the same two on 6.12 and 7.2
through the same functions; here they run on whatever kernel the test lab boots.
"""

from __future__ import annotations

import pytest

from harness.fuzz import cli
from harness.fuzz.corpus import CORPUS, applies, files
from harness.fuzz.matrix import CI_SEED, CI_STEPS
from harness.lab.status import markdown
from harness.scenario.check import CheckReport, lab_kernels, run_scenario
from harness.scenario.format import load

pytestmark = pytest.mark.vm
FILES = files(CORPUS)


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_each_corpus_file_agrees_on_the_kernel_and_the_model(lab, path):
    scenario = load(path, known_hosts=("client", "server"))
    running = set(lab_kernels(lab).values())
    if not applies(scenario, running):
        pytest.skip(f"{path.name} holds on {', '.join(scenario.kernels)}; the lab runs {', '.join(sorted(running))}")
    result = run_scenario(scenario, lab)
    assert result.ok, markdown(CheckReport(scenario.name, runs=[result]))


def test_a_fixed_seed_fuzz_finds_no_disagreement(lab, tmp_path):
    outcome = cli.run(lab, CI_STEPS, CI_SEED, tmp_path, shrink=True)
    report = outcome.report
    assert report.steps >= CI_STEPS
    assert not report.disagreements, outcome.text() + "\n" + "\n".join(p.read_text() for p in outcome.written)
