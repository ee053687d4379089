"""lab.predict and lab.check --student as a user meets them: files where promised, bad input as one line."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml

from tests import forkinvoke


def invoke(*args: str, home, workspace) -> subprocess.CompletedProcess:
    """`invoke ARGS` from the checkout, forked from a pre-imported server (tests/forkinvoke.py).

    Reports go beside the home, not into the checkout's results/ (lab.model writes one per run).
    """
    env = dict(os.environ, SOCKLAB_HOME=str(home), SOCKLAB_WORKSPACE=str(workspace), COLUMNS="250",
               SOCKLAB_RESULTS=str(Path(home).parent / "results"))
    return forkinvoke.invoke(list(args), env)


def test_predict_writes_a_sheet_and_an_answers_file(tmp_path):
    result = invoke("lab.predict", "03", "--student", "alice", home=tmp_path / "home", workspace=tmp_path / "work")
    assert result.returncode == 0, result.stderr
    sheet = tmp_path / "work" / "alice" / "03" / "predictions.yaml"
    assert result.stdout.strip() == str(sheet)
    data = yaml.safe_load(sheet.read_text())
    assert data["lab"] == "03-listen" and all(e["answer"] is None for e in data["predictions"])
    answers = (tmp_path / "work" / "alice" / "03" / "answers.md").read_text()
    assert answers.count("\n## Q") == 6
    assert "own scenario" in result.stderr


@pytest.mark.parametrize("student", ["../alice", "a/b", ".."])
def test_a_student_name_with_a_path_in_it_is_refused(tmp_path, student):
    for task in (["lab.predict", "01"], ["lab.check", "01"]):
        result = invoke(*task, "--student", student, home=tmp_path / "home", workspace=tmp_path / "work")
        assert result.returncode == 2
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("socklab: --student")
    assert not (tmp_path / "work").exists() and not (tmp_path / "home").exists()


def _sheet(tmp_path, edit):
    invoke("lab.predict", "01", "--student", "bob", home=tmp_path / "home", workspace=tmp_path / "work")
    path = tmp_path / "work" / "bob" / "01" / "predictions.yaml"
    path.write_text(edit(path.read_text()))
    return path


@pytest.mark.parametrize("edit,message", [
    (lambda text: text.replace("    answer:", "    answer: sometimes", 1), "is not a value, an errno name"),
    (lambda text: text.replace("id: sockets-are-files/getfl-plain", "id: sockets-are-files/nope", 1),
     "unknown step or statistic 'sockets-are-files/nope'"),
])
def test_a_bad_sheet_stops_the_check_before_any_vm(tmp_path, edit, message):
    path = _sheet(tmp_path, edit)
    before = path.read_text()
    result = invoke("lab.check", "01", "--student", "bob", home=tmp_path / "home", workspace=tmp_path / "work")
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"socklab: {path}:") and message in lines[0]
    assert path.read_text() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["answers.md", "predictions.yaml"]
    assert not (tmp_path / "home" / "run").exists()  # no lab was booted


def test_a_bad_sheet_stops_the_class_grade_with_its_file_and_line(tmp_path):
    """lab.grade over a class where one sheet is broken: one line naming that sheet's line, exit 2, no lab used."""
    invoke("lab.predict", "01", "--student", "alice", home=tmp_path / "home", workspace=tmp_path / "work")
    path = _sheet(tmp_path, lambda text: text.replace("    answer:", "    answer: {errno: EWHAT}", 1))
    line = path.read_text().splitlines().index("  - id: sockets-are-files/getfl-plain") + 1
    before = {p: p.read_bytes() for p in (tmp_path / "work").rglob("*") if p.is_file()}
    result = invoke("lab.grade", home=tmp_path / "home", workspace=tmp_path / "work")
    assert result.returncode == 2, result.stderr
    assert [text for text in result.stderr.splitlines() if text.strip()] == [
        f"socklab: {path}:{line}: sockets-are-files/getfl-plain: 'EWHAT' is not an errno name (e.g. EADDRINUSE, EINVAL)"]
    assert result.stdout == ""
    assert {p: p.read_bytes() for p in (tmp_path / "work").rglob("*") if p.is_file()} == before
    assert not (tmp_path / "home" / "run").exists() and not (tmp_path / "home" / "results").exists()


def test_a_missing_sheet_stops_the_check(tmp_path):
    result = invoke("lab.check", "02", "--student", "carol", home=tmp_path / "home", workspace=tmp_path / "work")
    assert result.returncode == 2
    assert result.stderr.strip().startswith(f"socklab: {tmp_path / 'work' / 'carol' / '02' / 'predictions.yaml'}: no predictions sheet")
    assert not (tmp_path / "work").exists()


def test_the_model_is_blind_unless_revealed(tmp_path):
    scenario = "labs/01-sockets-are-files/files.yaml"
    blind = invoke("lab.model", scenario, home=tmp_path / "home", workspace=tmp_path / "work")
    shown = invoke("lab.model", scenario, "--reveal", "--explain", home=tmp_path / "home", workspace=tmp_path / "work")
    assert blind.returncode == 0 and shown.returncode == 0
    assert "EAFNOSUPPORT" not in blind.stderr + blind.stdout and "--reveal" in blind.stderr + blind.stdout
    assert "EAFNOSUPPORT" in shown.stderr + shown.stdout and "__sock_create" in shown.stderr + shown.stdout
