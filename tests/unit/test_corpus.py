"""Every shrunk disagreement the fuzzer found (tests/corpus/) runs on the model and holds the kernel's answers."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.scenario.format import load
from harness.scenario.runner import ModelBackend, run

CORPUS = Path(__file__).resolve().parents[1] / "corpus"
FILES = sorted(CORPUS.glob("*.yaml"))


def test_the_corpus_is_not_empty():
    assert len(FILES) >= 5


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_the_model_now_gives_the_kernel_s_answer(path):
    scenario = load(path, known_hosts=("client", "server"))
    assert "found by lab.fuzz" in scenario.description and any(s.label == "disagreement" for s in scenario.steps)
    result = run(scenario, None, ModelBackend(scenario))
    assert result.ok, [(r.step.describe(), r.verdict.problems) for r in result.records if r.verdict and not r.verdict.ok]
