"""The predictions sheet: questions from the lab, never the answers; a filled-in sheet read strictly."""

from __future__ import annotations

import pytest
import yaml

from harness.course.sheet import questions, read_sheet, render_sheet, write_sheet
from harness.course.workspace import CourseError, Workspace, check_student
from harness.scenario.check import LabSpec, known_labs


def test_a_sheet_asks_every_graded_step_and_every_asked_statistic(mini_lab):
    asked = questions(mini_lab)
    assert [q.id for q in asked] == ["queue/bind", "queue/listen", "queue/second-bind", "queue/rcvbuf",
                                     "queue/step-9", "queue/step-11", "queue/step-13", "queue/stat-1", "queue/stat-2"]
    assert asked[2].text.startswith("step 6, server: bind($m, 0.0.0.0:7000)")
    assert asked[7].text == "At snapshot `full`: the Recv-Q of the listener on port 7000"


def test_the_blank_sheet_holds_no_answer(mini_lab):
    text = render_sheet(mini_lab, "alice")
    sheet = yaml.safe_load(text)
    assert sheet["lab"] == "90-mini" and sheet["student"] == "alice"
    assert all(entry["answer"] is None for entry in sheet["predictions"])
    entries = "\n".join(line for line in text.splitlines() if not line.startswith("#"))
    for answer in ("EADDRINUSE", "EINPROGRESS", "131072", "backlog + 1"):
        assert answer not in entries


@pytest.mark.parametrize("name", known_labs())
def test_every_course_lab_has_a_sheet_without_its_answers(name):
    spec = LabSpec.load(name)
    asked = questions(spec)
    assert asked and len({q.id for q in asked}) == len(asked)
    assert any(q.kind == "stat" for q in asked), f"{name}: the sheet asks no statistic"
    text = render_sheet(spec, "alice")
    for assertion in (q.assertion for q in asked if q.kind == "stat"):
        assert assertion.name not in text  # an assertion's name says what holds; the question does not


def test_an_existing_sheet_is_kept_unless_forced(mini_lab, tmp_path):
    path = tmp_path / "alice" / "90" / "predictions.yaml"
    assert write_sheet(mini_lab, "alice", path)
    path.write_text(path.read_text().replace("answer:", "answer: 0", 1))
    assert not write_sheet(mini_lab, "alice", path)
    assert "answer: 0" in path.read_text()
    assert write_sheet(mini_lab, "alice", path, force=True)
    assert "answer: 0" not in path.read_text()


def _filled(mini_lab, tmp_path, answers: dict[str, str]):
    path = tmp_path / "predictions.yaml"
    lines = []
    for line in render_sheet(mini_lab, "alice").splitlines():
        if line.startswith("  - id: "):
            current = line.split(": ", 1)[1]
        if line == "    answer:" and current in answers:
            line = f"    answer: {answers[current]}"
        lines.append(line)
    path.write_text("\n".join(lines) + "\n")
    return path


def test_answers_are_read_as_values_errnos_or_blocks(mini_lab, tmp_path):
    path = _filled(mini_lab, tmp_path, {"queue/bind": "0", "queue/second-bind": "-1 EADDRINUSE",
                                        "queue/step-9": "EINPROGRESS", "queue/listen": "blocks",
                                        "queue/stat-1": "2"})
    got = {p.question.id: p.answer for p in read_sheet(mini_lab, path)}
    assert got["queue/bind"].ret == 0 and got["queue/second-bind"].errno == "EADDRINUSE"
    assert got["queue/step-9"].errno == "EINPROGRESS" and got["queue/listen"].blocked
    assert got["queue/stat-1"].ret == 2 and got["queue/rcvbuf"] is None


@pytest.mark.parametrize("answers,message", [
    ({"queue/bind": "maybe"}, "'maybe' is not a value, an errno name (EINVAL) or `blocks`"),
    ({"queue/bind": "EWHATEVER"}, "'EWHATEVER' is not an errno name"),
    ({"queue/stat-1": "two"}, "'two' is not a number"),
])
def test_a_malformed_answer_names_file_and_line(mini_lab, tmp_path, answers, message):
    path = _filled(mini_lab, tmp_path, answers)
    line = next(n for n, text in enumerate(path.read_text().splitlines(), start=1)
                if text == f"  - id: {next(iter(answers))}")
    with pytest.raises(CourseError) as caught:
        read_sheet(mini_lab, path)
    assert str(caught.value).startswith(f"{path}:{line}: ")
    assert message in str(caught.value)


def test_an_unknown_step_names_file_and_line(mini_lab, tmp_path):
    path = tmp_path / "predictions.yaml"
    path.write_text("lab: 90-mini\npredictions:\n  - id: queue/bind\n    answer: 0\n  - id: queue/nope\n    answer: 0\n")
    with pytest.raises(CourseError, match=rf"^{path}:5: unknown step or statistic 'queue/nope'"):
        read_sheet(mini_lab, path)


def test_a_missing_sheet_says_how_to_make_one(mini_lab, tmp_path):
    with pytest.raises(CourseError, match=r"no predictions sheet; `invoke lab.predict 90-mini --student"):
        read_sheet(mini_lab, tmp_path / "alice" / "90" / "predictions.yaml")


def test_malformed_yaml_names_its_line(mini_lab, tmp_path):
    path = tmp_path / "predictions.yaml"
    path.write_text("lab: 90-mini\npredictions:\n  - id: [unclosed\n")
    with pytest.raises(CourseError, match=rf"^{path}:\d+: malformed YAML"):
        read_sheet(mini_lab, path)


@pytest.mark.parametrize("name", ["../bob", "a/b", "..", "", ".hidden", "x" * 70, "al ice"])
def test_a_student_name_must_be_a_plain_directory_name(name):
    with pytest.raises(CourseError):
        check_student(name)


def test_the_workspace_lists_its_students(tmp_path):
    (tmp_path / "bob" / "01").mkdir(parents=True)
    (tmp_path / "alice").mkdir()
    (tmp_path / "notes.txt").write_text("")
    assert Workspace(tmp_path).students() == ["alice", "bob"]
    assert Workspace(tmp_path).lab_dir("alice", "03-listen") == tmp_path / "alice" / "03"
