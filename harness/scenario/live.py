"""The kernel side of a run: guest agents on the lab's VMs, and stats snapshots over SSH."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import paramiko

from harness.guest.client import Agent, AgentError, AgentPushError, AgentReply, AgentRequestError, AgentTimeout
from ..errors import LabError, SocklabError, SSHError
from ..stats import collect_many
from harness.guest.trace import KernelTrace, TraceError
from .compare import Outcome
from .format import Scenario, Step

# (Re)connecting SSH during a run: a guest whose sshd is gone is reported, not waited for.
SSH_TIMEOUT = 10.0
# Looking into a guest after its agent failed; the whole report stays within seconds.
EVIDENCE_TIMEOUT = 3.0


def _refusal(error: str) -> str:
    """The agent's refusal without the op name it prefixes (``trace_begin: ...``)."""
    head, sep, rest = error.partition(": ")
    return rest if sep and head.startswith("trace_") else error


class GuestFault(LabError):
    """A step could not run because its VM, its kernel, its sshd or its agent failed; the message says which."""


class LabBackend:
    """Runs steps through one agent per (VM, user), started on first use, all closed at the end.

    Closing an agent closes every socket it opened and restores the sysctls it
    set, so a scenario leaves the lab as it found it, whatever happened.

    When a step fails because of the guest rather than the kernel's answer
    (the agent or SSH went away, or did not answer), the error says what
    happened to the VM: its QEMU exited, its kernel panicked (with the panic
    from the console), its sshd is gone, or only the agent process ended.
    """

    def __init__(self, lab: Any, scenario: Scenario, agents: dict[tuple[str, str], Agent] | None = None) -> None:
        self.lab = lab
        self.scenario = scenario
        # ``agents`` shared with the scenarios before and after this one (a lab check's): they
        # are reset at the end instead of closed, and the caller closes them (close_agents).
        self.shared = agents is not None
        self.agents: dict[tuple[str, str], Agent] = agents if agents is not None else {}
        self.block_ms: int | None = None  # for batches: the agent's own default unless set
        self.faulted = False  # an agent or its SSH failed: shared agents are ended, not reset
        missing = [host for host in scenario.hosts if host not in {vm.name for vm in lab.require().vms}]
        if missing:
            raise LabError(f"{scenario.path}: the running lab has no VM {', '.join(missing)}")

    def agent(self, host: str, user: str) -> Agent:
        key = (host, user)
        known = self.agents.get(key)
        if known is None or not known.running:  # a shared agent may have died in an earlier scenario
            if known is not None:
                known.close()  # its channel, if anything is left of it
            try:
                paused = getattr(self.lab, "guest_paused", None)
                watch = (lambda: paused(host)) if paused is not None else None
                self.agents[key] = Agent(self.lab.ssh(host, timeout=SSH_TIMEOUT), host, user, watch=watch).start()
            except AgentRequestError:
                raise
            except (AgentError, SSHError) as exc:
                raise self.explain(host, exc) from exc
        return self.agents[key]

    def start_agents(self, traced_hosts: Sequence[str] = ()) -> None:
        """Start every agent the scenario will use before its first step, one thread per VM.

        Each start costs a TCG guest a third of a second or more (python's start-up and an
        SSH channel): started here, a two-VM scenario pays it once per VM instead of once per
        agent, one after another, in the middle of its steps. A VM's root agent starts first,
        so it writes the compiled agent that the VM's other agents then read.
        """
        wanted: dict[str, list[str]] = {}
        for host in self.scenario.sysctls:
            wanted.setdefault(host, ["root"])
        for host in traced_hosts:
            wanted.setdefault(host, ["root"])
        for step in self.scenario.steps:
            if step.kind == "call":
                users = wanted.setdefault(step.host, [])
                if step.user not in users:
                    users.append(step.user)
        for users in wanted.values():
            users.sort(key=lambda user: user != "root")
        if not wanted:
            return
        from concurrent.futures import ThreadPoolExecutor

        def start(host: str) -> None:
            for user in wanted[host]:
                self.agent(host, user)

        with ThreadPoolExecutor(max_workers=len(wanted)) as pool:
            for future in [pool.submit(start, host) for host in wanted]:
                future.result()  # the first failure, as a step would have raised it

    def _request(self, host: str, user: str, op: str, args: Mapping[str, Any]) -> AgentReply:
        agent = self.agent(host, user)
        try:
            return agent.request(op, args)
        except AgentRequestError:
            raise
        except (AgentError, SSHError) as exc:
            raise self.explain(host, exc) from exc

    def explain(self, host: str, exc: Exception) -> GuestFault:
        """``exc`` (an agent or SSH failure on ``host``) with what happened to the VM."""
        self.faulted = True
        vm_fault = getattr(self.lab, "vm_fault", None)
        fault = vm_fault(host) if vm_fault is not None else None
        if fault is not None:
            return GuestFault(f"{fault}\n(what the step saw: {exc})")
        if isinstance(exc, AgentPushError):
            return GuestFault(str(exc))  # it never started: nothing of the agent to look for
        answers, logged = self._guest_evidence(host)
        if not answers:
            return GuestFault(f"{exc}\nQEMU of {host} runs and its SSH connection is up, but the guest does not run "
                              f"a command within {EVIDENCE_TIMEOUT:g} s: it is hung or starved "
                              f"(`invoke lab.console {host}` shows its console)")
        if isinstance(exc, AgentTimeout):
            return GuestFault(f"{exc}\nQEMU of {host} runs and SSH to it works: the agent is stuck "
                              "(a system call that does not return)" + (f"; the guest kernel logged:\n{logged}"
                                                                        if logged else ""))
        if isinstance(exc, AgentError):
            return GuestFault(f"{exc}\nQEMU of {host} runs and SSH to it works, so the agent process itself ended"
                              + (f"; the guest kernel logged:\n{logged}" if logged else
                                 ": killed by a signal (a SIGKILL leaves no stderr), or it exited; the guest kernel "
                                 "logged no OOM kill or crash"))
        return GuestFault(str(exc))

    def _guest_evidence(self, host: str) -> tuple[bool, str]:
        """Whether the guest runs a command at all, and what its kernel logged about dying processes."""
        try:
            result = self.lab.ssh(host, timeout=EVIDENCE_TIMEOUT).run(
                "dmesg | grep -iE 'killed process|out of memory|segfault|traps:|hung_task|soft lockup' | tail -n 3",
                timeout=EVIDENCE_TIMEOUT)
        except (SocklabError, OSError, EOFError, paramiko.SSHException):
            return False, ""
        return True, result.stdout.strip()

    def apply_sysctls(self) -> None:
        for host, settings in self.scenario.sysctls.items():
            for name, value in settings.items():
                reply = self._request(host, "root", "sysctl_set", {"name": name, "value": value})
                if not reply.ok:
                    raise LabError(f"{host}: cannot set {name} = {value}: {reply.errno or reply.error}")

    def call(self, host: str, user: str, op: str, args: dict[str, Any]) -> Outcome:
        reply = self._request(host, user, op, args)
        if reply.error and reply.errno is None:
            raise LabError(f"{host}: the agent refused {op}: {reply.error}")
        return Outcome(ret=reply.ret, errno=reply.errno, blocked=reply.blocked, extra=dict(reply.extra))

    def run_segment(self, host: str, user: str, steps: list[dict[str, Any]]) -> list[Outcome]:
        """Consecutive steps of one (VM, user) in one agent request (see harness.scenario.batch)."""
        agent = self.agent(host, user)
        try:
            replies = agent.batch(steps, block_ms=self.block_ms)
        except AgentRequestError:
            raise
        except (AgentError, SSHError) as exc:
            raise self.explain(host, exc) from exc
        return [Outcome(ret=reply.ret, errno=reply.errno, blocked=reply.blocked,
                        extra={**reply.extra, **({"error": reply.error} if reply.error else {})})
                for reply in replies]

    def call_settled(self, step: Step, args: dict[str, Any], model: Outcome) -> Outcome:
        """A ``compare: eventually`` step, asked again in the guest while the kernel's answer is a "not yet"
        one that differs from the model's (the batch runner's settling, for step-by-step runs)."""
        from .batch import DEFAULT_SETTLE_MS, wanted

        entry: dict[str, Any] = {"op": step.call, "args": args, "await": wanted(step, model),
                                 "settle_ms": DEFAULT_SETTLE_MS}
        if step.until:
            entry["until"], entry["max"] = step.until, step.max_repeats
        return self.run_segment(step.host, step.user, [entry])[0]

    def call_until(self, host: str, user: str, op: str, args: dict[str, Any], until: str, limit: int) -> Outcome:
        """A step repeated until an errno, looped in the guest: one round trip, not one per call."""
        return self.run_segment(host, user, [{"op": op, "args": args, "until": until, "max": limit}])[0]

    # -- tracing (docs/tracing.md): the host's root agent on each VM owns that VM's tracer -------

    def arm_tracing(self, hosts: list[str]) -> None:
        """Arm the tracer on every VM in ``hosts`` at once (arming takes a second or more under TCG)."""
        from concurrent.futures import ThreadPoolExecutor

        agents = {host: self.agent(host, "root") for host in hosts}
        with ThreadPoolExecutor(max_workers=max(1, len(agents))) as pool:
            replies = dict(zip(agents, pool.map(
                lambda agent: agent.request("trace_arm", {}, check=False, timeout=120), agents.values())))
        for host, reply in replies.items():
            if reply.error:
                raise TraceError(f"{host}: cannot trace: {_refusal(reply.error)}")

    def call_traced(self, host: str, user: str, op: str, args: dict[str, Any], options: Any,
                    functions: list[str]) -> Outcome:
        """``call`` with the kernel's call graph of it in ``extra["trace"]`` (a KernelTrace)."""
        tracer = self.agent(host, "root")
        target = self.agent(host, user)
        request = {"pid": target.hello.get("pid"), "depth": options.depth, "functions": functions}
        if options.function:
            request["function"] = options.function
        if tracer is target:
            # One process: begin, step and end go out back to back (trace_end repeats a refusal).
            tracer.post("trace_begin", request)
        else:
            begun = tracer.request("trace_begin", request, check=False, timeout=120)
            if begun.error:
                raise TraceError(f"{host}: cannot trace {op}: {_refusal(begun.error)}")
        try:
            outcome = self.call(host, user, op, args)
        finally:
            ended = tracer.request("trace_end", {}, check=False, timeout=120)
        if ended.error:
            raise TraceError(f"{host}: cannot trace {op}: {_refusal(ended.error)}")
        trace = KernelTrace.of(ended.extra, ended.extra.get("traceable"))
        return replace(outcome, extra={**outcome.extra, "trace": trace})

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    def _collect(self, what: str) -> Mapping[str, Any]:
        hosts = list(self.scenario.hosts)
        try:
            return collect_many(self.lab, hosts)
        except SocklabError as exc:
            vm_fault = getattr(self.lab, "vm_fault", None)
            faults = [fault for fault in (vm_fault(host) for host in hosts) if fault] if vm_fault else []
            if faults:
                raise GuestFault("\n".join(faults) + f"\n(what {what} saw: {exc})") from exc
            # A LabError, so the run stops with what it has so far instead of losing it.
            raise LabError(f"{what} failed: {exc}") from exc

    def snapshot(self, name: str) -> Mapping[str, Any]:
        return self._collect(f"stats snapshot {name!r}")

    def sysctls(self) -> dict[str, Any]:
        """Each host's socket sysctls right now (for rendering expectation templates)."""
        snaps = self._collect("reading the sysctls")
        return {host: snaps[host].sysctls for host in self.scenario.hosts}

    def segment_faults(self) -> list[str]:
        """What is wrong with the lab segment ([] when it is fine); asked after a cross-host step failed."""
        faults = getattr(self.lab, "segment_faults", None)
        if faults is None:
            return []
        try:
            return faults()
        except SocklabError as exc:
            return [f"the lab segment could not be checked: {exc}"]

    def close(self) -> None:
        """Close every agent, all at once (a tracing agent puts its VM's tracer back as it ends, a second);
        shared agents are reset instead, for the next scenario, their tracers kept armed."""
        if self.shared and not self.faulted:
            reset_agents(self.agents)
        else:
            # After a fault an agent may still owe a late reply, or sit in a system call: the
            # next scenario starts from new ones.
            close_agents(self.agents)


def _each_agent(agents: dict[tuple[str, str], Agent], work: Callable[[Agent], object], what: str) -> None:
    """``work`` on every agent at once; the agents it failed on leave ``agents``, and a LabError names them."""
    from concurrent.futures import ThreadPoolExecutor

    def one(agent: Agent) -> str | None:
        try:
            work(agent)
        except (LabError, OSError, EOFError, paramiko.SSHException) as exc:
            return str(exc)
        return None

    with ThreadPoolExecutor(max_workers=max(1, len(agents))) as pool:
        outcomes = dict(zip(list(agents), pool.map(one, list(agents.values()))))
    errors = [f"{host}/{user}: {error}" for (host, user), error in outcomes.items() if error]
    for key, error in outcomes.items():
        if error:
            try:
                agents.pop(key).close()
            except (LabError, OSError, EOFError, paramiko.SSHException):
                pass  # it failed once already; what it said is in ``errors``
    if errors:
        raise LabError(f"{what} failed: " + "; ".join(errors))


def close_agents(agents: dict[tuple[str, str], Agent]) -> None:
    """End every agent: each closes its sockets, restores its sysctls and its VM's tracer, and exits."""
    try:
        _each_agent(agents, lambda agent: agent.close(), "closing agents")
    finally:
        agents.clear()


def reset_agents(agents: dict[tuple[str, str], Agent]) -> None:
    """Back to a fresh agent's state, in one round trip each: sockets closed, sysctls restored, tracer
    armed but stopped. A dead agent, or one that refuses, is dropped (the next scenario starts a new one)."""
    _each_agent(agents, lambda agent: agent.reset(keep_tracing=True), "resetting agents")
