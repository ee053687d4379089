"""The kernel side of a run: guest agents on the lab's VMs, and stats snapshots over SSH."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from ..agent import Agent
from ..errors import LabError
from ..stats import collect_many
from .compare import Outcome
from .format import Scenario


class LabBackend:
    """Runs steps through one agent per (VM, user), started on first use, all closed at the end.

    Closing an agent closes every socket it opened and restores the sysctls it
    set, so a scenario leaves the lab as it found it, whatever happened.
    """

    def __init__(self, lab: Any, scenario: Scenario) -> None:
        self.lab = lab
        self.scenario = scenario
        self.agents: dict[tuple[str, str], Agent] = {}
        missing = [host for host in scenario.hosts if host not in {vm.name for vm in lab.require().vms}]
        if missing:
            raise LabError(f"{scenario.path}: the running lab has no VM {', '.join(missing)}")

    def agent(self, host: str, user: str) -> Agent:
        key = (host, user)
        if key not in self.agents:
            self.agents[key] = Agent(self.lab.ssh(host), host, user).start()
        return self.agents[key]

    def apply_sysctls(self) -> None:
        for host, settings in self.scenario.sysctls.items():
            for name, value in settings.items():
                reply = self.agent(host, "root").call("sysctl_set", name=name, value=value)
                if not reply.ok:
                    raise LabError(f"{host}: cannot set {name} = {value}: {reply.errno or reply.error}")

    def call(self, host: str, user: str, op: str, args: dict[str, Any]) -> Outcome:
        reply = self.agent(host, user).call(op, **args)
        if reply.error and reply.errno is None:
            raise LabError(f"{host}: the agent refused {op}: {reply.error}")
        return Outcome(ret=reply.ret, errno=reply.errno, blocked=reply.blocked, extra=dict(reply.extra))

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    def snapshot(self, name: str) -> Mapping[str, Any]:
        return collect_many(self.lab, list(self.scenario.hosts))

    def sysctls(self) -> dict[str, Any]:
        """Each host's socket sysctls right now (for rendering expectation templates)."""
        snaps = collect_many(self.lab, list(self.scenario.hosts))
        return {host: snaps[host].sysctls for host in self.scenario.hosts}

    def close(self) -> None:
        errors = []
        for (host, user), agent in self.agents.items():
            try:
                agent.close()
            except LabError as exc:
                errors.append(f"{host}/{user}: {exc}")
        self.agents.clear()
        if errors:
            raise LabError("closing agents failed: " + "; ".join(errors))
