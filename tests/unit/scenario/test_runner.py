"""Running steps on two sides: a recorded kernel trace replayed against the real model."""

from __future__ import annotations

import textwrap

import pytest

from harness.errors import LabError
from harness.scenario.compare import Outcome
from harness.scenario.format import load
from harness.scenario.runner import ModelBackend, RunAborted, run

SCENARIO = """\
name: replay
hosts: [server, client]
params: {}
---
steps:
  - {on: server, call: socket, args: {family: AF_INET, type: SOCK_STREAM}, as: l}
  - {on: server, call: bind, args: {fd: $l, addr: [0.0.0.0, 7000]}, expect: 0}
  - {on: server, call: socket, args: {family: AF_INET, type: SOCK_STREAM}, as: m}
  - {on: server, call: bind, args: {fd: $m, addr: [0.0.0.0, 7000]}, expect: EADDRINUSE}
  - {on: server, call: listen, args: {fd: $l, backlog: 2}}
  - {on: server, call: poll, args: {fds: [$l], events: POLLIN}}
  - snapshot: ready
"""


class Replay:
    """A kernel side that answers from a recorded trace (what the guest agent returned on 6.1)."""

    def __init__(self, outcomes) -> None:
        self.outcomes = list(outcomes)
        self.calls = []

    def call(self, host, user, op, args):
        self.calls.append((host, op, args))
        answer = self.outcomes.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    def sleep(self, seconds):
        pass

    def snapshot(self, name):
        return {"server": "stats"}

    def close(self):
        pass


@pytest.fixture
def scenario(tmp_path):
    path = tmp_path / "replay.yaml"
    path.write_text(textwrap.dedent(SCENARIO))
    return load(path)


RECORDED = [Outcome(4), Outcome(0), Outcome(5), Outcome(-1, "EADDRINUSE"), Outcome(0), Outcome({"4": 0})]


def test_recorded_kernel_trace_agrees_with_the_model(scenario):
    kernel = Replay(RECORDED)
    result = run(scenario, kernel, ModelBackend(scenario))
    assert result.ok, [r.verdict for r in result.records]
    # The kernel side got its own descriptors for $l and $m, not the model's.
    assert kernel.calls[1][2]["fd"] == 4 and kernel.calls[3][2]["fd"] == 5
    # poll answers are keyed by socket name on both sides, so they compare.
    assert result.records[5].kernel.ret == {"$l": 0} and result.records[5].model.ret == {"$l": 0}
    assert result.kernel_snapshots["ready"] == {"server": "stats"}


def test_a_disagreement_is_reported_with_the_model_s_reason(scenario):
    wrong = RECORDED[:3] + [Outcome(0)] + RECORDED[4:]
    result = run(scenario, Replay(wrong), ModelBackend(scenario))
    bad = [r for r in result.records if r.verdict and not r.verdict.ok]
    assert [r.step.index for r in bad] == [4]
    assert "kernel and model differ: kernel 0, model -1 EADDRINUSE" in bad[0].verdict.problems
    assert bad[0].model.kernel_fn  # the model says which kernel function decided
    assert not result.ok


def test_a_failed_socket_leaves_its_name_unset_on_that_side(scenario):
    failing = [Outcome(-1, "EMFILE"), Outcome(-1, "EBADF")] + RECORDED[2:]
    kernel = Replay(failing)
    run(scenario, kernel, ModelBackend(scenario))
    assert kernel.calls[1][2]["fd"] == -1


def test_a_dying_guest_aborts_with_the_step(scenario):
    kernel = Replay([Outcome(4), LabError("agent on server died: Killed")])
    with pytest.raises(RunAborted, match=r"step 2 \(server: bind\(\$l, 0.0.0.0:7000\)\): agent on server died") as error:
        run(scenario, kernel, ModelBackend(scenario))
    assert len(error.value.result.records) == 2 and error.value.result.error


def test_model_only_run(scenario):
    result = run(scenario, None, ModelBackend(scenario))
    assert result.ok and all(r.kernel is None for r in result.records)


def test_poll_names_come_from_the_polling_host_only(tmp_path):
    """Both hosts' first socket is fd 3; a poll on the server must name the server's socket."""
    path = tmp_path / "two.yaml"
    path.write_text(textwrap.dedent("""\
        name: two
        hosts: [server, client]
        ---
        steps:
          - {on: client, call: socket, args: {family: AF_INET, type: SOCK_DGRAM}, as: theirs}
          - {on: server, call: socket, args: {family: AF_INET, type: SOCK_DGRAM}, as: mine}
          - {on: server, call: poll, args: {fds: [$mine], events: POLLOUT}}
        """))
    scenario = load(path)
    result = run(scenario, Replay([Outcome(3), Outcome(3), Outcome({"3": 4})]), ModelBackend(scenario))
    assert result.records[2].kernel.ret == {"$mine": 4}
    assert result.records[2].model.ret == {"$mine": 4}


def test_a_whole_run_trace_leaves_loops_and_agent_work_untraced():
    """--trace judges one syscall's graph: a loop step is many calls, and the herd runs in waiter threads."""
    from harness.scenario.format import Step as ScenarioStep
    from harness.scenario.runner import traced_options

    everything = object()
    one = ScenarioStep(index=1, line=1, kind="call", host="server", call="recv", args={"fd": 3})
    loop = ScenarioStep(index=2, line=2, kind="call", host="server", call="recv", args={"fd": 3}, until="EAGAIN")
    herd = ScenarioStep(index=3, line=3, kind="call", host="server", call="epoll_herd_wakeups", args={"fd": 3})
    assert traced_options(one, everything) is everything
    assert traced_options(loop, everything) is None
    assert traced_options(herd, everything) is None
    assert traced_options(one, None) is None


def test_a_step_by_step_run_settles_eventually_steps_toward_the_model_s_answer(tmp_path):
    """compare: eventually in a step-by-step run: the model first, then the kernel side is given its answer."""
    path = tmp_path / "settle.yaml"
    path.write_text(textwrap.dedent("""\
        name: settle
        hosts: [server]
        ---
        steps:
          - {on: server, call: socket, args: {family: AF_INET, type: SOCK_DGRAM}, as: u}
          - {on: server, call: sendto, args: {fd: $u, length: 1, addr: [127.0.0.1, 9]}, until: EAGAIN, max: 3, compare: eventually}
          - {on: server, call: getsockname, args: {fd: $u}, compare: eventually}
        """))
    scenario = load(path)

    class Settling(Replay):
        settled: list = []

        def call_settled(self, step, args, model):
            self.settled.append((step.call, step.until, model.ret))
            return self.outcomes.pop(0)

    kernel = Settling([Outcome(ret=3), Outcome(ret={"calls": 3, "total": 3, "stopped": "max"}),
                       Outcome(ret=["0.0.0.0", 40000])])
    result = run(scenario, kernel, ModelBackend(scenario))
    assert [op for op, _, _ in kernel.settled] == ["sendto", "getsockname"]
    assert kernel.settled[0][1] == "EAGAIN" and kernel.settled[0][2]["stopped"] == "max"
    assert [op for _, op, _ in kernel.calls] == ["socket"]  # plain steps still go through call()
    assert result.records[1].verdict.ok
