"""The fuzz corpus and a fixed-seed differential fuzz on the live kernels (what CI runs)."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.fuzz import cli
from harness.lab.status import markdown
from harness.scenario.check import CheckReport, run_scenario
from harness.scenario.format import load

pytestmark = pytest.mark.vm
CORPUS = Path(__file__).resolve().parents[1] / "corpus"
FILES = sorted(CORPUS.glob("*.yaml"))
CI_SEED, CI_STEPS = 1, 5000


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_each_corpus_file_agrees_on_the_kernel_and_the_model(lab, path):
    scenario = load(path, known_hosts=("client", "server"))
    result = run_scenario(scenario, lab)
    assert result.ok, markdown(CheckReport(scenario.name, runs=[result]))


def test_a_fixed_seed_fuzz_finds_no_disagreement(lab, tmp_path):
    outcome = cli.run(lab, CI_STEPS, CI_SEED, tmp_path, shrink=True)
    report = outcome.report
    assert report.steps >= CI_STEPS
    assert not report.disagreements, outcome.text() + "\n" + "\n".join(p.read_text() for p in outcome.written)
