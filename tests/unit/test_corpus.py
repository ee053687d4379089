"""Every shrunk disagreement the fuzzer found (tests/corpus/) runs on the model and holds the kernel's answers.

Each file runs on the model of every kernel series its header says it holds on (all of them when
it names none), as the live corpus runs it on every kernel the lab boots.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.model.versions import KERNELS
from harness.scenario.format import load
from harness.scenario.runner import ModelBackend, run

CORPUS = Path(__file__).resolve().parents[1] / "corpus"
FILES = sorted(CORPUS.glob("*.yaml"))
CASES = [(path, series) for path in FILES for series in KERNELS
         if load(path, known_hosts=("client", "server")).holds_on(series)]


def test_the_corpus_is_not_empty():
    assert len(FILES) >= 5


def test_every_corpus_file_holds_on_some_kernel():
    assert {path for path, _series in CASES} == set(FILES)


@pytest.mark.parametrize("path, series", CASES, ids=[f"{p.stem}-{k}" for p, k in CASES])
def test_the_model_now_gives_the_kernel_s_answer(path, series):
    scenario = load(path, known_hosts=("client", "server"))
    assert "found by lab.fuzz" in scenario.description and any(s.label == "disagreement" for s in scenario.steps)
    result = run(scenario, None, ModelBackend(scenario, kernel=series))
    assert result.ok, [(r.step.describe(), r.verdict.problems) for r in result.records if r.verdict and not r.verdict.ok]
