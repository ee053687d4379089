"""The live side of a fuzz run: one long-lived guest agent per (VM, user), reset between programs."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from harness.guest.client import Agent, AgentError
from ..errors import LabError, SSHError
from ..scenario.compare import Outcome
from .generate import Program

BLOCK_MS = 300  # a call that would block longer is reported as blocked (the model says so at once)
SSH_TIMEOUT = 10.0
# Module autoloading off for the run: an empty kernel.modprobe makes __request_module() return
# -ENOENT at once instead of running modprobe (45-180 ms under TCG) for every socket() of a family
# or protocol nobody registered (family 45, protocol 99), which __sock_create() and inet_create()
# then refuse as before: the guests' images carry no module for what the generator asks for.
# The root agent puts the old path back when it ends (restore: exit), not at each program's reset.
NO_MODPROBE = {"op": "sysctl_set", "args": {"name": "kernel.modprobe", "value": "\n", "restore": "exit"}}


class SysctlRefused(LabError):
    """The guest refused a program's sysctl value: the program is skipped, the run goes on."""


class LiveKernel:
    """Runs program segments on the lab's guests through agents kept for the whole fuzz run.

    Starting python under TCG costs about a second, so agents are not restarted per program:
    each gets a ``reset`` (close every socket, undo sysctls) folded into its first batch of the
    next program that uses it, and a host whose sysctls a program changed is reset before the
    next program whether that program uses it or not.
    """

    def __init__(self, lab: Any, block_ms: int = BLOCK_MS) -> None:
        self.lab = lab
        self.block_ms = block_ms
        self.agents: dict[tuple[str, str], Agent] = {}
        self.dirty: set[tuple[str, str]] = set()  # agents holding sockets of an earlier program
        self.to_reset: set[tuple[str, str]] = set()
        self.sysctl_hosts: set[str] = set()  # hosts whose sysctls the current program set
        self.round_trips = 0
        self.segment_seconds = 0.0  # inside batch round trips only: agent start-up is start_seconds
        self.start_seconds = 0.0
        self.steps = 0

    def start(self, hosts: tuple[str, ...], users: tuple[str, ...] = ("root", "student")) -> None:
        """Start every (host, user) agent a run may use, all at once (about a second each under TCG).

        Started one by one on first use, four agents cost a fuzz run five seconds; in parallel the
        two VMs start theirs side by side.
        """
        wanted = [(host, user) for host in hosts for user in users if (host, user) not in self.agents]
        if not wanted:
            return
        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=len(wanted)) as pool:
            errors = [f.exception() for f in [pool.submit(self.agent, *key) for key in wanted]]
        self.start_seconds += time.perf_counter() - started
        for error in errors:
            if error is not None:
                raise error

    def agent(self, host: str, user: str) -> Agent:
        key = (host, user)
        if key not in self.agents:
            try:
                agent = Agent(self.lab.ssh(host, timeout=SSH_TIMEOUT), host, user, block_ms=self.block_ms).start()
                if user == "root":
                    reply = agent.batch([NO_MODPROBE])[0]
                    if reply.errno is not None:
                        agent.close()
                        raise AgentError(f"cannot turn module autoloading off: {reply.errno} {reply.error or ''}")
            except (AgentError, SSHError) as exc:
                raise LabError(f"{host}: cannot start the agent as {user}: {exc}") from exc
            self.agents[key] = agent
        return self.agents[key]

    def begin(self, program: Program) -> None:
        self.to_reset = set(self.dirty)
        # A host whose sysctls an earlier program changed is put back now, even if this program never
        # runs a step as root there: its other agents' steps must meet the defaults the model assumes.
        for host in sorted(self.sysctl_hosts - set(program.sysctls)):
            if (host, "root") in self.to_reset:
                self._batch(host, "root", [])
        self.sysctl_hosts = set(program.sysctls)
        for host, settings in program.sysctls.items():
            steps = [{"op": "sysctl_set", "args": {"name": name, "value": value}} for name, value in settings.items()]
            replies = self._batch(host, "root", steps)
            for (name, value), reply in zip(settings.items(), replies):
                if reply.errno is not None:
                    raise SysctlRefused(f"{host}: cannot set {name} = {value}: {reply.errno} {reply.error or ''}".strip())
            self.dirty.add((host, "root"))

    def _batch(self, host: str, user: str, steps: list[dict[str, Any]]) -> list[Any]:
        key = (host, user)
        reset = key in self.to_reset
        if reset:
            steps = [{"op": "reset", "args": {}}] + steps
            self.to_reset.discard(key)
        if key not in self.agents:  # not started up front (start()): its start-up is not a segment's time
            started = time.perf_counter()
            self.agent(host, "root")  # first: it turns module autoloading off for every agent of the host
            self.agent(host, user)
            self.start_seconds += time.perf_counter() - started
        agent = self.agents[key]
        started = time.perf_counter()
        try:
            replies = agent.batch(steps, block_ms=self.block_ms)
        except (AgentError, SSHError) as exc:
            raise LabError(f"{host}/{user}: {exc}") from exc
        self.segment_seconds += time.perf_counter() - started
        self.round_trips += 1
        self.dirty.add(key)
        return replies[1:] if reset else replies

    def run_segment(self, host: str, user: str, steps: list[dict[str, Any]]) -> list[Outcome]:
        self.steps += len(steps)
        replies = self._batch(host, user, steps)
        return [Outcome(ret=reply.ret, errno=reply.errno, blocked=reply.blocked,
                        extra={**reply.extra, **({"error": reply.error} if reply.error else {})})
                for reply in replies]

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    def snapshot(self, name: str) -> Any:
        return {}

    def close(self) -> None:
        for agent in self.agents.values():
            try:
                agent.close()
            except (LabError, OSError, EOFError):
                pass
        self.agents.clear()
