"""The kernel matrix's corpus and fuzz rows (harness.fuzz.matrix), on a fake lab whose kernel is the model."""

from __future__ import annotations

from dataclasses import dataclass, field

from harness.fuzz import cli
from harness.fuzz.corpus import CORPUS, run_corpus
from harness.fuzz.engine import fuzz, write_corpus
from harness.fuzz.matrix import CI_SEED, CI_STEPS, corpus_check, fuzz_check
from harness.scenario.runner import ModelBackend, run

from ..fakes import FakeVM
from .test_fuzz import ModelKernel, listen_zero_is_einval

FILE = """\
name: {name}
description: found by lab.fuzz --seed 1 (program 1)
hosts: [server]
{kernels}---
steps:
  - {{on: server, call: socket, args: {{family: AF_INET, type: SOCK_STREAM}}, as: s}}
  - {{on: server, call: listen, args: {{fd: $s, backlog: 0}}, label: disagreement, expect: 0}}
"""


@dataclass
class FakeLab:
    release: str
    planted: bool = False
    runs: list = field(default_factory=list)

    def require(self):
        return type("State", (), {"vms": [FakeVM("client", self.release), FakeVM("server", self.release)]})()


def on_the_model(scenario, lab):
    """run_scenario's part that matters here: the scenario on the model of the lab's kernel."""
    lab.runs.append(scenario.name)
    series = ".".join(lab.release.split(".")[:2])
    backend = ModelBackend(scenario, kernel=series)
    result = run(scenario, None, backend)
    if lab.planted:
        return Failed(scenario)
    return result


@dataclass
class Failed:
    """A run the lab aborted, as cell_of reads it."""

    scenario: object
    ok: bool = False
    error: str = "planted: the agent died"
    records: tuple = ()


def test_the_corpus_row_runs_the_files_that_hold_on_the_lab_s_kernel_and_skips_the_others(tmp_path):
    (tmp_path / "a.yaml").write_text(FILE.format(name="listen-everywhere", kernels=""))
    (tmp_path / "b.yaml").write_text(FILE.format(name="listen-newer", kernels='kernels: ["6.12", "7.2"]\n'))
    (tmp_path / "open").mkdir()
    (tmp_path / "open" / "c.yaml").write_text(FILE.format(name="listen-open", kernels=""))
    old = FakeLab("6.1.0-57-cloud-amd64")
    outcome = run_corpus(old, tmp_path, run_one=on_the_model)
    assert old.runs == ["listen-everywhere"]  # not the 6.12 file, never the open one
    assert outcome.ok and outcome.passed == ("listen-everywhere",) and outcome.skipped == ("listen-newer",)
    assert outcome.summary().startswith("corpus on 6.1: 1 of 1 files agree, 1 for other kernels skipped")

    newer = FakeLab("6.12.118+deb13-cloud-amd64")
    cell = corpus_check(tmp_path, run=lambda lab, directory: run_corpus(lab, directory, run_one=on_the_model)).run(newer)
    assert newer.runs == ["listen-everywhere", "listen-newer"] and cell.ok
    assert cell.figures == ["corpus on 6.12: 2 of 2 files agree, 0 for other kernels skipped, 0 s"]


def test_a_corpus_file_that_disagrees_fails_the_row_and_says_which(tmp_path):
    (tmp_path / "a.yaml").write_text(FILE.format(name="listen-everywhere", kernels=""))
    cell = corpus_check(tmp_path, run=lambda lab, directory: run_corpus(lab, directory, run_one=on_the_model)).run(
        FakeLab("7.2.12+deb14-cloud-amd64", planted=True))
    assert not cell.ok and cell.figures[0].startswith("corpus on 7.2: 0 of 1 files agree")
    assert cell.differences == ["listen-everywhere: aborted: planted: the agent died"]


def test_the_real_corpus_has_a_file_for_every_kernel_the_matrix_boots():
    for release in ("6.1.0-57", "6.12.118+deb13", "7.2.12+deb14"):
        lab = FakeLab(release)
        assert run_corpus(lab, CORPUS, run_one=lambda scenario, lab: type("R", (), {"ok": True})()).passed


def test_the_fuzz_row_runs_the_fixed_seed_and_reports_its_figures_and_new_disagreements(tmp_path):
    calls = []

    def fake_run(lab, steps, seed, out, progress=None, shrink=True):
        calls.append((lab.release, steps, seed, out, shrink))
        report = fuzz(steps, seed, ModelKernel(listen_zero_is_einval if lab.planted else None), do_shrink=shrink)
        return cli.FuzzRun(report, tuple(write_corpus(d, out) for d in report.disagreements), 7, 900.0, "server 6.12")

    row = fuzz_check(600, CI_SEED, lambda lab: tmp_path / lab.release, run=fake_run)
    assert row.name == "fuzz (seed 1, 600 steps)" and CI_STEPS >= 5000
    clean = row.run(FakeLab("6.12"))
    assert clean.ok and clean.differences == []
    assert any(line.startswith("steps run: ") and "7 agent round trips" in line for line in clean.figures)
    assert any(line.startswith("rule coverage: model rules exercised") for line in clean.figures)
    assert any(line.startswith("wall time ") for line in clean.figures)
    assert not any("never reached" in line for line in clean.figures)  # the long lists stay in the fuzz's own output

    buggy = row.run(FakeLab("7.2", planted=True))
    assert not buggy.ok
    assert buggy.differences[0].startswith("listen: kernel EINVAL, model ok int [")
    assert (tmp_path / "7.2").is_dir() and list((tmp_path / "7.2").glob("fuzz-1-*.yaml"))
    assert calls == [("6.12", 600, 1, tmp_path / "6.12", True), ("7.2", 600, 1, tmp_path / "7.2", True)]
