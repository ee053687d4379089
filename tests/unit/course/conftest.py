"""A small lab of our own and a kernel side that stands in for the guests (the process boundary)."""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, replace
from typing import Any

import pytest

from harness.scenario.check import LabSpec
from harness.scenario.expect import default_sysctls
from harness.scenario.runner import ModelBackend

LAB_YAML = """\
title: "A small lab for the course tests"
topology: default
minutes: 10
article: "§4.2 listen"
scenarios: [queue.yaml]
expected: expected.yaml.j2
exercise:
  task: "bind() fails with EADDRINUSE although both sockets set SO_REUSEADDR"
  goal:
    - {call: setsockopt, args: {optname: SO_REUSEADDR, value: 1}, ret: 0, count: 2, distinct_fd: true}
    - {call: bind, errno: EADDRINUSE, fd_in: 0}
"""

QUEUE = """\
name: queue
description: a listener with backlog 1 and three clients
hosts: [server, client]
params: {port: 7000}
---
steps:
  - snapshot: before
  - {on: server, call: socket, args: {family: AF_INET, type: SOCK_STREAM}, as: l}
  - {on: server, call: bind, args: {fd: $l, addr: [0.0.0.0, {{ port }}]}, expect: 0, label: bind}
  - {on: server, call: listen, args: {fd: $l, backlog: 1}, expect: 0, label: listen}
  - {on: server, call: socket, args: {family: AF_INET, type: SOCK_STREAM}, as: m}
  - {on: server, call: bind, args: {fd: $m, addr: [0.0.0.0, {{ port }}]}, expect: EADDRINUSE, label: second-bind}
  - {on: server, call: getsockopt, args: {fd: $l, level: SOL_SOCKET, optname: SO_RCVBUF}, expect: 131072, label: rcvbuf}
{% for i in range(3) %}
  - {on: client, call: socket, args: {family: AF_INET, type: "SOCK_STREAM|SOCK_NONBLOCK"}, as: c{{ i }}}
  - {on: client, call: connect, args: {fd: $c{{ i }}, addr: [198.51.100.2, {{ port }}]}, expect: EINPROGRESS}
{% endfor %}
  - sleep: 0.5
  - snapshot: full
"""

EXPECTED = """\
- name: the accept queue holds backlog + 1
  ask: "At snapshot `full`: the Recv-Q of the listener on port {{ port }}"
  value: full.server.listener(port).recv_q
  equals: 2
- name: Send-Q is the backlog
  ask: "At snapshot `full`: the Send-Q of the listener on port {{ port }}"
  value: full.server.listener(port).send_q
  equals: 1
- name: not asked of students
  value: full.server.listener(port).send_q
  equals: 1
"""

GUIDE = """\
# mini

## Predict, then observe

1. How many connections wait in the accept queue?
2. Why does the second bind() fail,
   and which function decides?

## Explore
"""


@pytest.fixture
def mini_lab(tmp_path) -> LabSpec:
    directory = tmp_path / "labs" / "90-mini"
    directory.mkdir(parents=True)
    (directory / "lab.yaml").write_text(LAB_YAML)
    (directory / "queue.yaml").write_text(QUEUE)
    (directory / "expected.yaml.j2").write_text(EXPECTED)
    (directory / "README.md").write_text(GUIDE)
    return LabSpec.load(str(directory))


@dataclass
class KernelStats:
    """A kernel snapshot as the expectations read it: the model's view plus the guest's sysctls."""

    stats: Any
    sysctls: Any

    def listener(self, port: int) -> Any:
        return self.stats.listener(port)

    def counter(self, name: str) -> int:
        return self.stats.counter(name)

    def __sub__(self, before: "KernelStats") -> Any:
        return self.stats - before.stats


class FakeKernel(ModelBackend):
    """The guests' side of a run: answers like the model, except where ``differs`` says otherwise.

    ``differs`` maps the n-th call of the run (from 1) to the errno the "kernel" gives
    there, so a test can tell marking against the kernel from marking against the model.
    """

    def __init__(self, scenario, differs: dict[int, str | None] | None = None) -> None:
        super().__init__(scenario)
        self.calls = 0
        self.differs = differs or {}

    def call(self, host, user, op, args):
        self.calls += 1
        outcome = super().call(host, user, op, args)
        if self.calls in self.differs:
            return replace(outcome, ret=-1, errno=self.differs[self.calls], rule="", kernel_fn="")
        return replace(outcome, rule="", kernel_fn="")

    def apply_sysctls(self) -> None:
        pass  # the model side was built with the scenario's sysctls already

    def snapshot(self, name):
        return {host: KernelStats(stats, default_sysctls()) for host, stats in super().snapshot(name).items()}


class FakeLab:
    """What the course code needs of a lab: a kernel side per scenario and the segment mode."""

    def __init__(self, differs: dict[int, str | None] | None = None) -> None:
        self.differs = differs

    def scenario_backend(self, scenario):
        return FakeKernel(scenario, self.differs)

    def require(self):
        return type("State", (), {"segment": "tap", "vms": ()})()


@pytest.fixture
def fake_lab():
    return FakeLab()


def write(path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
