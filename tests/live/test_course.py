"""The course on live kernels: the kernel's run is the answer key; own scenarios judged on kernel and model."""

from __future__ import annotations

import pytest
import yaml

from harness.course import grade as grading
from harness.course.exercise import Exercise, judge
from harness.course.score import AnswerKey, score
from harness.course.sheet import questions, read_sheet, render_sheet
from harness.course.workspace import Workspace
from harness.paths import REPO_ROOT
from harness.scenario.check import LabSpec, check, run_scenario
from harness.scenario.format import load

pytestmark = pytest.mark.vm


def _sheet(spec, path, answers):
    sheet = yaml.safe_load(render_sheet(spec, path.parent.parent.name))
    for entry in sheet["predictions"]:
        entry["answer"] = answers.get(entry["id"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(sheet, sort_keys=False))


@pytest.mark.parametrize("name", ["01-sockets-are-files", "03-listen"])
def test_copying_one_kernel_run_scores_full_marks_on_the_next(lab, name, tmp_path):
    spec = LabSpec.load(name)
    asked = questions(spec)
    first = AnswerKey.from_report(spec.name, check(spec, lab), asked)
    assert all(answer.available for answer in first.answers.values())
    copied = {qid: a.describe() if a.errno or a.blocked else a.ret for qid, a in first.answers.items()}
    path = tmp_path / "copier" / spec.name[:2] / "predictions.yaml"
    _sheet(spec, path, copied)
    second = AnswerKey.from_report(spec.name, check(spec, lab), asked)  # the grade's own run
    marked = score(spec.name, asked, read_sheet(spec, path, asked), second)
    wrong = [(m.question.id, m.answer, m.key.describe()) for m in marked.marks if not m.correct]
    assert not wrong and marked.correct == marked.total


@pytest.mark.parametrize("number", ["01", "02", "03", "04", "05", "06", "07", "08", "09"])
def test_the_exercise_solutions_pass_on_the_kernel_and_the_model(lab, number):
    spec = LabSpec.load(number)
    exercise = Exercise.parse(spec.exercise, spec.name)
    scenario = load(REPO_ROOT / "tests" / "fixtures" / "course" / f"own-{number}.yaml", known_hosts=("client", "server"))
    verdict = judge(exercise, scenario, run_scenario(scenario, lab), kernel=True)
    assert verdict.passed, verdict.detail


def test_a_class_graded_on_the_kernel(lab, tmp_path):
    spec = LabSpec.load("02")
    workspace = Workspace(tmp_path / "work")
    asked = questions(spec)
    _sheet(spec, workspace.lab_dir("alice", spec.name) / "predictions.yaml", {q.id: 0 for q in asked})
    workspace.lab_dir("nobody", spec.name).mkdir(parents=True)
    own = workspace.lab_dir("alice", spec.name) / "own.yaml"
    own.write_text((REPO_ROOT / "tests" / "fixtures" / "course" / "own-02.yaml").read_text())

    key = AnswerKey.from_report(spec.name, check(spec, lab), asked)

    def judge_own(lab_spec, path):
        from harness.course.exercise import Verdict

        if not path.is_file():
            return Verdict("missing")
        scenario = load(path, known_hosts=("client", "server"))
        return judge(Exercise.parse(lab_spec.exercise, lab_spec.name), scenario, run_scenario(scenario, lab), True)

    result = grading.grade_class(workspace, [spec], lambda lab_spec: key, judge_own)
    marks = {m.student: m for m in result.marks}
    # alice answered 0 everywhere: right exactly where the kernel returned 0 (and a count of 0 sockets).
    zeros = sum(1 for a in key.answers.values() if a.ret == 0 and not a.errno and not a.blocked)
    assert marks["nobody"].correct == 0 and marks["nobody"].own.status == "missing"
    assert marks["alice"].correct == zeros and 0 < zeros < marks["alice"].total
    assert marks["alice"].own.passed, marks["alice"].own.detail
