"""The assertion language of expectation templates, evaluated over a recorded run."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.scenario import expect
from harness.scenario.compare import Outcome
from harness.scenario.format import ScenarioError, Step
from harness.scenario.runner import RunResult, StepRecord


class Stats:
    """Stands in for a harness.stats Snapshot: listener queues and counters."""

    def __init__(self, recv_q: int, overflows: int) -> None:
        self.recv_q, self.overflows = recv_q, overflows

    def listener(self, port):
        return type("Listener", (), {"recv_q": self.recv_q, "send_q": 2})()

    def counter(self, name):
        return {"TcpExt.ListenOverflows": self.overflows}[name]

    def __sub__(self, other):
        return Stats(self.recv_q - other.recv_q, self.overflows - other.overflows)


def recorded_run() -> RunResult:
    scenario = type("S", (), {"name": "t", "description": "", "steps": ()})()
    zerocopy = Step(2, 9, "call", host="client", call="recvmsg", label="errqueue")
    records = [
        StepRecord(Step(1, 8, "call", host="server", call="accept4", label="first"), Outcome(5), Outcome(4)),
        StepRecord(zerocopy, Outcome([{"origin": 5, "code": 0, "lo": 0, "hi": 3}]), Outcome([])),
    ]
    result = RunResult(scenario, records)
    result.kernel_snapshots = {"before": {"server": Stats(0, 1)}, "full": {"server": Stats(3, 5)}}
    return result


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "expected.yaml.j2"
    path.write_text(text)
    return path


def outcomes(tmp_path, text, **params):
    result = recorded_run()
    assertions = expect.load(write(tmp_path, text), params)
    return expect.evaluate(assertions, expect.context(result, params, {}))


def test_comparisons_over_snapshots_deltas_and_trace(tmp_path):
    text = """
- {name: queue, value: full.server.listener(port).recv_q, equals: {{ backlog + 1 }}}
- {name: overflows, value: 'delta("before", "full").server.counter("TcpExt.ListenOverflows")', at_least: 3}
- {name: timing, value: 'delta("before", "full").server.counter("TcpExt.ListenOverflows")', between: [2, 6]}
- {name: accepted, value: trace.step("first").kernel.errno, equals: null}
- {name: zerocopy, value: trace.zerocopy_codes("client"), equals: [0]}
- {name: not, value: full.server.listener(port).send_q, not_equals: 3}
- {name: set, value: full.server.listener(port).send_q, one_of: [1, 2]}
- {name: most, value: full.server.listener(port).send_q, at_most: 2}
"""
    results = outcomes(tmp_path, text, port=7000, backlog=2)
    assert [(o.assertion.name, o.ok) for o in results] == [
        ("queue", True), ("overflows", True), ("timing", True), ("accepted", True), ("zerocopy", True),
        ("not", True), ("set", True), ("most", True)]


def test_a_failing_assertion_keeps_the_value_seen(tmp_path):
    [outcome] = outcomes(tmp_path, "- {name: q, value: full.server.listener(7000).recv_q, equals: 4}\n")
    assert not outcome.ok and outcome.value == 3 and outcome.assertion.describe() == "== 4"


def test_an_expression_that_cannot_be_computed_fails_with_why(tmp_path):
    [outcome] = outcomes(tmp_path, "- {name: q, value: later.server.listener(7000).recv_q, equals: 4}\n")
    assert not outcome.ok and "later" in outcome.error


def test_sandbox_blocks_python_internals(tmp_path):
    [outcome] = outcomes(tmp_path, "- {name: x, value: \"''.__class__.__mro__\", equals: 1}\n")
    assert not outcome.ok and outcome.value is None


def test_template_cannot_reach_internals_either(tmp_path):
    with pytest.raises(ScenarioError):
        expect.load(write(tmp_path, "- {name: x, value: a, equals: {{ ''.__class__.__mro__[1].__subclasses__() }}}\n"), {})


@pytest.mark.parametrize("text,message", [
    ("- {name: x, value: a}\n", "exactly one of"),
    ("- {name: x, value: a, equals: 1, at_least: 0}\n", "exactly one of"),
    ("- {name: x, value: a, between: 3}\n", r"`between:` takes \[low, high\]"),
    ("- {name: x, value: a, one_of: 3}\n", "`one_of:` takes a list"),
    ("- {name: x, value: 'a ==', equals: 1}\n", "value 'a =='"),
    ("- {name: x, value: a, equals: 1, colour: red}\n", "unknown key"),
    ("name: x\n", "a list of assertions"),
    ("- {name: x, value: a, equals: {{ nope }}}\n", "'nope' is undefined"),
])
def test_bad_templates_name_file_and_line(tmp_path, text, message):
    with pytest.raises(ScenarioError, match=message):
        expect.load(write(tmp_path, text), {})
