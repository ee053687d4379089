"""Marking by the kernel and grading a class: nothing scores 0, the kernel's answers score full marks."""

from __future__ import annotations

import csv
import re

import pytest
import yaml

from harness.course import grade as grading
from harness.course.exercise import Verdict
from harness.course.score import AnswerKey, explain, score
from harness.course.sheet import questions, read_sheet, render_sheet
from harness.course.workspace import CourseError, Workspace
from harness.scenario.check import check

from .conftest import FakeLab


def _key(spec, lab) -> AnswerKey:
    return AnswerKey.from_report(spec.name, check(spec, lab), questions(spec))


def _sheet(spec, path, answers: dict) -> None:
    sheet = yaml.safe_load(render_sheet(spec, path.parent.parent.name))
    for entry in sheet["predictions"]:
        if entry["id"] in answers:
            entry["answer"] = answers[entry["id"]]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(sheet, sort_keys=False))


def _copied_from(key: AnswerKey) -> dict:
    """What a student writes who copies every kernel result from a check's output."""
    return {qid: answer.describe() if answer.errno or answer.blocked else answer.ret
            for qid, answer in key.answers.items()}


def test_a_student_who_fills_in_nothing_scores_zero(mini_lab, tmp_path):
    path = tmp_path / "nobody" / "90" / "predictions.yaml"
    _sheet(mini_lab, path, {})
    marked = score(mini_lab.name, questions(mini_lab), read_sheet(mini_lab, path), _key(mini_lab, FakeLab()))
    assert (marked.correct, marked.total, marked.answered) == (0, 9, 0)


def test_copying_the_kernel_scores_full_marks(mini_lab, tmp_path):
    key = _key(mini_lab, FakeLab())
    path = tmp_path / "copier" / "90" / "predictions.yaml"
    _sheet(mini_lab, path, _copied_from(key))
    marked = score(mini_lab.name, questions(mini_lab), read_sheet(mini_lab, path), key)
    assert marked.correct == marked.total == 9


def test_predictions_are_marked_against_the_kernel_not_the_model(mini_lab, tmp_path):
    # The 2nd call (the first bind) fails on this "kernel" with EACCES; the model says 0.
    kernel = _key(mini_lab, FakeLab(differs={2: "EACCES"}))
    assert kernel.answers["queue/bind"].errno == "EACCES" and kernel.answers["queue/bind"].model == "0"
    path = tmp_path / "modeller" / "90" / "predictions.yaml"
    _sheet(mini_lab, path, {"queue/bind": 0})
    marked = score(mini_lab.name, questions(mini_lab), read_sheet(mini_lab, path), kernel)
    mark = next(m for m in marked.marks if m.question.id == "queue/bind")
    assert not mark.correct
    assert "(the model said 0)" in explain(mark)


def test_a_wrong_answer_is_explained_by_the_models_rule(mini_lab, tmp_path):
    key = _key(mini_lab, FakeLab())
    path = tmp_path / "guesser" / "90" / "predictions.yaml"
    _sheet(mini_lab, path, {"queue/second-bind": 0})
    marked = score(mini_lab.name, questions(mini_lab), read_sheet(mini_lab, path), key)
    mark = next(m for m in marked.marks if m.question.id == "queue/second-bind")
    assert not mark.correct and mark.key.errno == "EADDRINUSE"
    assert "inet_csk_get_port" in explain(mark) or "bind" in explain(mark)


def test_two_students_with_different_sheets_get_different_correct_grades(mini_lab, tmp_path):
    workspace = Workspace(tmp_path / "work")
    key = _key(mini_lab, FakeLab())
    copied = _copied_from(key)
    # alice gets the steps right and the queue wrong; bob the other way round; carol does nothing.
    alice = {qid: value for qid, value in copied.items() if not qid.startswith("queue/stat")}
    alice["queue/stat-1"] = 3
    bob = {"queue/stat-1": copied["queue/stat-1"], "queue/stat-2": copied["queue/stat-2"],
           "queue/bind": "EADDRINUSE"}
    _sheet(mini_lab, workspace.lab_dir("alice", mini_lab.name) / "predictions.yaml", alice)
    _sheet(mini_lab, workspace.lab_dir("bob", mini_lab.name) / "predictions.yaml", bob)
    workspace.lab_dir("carol", mini_lab.name).mkdir(parents=True)
    (workspace.lab_dir("bob", mini_lab.name) / "answers.md").write_text(
        "## Q1. How many?\n\nTwo: the queue holds backlog plus one.\n\n## Q2. Why?\n\n\n")
    runs = []

    def key_for(spec):
        runs.append(spec.name)
        return key

    result = grading.grade_class(workspace, [mini_lab], key_for, lambda spec, path: Verdict("missing"))
    assert runs == ["90-mini"]  # one kernel run marks the whole class
    marks = {m.student: m for m in result.marks}
    assert (marks["alice"].correct, marks["alice"].total) == (7, 9)
    assert (marks["bob"].correct, marks["bob"].total) == (2, 9)
    assert (marks["carol"].correct, marks["carol"].answered) == (0, 0)
    assert (marks["bob"].explained, marks["bob"].asked) == (1, 2) and marks["alice"].explained == 0

    paths = grading.write(result, tmp_path / "out", kernel="6.1.0-test")
    rows = list(csv.DictReader(paths["csv"].open()))
    assert {(r["student"], r["predictions_correct"]) for r in rows} == {("alice", "7"), ("bob", "2"), ("carol", "0")}
    assert "Two: the queue holds backlog plus one." in paths["answers"].read_text()
    assert "<table>" in paths["html"].read_text() and "bob" in paths["html"].read_text()


def test_an_empty_workspace_scores_zero_without_running_the_kernel(mini_lab, tmp_path):
    workspace = Workspace(tmp_path / "work")
    workspace.lab_dir("dora", mini_lab.name).mkdir(parents=True)

    def key_for(spec):
        raise AssertionError("nothing to mark: the kernel need not run")

    result = grading.grade_class(workspace, [mini_lab], key_for, lambda spec, path: Verdict("missing"))
    (mark,) = result.marks
    assert (mark.correct, mark.total, mark.own.status, mark.explained) == (0, 9, "missing", 0)


def test_one_students_broken_sheet_stops_the_grading_before_the_kernel_runs(mini_lab, tmp_path):
    """A sheet the grader cannot read is the teacher's to fix: its file:line, not a silent 0 for the student."""
    workspace = Workspace(tmp_path / "work")
    _sheet(mini_lab, workspace.lab_dir("alice", mini_lab.name) / "predictions.yaml", {"queue/bind": 0})
    path = workspace.lab_dir("eve", mini_lab.name) / "predictions.yaml"
    _sheet(mini_lab, path, {"queue/bind": "perhaps"})
    line = next(n for n, text in enumerate(path.read_text().splitlines(), start=1) if "id: queue/bind" in text)

    def key_for(spec):
        raise AssertionError("a broken sheet stops the grading before any lab runs")

    with pytest.raises(CourseError, match=rf"^{re.escape(str(path))}:{line}: queue/bind: 'perhaps' is not a value"):
        grading.grade_class(workspace, [mini_lab], key_for, lambda spec, path: Verdict("missing"))
    with pytest.raises(CourseError, match=rf"^{re.escape(str(path))}:{line}:"):
        grading.read_sheets(workspace, [mini_lab])
    assert set(grading.read_sheets(workspace, [mini_lab], ["alice"])) == {("alice", mini_lab.name)}


def test_a_timing_dependent_statistic_accepts_a_near_answer(mini_lab):
    from harness.course.score import KernelAnswer, is_correct
    from harness.course.sheet import Answer, Question
    from harness.scenario.expect import Assertion

    counter = Question("s/stat-1", "stat", "s", "how many?", assertion=Assertion("n", "v", "at_least", 3, 1))
    exact = Question("s/stat-2", "stat", "s", "how many?", assertion=Assertion("n", "v", "equals", 3, 1))
    key = KernelAnswer("s/stat-1", True, 30)
    assert is_correct(counter, Answer(ret=28), key)  # within 10 % of what the kernel showed
    assert is_correct(counter, Answer(ret=3), key)  # the rule's bound: another run may well show 3
    assert not is_correct(counter, Answer(ret=2), key)  # below the bound
    assert not is_correct(counter, Answer(ret=61), key)  # more than twice the kernel's figure
    assert not is_correct(exact, Answer(ret=29), key) and is_correct(exact, Answer(ret=30), key)
