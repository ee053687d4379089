"""Own-scenario exercises: a goal checked on the kernel's and the model's results."""

from __future__ import annotations

import pytest

from harness.course.exercise import Exercise, judge
from harness.scenario.check import run_scenario
from harness.scenario.format import ScenarioError, load

from .conftest import FakeLab

REUSE = """\
name: own
hosts: [server]
params: {}
---
steps:
  - {on: server, call: socket, args: {family: AF_INET, type: SOCK_STREAM}, as: a}
  - {on: server, call: setsockopt, args: {fd: $a, level: SOL_SOCKET, optname: SO_REUSEADDR, value: 1}}
  - {on: server, call: bind, args: {fd: $a, addr: [0.0.0.0, 7400]}}
  - {on: server, call: listen, args: {fd: $a, backlog: 1}}
  - {on: server, call: socket, args: {family: AF_INET, type: SOCK_STREAM}, as: b}
  - {on: server, call: setsockopt, args: {fd: $b, level: SOL_SOCKET, optname: SO_REUSEADDR, value: 1}}
  - {on: server, call: bind, args: {fd: $b, addr: [0.0.0.0, 7400]}}
"""


def _run(tmp_path, text, lab=None):
    path = tmp_path / "own.yaml"
    path.write_text(text)
    scenario = load(path, known_hosts=("client", "server"))
    return scenario, run_scenario(scenario, lab)


def test_a_scenario_that_reaches_the_goal_passes_on_kernel_and_model(mini_lab, tmp_path):
    exercise = Exercise.parse(mini_lab.exercise, "lab.yaml")
    scenario, result = _run(tmp_path, REUSE, FakeLab())
    verdict = judge(exercise, scenario, result, kernel=True)
    assert verdict.passed, verdict.detail


def test_setting_the_option_twice_on_one_socket_is_not_both_sockets(mini_lab, tmp_path):
    exercise = Exercise.parse(mini_lab.exercise, "lab.yaml")
    text = REUSE.replace("fd: $b, level", "fd: $a, level")
    scenario, result = _run(tmp_path, text, FakeLab())
    verdict = judge(exercise, scenario, result, kernel=True)
    assert not verdict.passed and "goal 1 not met" in verdict.detail


def test_a_goal_the_kernel_misses_fails_even_when_the_model_meets_it(mini_lab, tmp_path):
    exercise = Exercise.parse(mini_lab.exercise, "lab.yaml")
    # the 7th call is the second bind: this "kernel" lets it through
    scenario, result = _run(tmp_path, REUSE, FakeLab(differs={7: "EINVAL"}))
    verdict = judge(exercise, scenario, result, kernel=True)
    assert not verdict.passed and "on the kernel" in verdict.detail and "on the model" not in verdict.detail


@pytest.mark.parametrize("raw", [{"task": "x"}, {"task": "x", "goal": [{"call": "frobnicate"}]},
                                 {"task": "x", "goal": [{"call": "bind", "fd_in": 0}]}])
def test_a_malformed_exercise_is_an_error(raw):
    with pytest.raises(ScenarioError):
        Exercise.parse(raw, "lab.yaml")


def test_every_course_lab_has_an_exercise():
    from harness.scenario.check import LabSpec, known_labs

    for name in known_labs():
        spec = LabSpec.load(name)
        assert Exercise.parse(spec.exercise, name) is not None, name


@pytest.mark.parametrize("number", [f"{n:02d}" for n in range(1, 10)])
def test_every_course_exercise_can_be_met_on_the_model(number):
    """tests/fixtures/course/own-NN.yaml is one solution; the goal must hold on the model for it."""
    from harness.paths import REPO_ROOT
    from harness.scenario.check import LabSpec

    spec = LabSpec.load(number)
    exercise = Exercise.parse(spec.exercise, spec.name)
    scenario = load(REPO_ROOT / "tests" / "fixtures" / "course" / f"own-{number}.yaml", known_hosts=("client", "server"))
    verdict = judge(exercise, scenario, run_scenario(scenario, None), kernel=False)
    assert verdict.passed, verdict.detail
