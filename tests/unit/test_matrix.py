"""lab.matrix: every lab on every kernel, one lab at a time; the table, the cells and the guide check."""

from __future__ import annotations

from dataclasses import dataclass, field

from harness.errors import LabError
from harness.scenario import matrix
from harness.scenario.check import LabSpec

from .fakes import FakeVM


@dataclass
class FakeLab:
    kernel: str
    events: list = field(default_factory=list)

    def require(self):
        return type("State", (), {"vms": [FakeVM("client", self.kernel), FakeVM("server", self.kernel)]})()


@dataclass
class FakeAssertion:
    name: str

    def describe(self):
        return "== 768"


@dataclass
class FakeOutcome:
    assertion: FakeAssertion
    value: object
    ok: bool
    error: str = ""


@dataclass
class FakeReport:
    ok: bool
    assertions: list
    runs: list = field(default_factory=list)


def test_each_kernels_lab_is_stopped_before_the_next_boots_and_cells_name_what_differs():
    events = []

    def boot(kernel):
        events.append(("up", kernel))
        return FakeLab(f"{kernel}.0-test")

    def stop(lab):
        events.append(("down", lab.kernel))

    def check_one(spec, lab):
        if lab.kernel.startswith("6.12") and spec.name == "07-zerocopy":
            return FakeReport(False, [FakeOutcome(FakeAssertion("one notification"), 896, False)])
        return FakeReport(True, [])

    result = matrix.run(["6.1", "6.12"], ["03-listen", "07-zerocopy"], boot, stop, say=lambda line: None,
                        check_one=check_one)
    assert events == [("up", "6.1"), ("down", "6.1.0-test"), ("up", "6.12"), ("down", "6.12.0-test")]
    assert result.cells[("03-listen", "6.12")].ok
    assert result.cells[("07-zerocopy", "6.12")].differences == ["one notification: 896, expected == 768"]
    table = matrix.markdown(result)
    assert "| 07-zerocopy | pass | FAIL (1) |" in table
    assert "net: increase optmem_max default value" in table  # the 6.12 column's version rules


def test_an_interrupted_check_still_stops_that_kernels_lab():
    stopped = []

    def check_one(spec, lab):
        raise KeyboardInterrupt

    try:
        matrix.run(["7.2"], ["03-listen"], lambda k: FakeLab("7.2.12"), stopped.append, say=lambda line: None,
                   check_one=check_one)
    except KeyboardInterrupt:
        pass
    assert len(stopped) == 1


def test_every_guide_has_a_newer_kernels_part_naming_the_rules_its_lab_uses():
    for name in matrix.all_labs():
        assert matrix.guide_problems(LabSpec.load(name)) == [], name


def test_a_guide_that_leaves_out_a_rule_its_lab_uses_is_reported(tmp_path):
    lab = tmp_path / "09-x"
    lab.mkdir()
    (lab / "lab.yaml").write_text("title: x\nscenarios: [s.yaml]\nexpected: e.yaml.j2\n")
    (lab / "s.yaml").write_text("name: s\n")
    (lab / "e.yaml.j2").write_text('{% set zc = kernel.rule("zerocopy_notification_truesize", "client") %}\n')
    (lab / "README.md").write_text("# x\n\n## On newer kernels\n\n<!-- kernel-rules: no_such_rule -->\ntext\n")
    problems = matrix.guide_problems(LabSpec.load(str(lab)))
    assert any("no_such_rule, which is no version rule" in p for p in problems)
    assert any("depends on zerocopy_notification_truesize" in p for p in problems)


def test_kernel_checks_run_on_each_kernels_lab_after_the_labs_and_before_it_stops():
    events = []

    def boot(kernel):
        events.append(("up", kernel))
        return FakeLab(f"{kernel}.0-test")

    def check_one(spec, lab):
        events.append(("lab", spec.name, lab.kernel))
        return FakeReport(True, [])

    def corpus(lab):
        events.append(("corpus", lab.kernel))
        return matrix.Cell(True, figures=["corpus on 6.12: 60 of 60 files agree"])

    def fuzz(lab):
        events.append(("fuzz", lab.kernel))
        if lab.kernel.startswith("7.2"):
            return matrix.Cell(False, ["bind: kernel EINVAL, model ok int [fuzz-1-9.yaml]"], figures=["steps run: 5003"])
        raise LabError("server: cannot start the agent as student")

    checks = [matrix.KernelCheck("corpus", corpus), matrix.KernelCheck("fuzz (seed 1, 5000 steps)", fuzz)]
    result = matrix.run(["6.12", "7.2"], ["03-listen"], boot, lambda lab: events.append(("down", lab.kernel)),
                        say=lambda line: None, check_one=check_one, checks=checks)
    assert events == [("up", "6.12"), ("lab", "03-listen", "6.12.0-test"), ("corpus", "6.12.0-test"),
                      ("fuzz", "6.12.0-test"), ("down", "6.12.0-test"),
                      ("up", "7.2"), ("lab", "03-listen", "7.2.0-test"), ("corpus", "7.2.0-test"),
                      ("fuzz", "7.2.0-test"), ("down", "7.2.0-test")]
    assert not result.ok
    table = matrix.markdown(result)
    assert "| corpus | pass | pass | - |" in table
    assert "| fuzz (seed 1, 5000 steps) | FAIL (1) | FAIL (1) | - |" in table
    assert "- corpus on 6.12: 60 of 60 files agree" in table and "- steps run: 5003" in table
    assert "- cannot run: server: cannot start the agent as student" in table
    assert "- bind: kernel EINVAL, model ok int [fuzz-1-9.yaml]" in table
