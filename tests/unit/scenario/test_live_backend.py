"""The lab side of a run: which guest agents a scenario starts, in what order, and how their failure reads."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest

from harness.guest.client import AgentPushError, AgentReply, AgentRequestError
from harness.scenario import live
from harness.scenario.check import run_scenario
from harness.scenario.format import load

SCENARIO = """\
name: two-vms
hosts: [server, client]
params: {}
---
sysctls:
  client: {net.core.somaxconn: 64}
steps:
  - {on: server, call: socket, args: {family: AF_INET, type: SOCK_STREAM}, as: l, user: student}
  - {on: server, call: socket, args: {family: AF_INET, type: SOCK_STREAM}, as: m}
  - {on: client, call: socket, args: {family: AF_INET, type: SOCK_STREAM}, as: c, user: student}
  - sleep: 0.01
  - {on: server, call: socket, args: {family: AF_INET, type: SOCK_STREAM}, user: student}
"""


class FakeLab:
    def __init__(self) -> None:
        self.vms = [SimpleNamespace(name="server", kernel=""), SimpleNamespace(name="client", kernel="")]

    def require(self):
        return SimpleNamespace(vms=self.vms, segment="tap")

    def ssh(self, host, timeout=None):
        return SimpleNamespace(vm=host)

    def vm_fault(self, host):
        return None


class FakeAgent:
    """Records each start (VM, user, thread, when); ``fail`` makes the named (VM, user) refuse to start."""

    starts: list[tuple[str, str, int, float]] = []
    fail: tuple[str, str] | None = None
    both_vms = threading.Barrier(2, timeout=5)

    made: list["FakeAgent"] = []
    refuse_reset = False

    def __init__(self, ssh, host, user, **options) -> None:
        self.host, self.user = self.vm, _ = host, user
        self.hello = {"pid": 100}
        self.running = True
        self.requests: list[str] = []
        FakeAgent.made.append(self)

    def start(self):
        if (self.host, self.user) == FakeAgent.fail:
            raise AgentPushError(f"{self.host}: cannot copy the agent to /run/socklab/agent/agent_x.py: no space")
        if not FakeAgent.starts or all(start[1] != "root" for start in FakeAgent.starts if start[0] == self.host):
            if self.user == "root":
                FakeAgent.both_vms.wait()  # both VMs' first agents start at once, or this times out
        FakeAgent.starts.append((self.host, self.user, threading.get_ident(), time.monotonic()))
        return self

    def request(self, op, args=None, *, timeout=None, check=True):
        self.requests.append(op)
        return AgentReply(id=1, op=op, ret=3, errno=None, t_ns=0, dt_ns=0)

    def reset(self, keep_tracing=False):
        """As Agent.reset: one request; a refusal raises (Agent.call checks the reply)."""
        self.requests.append("reset")
        assert keep_tracing  # between a check's scenarios the tracer stays armed
        if FakeAgent.refuse_reset:
            raise AgentRequestError(f"{self.host}: the agent refused reset: reset: busy")
        return AgentReply(id=1, op="reset", ret=0, errno=None, t_ns=0, dt_ns=0, extra={"closed": [3]})

    def close(self):
        self.requests.append("close")
        self.running = False


@pytest.fixture
def scenario(tmp_path):
    path = tmp_path / "two-vms.yaml"
    path.write_text(SCENARIO)
    return load(path)


@pytest.fixture(autouse=True)
def fake_agents(monkeypatch):
    FakeAgent.starts, FakeAgent.fail, FakeAgent.made, FakeAgent.refuse_reset = [], None, [], False
    FakeAgent.both_vms = threading.Barrier(2, timeout=5)
    monkeypatch.setattr(live, "Agent", FakeAgent)


def test_every_agent_starts_before_the_first_step_root_first_one_thread_per_vm(scenario):
    backend = live.LabBackend(FakeLab(), scenario)
    backend.start_agents()
    by_vm = {host: [(user, thread) for vm, user, thread, _ in FakeAgent.starts if vm == host]
             for host in ("server", "client")}
    # The server needs root (a step) and student; the client root (its sysctl) and student.
    assert [user for user, _ in by_vm["server"]] == ["root", "student"]
    assert [user for user, _ in by_vm["client"]] == ["root", "student"]
    assert len({thread for _, thread in by_vm["server"]}) == 1
    assert {thread for _, thread in by_vm["server"]}.isdisjoint({thread for _, thread in by_vm["client"]})
    assert threading.get_ident() not in {start[2] for start in FakeAgent.starts}
    started = len(FakeAgent.starts)
    backend.agent("server", "student")
    backend.agent("client", "root")
    assert len(FakeAgent.starts) == started  # the steps use the agents started here


def test_a_traced_vm_gets_its_root_agent_even_if_no_step_runs_as_root(tmp_path):
    path = tmp_path / "traced.yaml"
    path.write_text("name: traced\nhosts: [server, client]\nparams: {}\n---\nsteps:\n"
                    "  - {on: server, call: socket, args: {family: AF_INET, type: SOCK_STREAM}, user: student}\n"
                    "  - {on: client, call: socket, args: {family: AF_INET, type: SOCK_STREAM}}\n")
    backend = live.LabBackend(FakeLab(), load(path))
    backend.start_agents(["server"])
    assert [(vm, user) for vm, user, _, _ in FakeAgent.starts if vm == "server"] == [("server", "root"),
                                                                                    ("server", "student")]


def test_an_agent_that_cannot_start_aborts_the_run_before_any_step(scenario):
    FakeAgent.fail = ("client", "student")
    FakeAgent.both_vms = threading.Barrier(1)
    lab = FakeLab()
    result = run_scenario(scenario, lab)
    assert result.error.startswith("starting the guest agents: client: cannot copy the agent")
    assert "no space" in result.error
    assert result.records == []


def test_scenarios_that_share_agents_start_each_once_reset_between_and_close_at_the_end(scenario):
    """A lab check's scenarios: one start per (VM, user), a reset after each scenario, one close after the last."""
    FakeAgent.both_vms = threading.Barrier(1)
    lab, agents = FakeLab(), {}
    first = run_scenario(scenario, lab, agents=agents)
    second = run_scenario(scenario, lab, agents=agents)
    assert first.error is None and second.error is None
    assert len(FakeAgent.made) == 4 and set(agents) == {("server", "root"), ("server", "student"),
                                                        ("client", "root"), ("client", "student")}
    for agent in FakeAgent.made:
        assert agent.requests.count("reset") == 2 and "close" not in agent.requests
    live.close_agents(agents)
    assert agents == {} and all(agent.requests[-1] == "close" for agent in FakeAgent.made)
    assert len(FakeAgent.made) == 4


def test_a_shared_agent_that_died_is_started_again_and_one_that_cannot_reset_is_dropped(scenario):
    FakeAgent.both_vms = threading.Barrier(1)
    lab, agents = FakeLab(), {}
    run_scenario(scenario, lab, agents=agents)
    agents[("server", "student")].running = False  # killed between two scenarios
    FakeAgent.refuse_reset = True
    result = run_scenario(scenario, lab, agents=agents)
    assert len(FakeAgent.made) == 5  # only the dead one again
    assert any("resetting agents failed" in note and "reset: busy" in note for note in result.diagnosis)
    assert agents == {}  # none could reset: all ended, the next scenario starts afresh
    assert all(agent.requests[-1] == "close" for agent in FakeAgent.made)


def test_after_a_fault_the_shared_agents_are_ended_not_reset(scenario, monkeypatch):
    """An agent that timed out may still owe a reply: the next scenario must not read it as its own."""
    from harness.guest.client import AgentTimeout

    FakeAgent.both_vms = threading.Barrier(1)
    lab, agents = FakeLab(), {}
    lab.ssh = lambda host, timeout=None: SimpleNamespace(vm=host, run=lambda *a, **k: SimpleNamespace(stdout=""))
    original = FakeAgent.request

    def slow(self, op, args=None, **options):
        if self.host == "client" and op == "socket":
            raise AgentTimeout("client: the agent (student) did not answer socket(...) within 10 s")
        return original(self, op, args, **options)

    monkeypatch.setattr(FakeAgent, "request", slow)
    result = run_scenario(scenario, lab, agents=agents)
    assert "did not answer" in result.error
    assert agents == {} and all(agent.requests[-1] == "close" for agent in FakeAgent.made)
    assert not any("reset" in agent.requests for agent in FakeAgent.made)
