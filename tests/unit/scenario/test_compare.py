"""Judging a step: kernel vs model under each compare mode, and against `expect:`."""

from __future__ import annotations

import pytest

from harness.scenario.compare import Outcome, agree, judge
from harness.scenario.format import Expect, Step


def step(call="bind", compare="exact", expect=None) -> Step:
    return Step(1, 1, "call", host="server", call=call, compare=compare, expect=expect)


def test_same_result_agrees():
    assert agree(step(), Outcome(0), Outcome(0)) == (True, "")


def test_different_errno_disagrees_and_says_both():
    same, note = agree(step(), Outcome(-1, "EADDRINUSE"), Outcome(0))
    assert not same and note == "kernel -1 EADDRINUSE, model 0"


def test_descriptor_numbers_are_not_compared():
    assert agree(step("socket"), Outcome(7), Outcome(3))[0]


def test_estimates_are_not_compared_exactly():
    assert agree(step("send"), Outcome(65536), Outcome(43690, approx=True))[0]


def test_ephemeral_ports_compare_by_range():
    same, note = agree(step("getsockname"), Outcome(("0.0.0.0", 41001)), Outcome(["0.0.0.0", 33333]))
    assert same and "range" in note
    assert not agree(step("getsockname"), Outcome(["0.0.0.0", 80]), Outcome(["0.0.0.0", 33333]))[0]


def test_json_lists_equal_python_tuples():
    assert agree(step("getpeername"), Outcome(["198.51.100.1", 7000]), Outcome(("198.51.100.1", 7000)))[0]


def test_blocking_must_match():
    assert not agree(step("accept"), Outcome(None, blocked=True), Outcome(4))[0]
    assert agree(step("accept"), Outcome(None, blocked=True), Outcome(None, blocked=True))[0]


@pytest.mark.parametrize("mode,kernel,model,same", [
    ("errno", Outcome(5), Outcome(9), True),
    ("errno", Outcome(-1, "EAGAIN"), Outcome(9), False),
    ("ok", Outcome(100), Outcome(200), True),
    ("none", Outcome(-1, "EPERM"), Outcome(0), True),
])
def test_compare_modes(mode, kernel, model, same):
    assert agree(step("send", compare=mode), kernel, model)[0] is same


def test_expectation_checks_both_sides():
    verdict = judge(step(expect=Expect(errno="EADDRINUSE")), Outcome(-1, "EADDRINUSE"), Outcome(0))
    assert not verdict.ok
    assert verdict.problems == ("kernel and model differ: kernel -1 EADDRINUSE, model 0",
                                "model gave 0, expected -1 EADDRINUSE")


def test_model_only_run_is_judged_against_expect():
    assert judge(step(expect=Expect(ret=0)), None, Outcome(0)).ok
    assert not judge(step(expect=Expect(ret=0)), None, Outcome(-1, "EINVAL")).ok
