"""Run a scenario's steps, in order, on the live guests and on the reference model side by side."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from ..errors import LabError
from ..model import Network
from ..model.constants import resolve
from .compare import Outcome, Verdict, judge
from .format import CALLS, Scenario, Step

LAB_ADDRESSES = {"client": "198.51.100.1", "server": "198.51.100.2"}


class Backend(Protocol):
    """One side of a run: the live guests or the model."""

    def call(self, host: str, user: str, op: str, args: dict[str, Any]) -> Outcome: ...

    def sleep(self, seconds: float) -> None: ...

    def snapshot(self, name: str) -> Mapping[str, Any]: ...

    def close(self) -> None: ...


@dataclass
class StepRecord:
    """What happened at one step on each side, and the verdict."""

    step: Step
    kernel: Outcome | None = None
    model: Outcome | None = None
    verdict: Verdict | None = None
    seconds: float = 0.0


@dataclass
class RunResult:
    """A finished (or aborted) run: every step's record and the named stats snapshots."""

    scenario: Scenario
    records: list[StepRecord] = field(default_factory=list)
    kernel_snapshots: dict[str, Mapping[str, Any]] = field(default_factory=dict)
    model_snapshots: dict[str, Mapping[str, Any]] = field(default_factory=dict)
    error: str | None = None
    # What socklab found wrong with the lab itself during the run (e.g. a lab NIC that is down).
    diagnosis: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.error is None and all(r.verdict is None or r.verdict.ok for r in self.records)

    def record(self, label_or_index: str | int) -> StepRecord:
        for record in self.records:
            if record.step.label == label_or_index or record.step.index == label_or_index:
                return record
        raise KeyError(f"no step {label_or_index!r} in the trace")


class RunAborted(LabError):
    """A run stopped part-way (a guest or its agent died); ``result`` holds what happened until then."""

    def __init__(self, message: str, result: RunResult) -> None:
        super().__init__(message)
        self.result = result


def resolve_args(call: str, args: Mapping[str, Any], names: Mapping[str, int]) -> dict[str, Any]:
    """Constant names to ints and ``$socket`` names to this side's descriptors.

    A name whose socket() failed on this side becomes -1, so using it fails
    with EBADF there, as it would in a program that ignored the error.
    """
    schema = CALLS[call]
    out: dict[str, Any] = {}
    for key, value in args.items():
        kind = schema.get(key, "any").rstrip("?")
        if kind == "fd":
            out[key] = names.get(value[1:], -1) if isinstance(value, str) else value
        elif kind == "fds":
            out[key] = [names.get(v[1:], -1) if isinstance(v, str) else v for v in value]
        elif kind == "const":
            out[key] = resolve(value)
        elif kind == "addr" and isinstance(value, list):
            out[key] = tuple(value)
        else:
            out[key] = value
    return out


def _fds_to_names(value: Any, names: Mapping[str, int]) -> Any:
    """poll answers {fd: revents}; fd numbers differ between the sides, so name them."""
    if not isinstance(value, dict):
        return value
    by_fd = {fd: f"${name}" for name, fd in names.items()}
    return {by_fd.get(int(fd), str(fd)): revents for fd, revents in value.items()}


class ModelBackend:
    """The reference model, set up like the lab: the scenario's hosts with their lab addresses and sysctls."""

    def __init__(self, scenario: Scenario, scatter_gather: bool = True,
                 addresses: Mapping[str, str] = LAB_ADDRESSES, kernels: Mapping[str, str] | None = None,
                 kernel: str = "6.1") -> None:
        """``kernels`` gives a host its own kernel series (the lab's VMs); the others run ``kernel``."""
        self.net = Network(kernel=kernel)
        for host in scenario.hosts:
            sysctls = {name: value for name, value in scenario.sysctls.get(host, {}).items()}
            self.net.add_host(host, addrs=[addresses.get(host, "198.51.100.9")], sysctls=sysctls, sg=scatter_gather,
                              kernel=(kernels or {}).get(host))

    def call(self, host: str, user: str, op: str, args: dict[str, Any]) -> Outcome:
        result = self.net[host].call(op, args, user=user)
        return Outcome(ret=result.ret, errno=result.errno, rule=result.rule, kernel_fn=result.kernel_fn,
                       approx=bool(result.approx), blocked=bool(result.blocked))

    def sleep(self, seconds: float) -> None:
        self.net.advance(seconds)

    def snapshot(self, name: str) -> Mapping[str, Any]:
        return {host: ModelStats.of(self.net[host]) for host in self.net.hosts}

    def port_range(self, host: str) -> tuple[int, int]:
        low, high = self.net[host].sysctls["net.ipv4.ip_local_port_range"]
        return int(low), int(high)

    def close(self) -> None:
        pass


@dataclass(frozen=True)
class ModelStats:
    """What the model predicts a stats snapshot of one host shows, frozen at the snapshot step."""

    rows: tuple[Any, ...]
    counters: Mapping[str, int]

    @classmethod
    def of(cls, host: Any) -> "ModelStats":
        return cls(tuple(host.ss()), dict(host.predict_counters()))

    def listener(self, port: int) -> Any:
        """The TCP listener on ``port`` (recv_q = sk_ack_backlog, send_q = sk_max_ack_backlog), or None."""
        for row in self.rows:
            if row.proto == "tcp" and row.state == "LISTEN" and _port(row.local) == port:
                return row
        return None

    def counter(self, name: str) -> int:
        """A lower bound for the kernel's counter ``name`` (e.g. TcpExt.ListenOverflows)."""
        return self.counters.get(name, 0)

    def __sub__(self, before: "ModelStats") -> "ModelDelta":
        """The model's counters between two snapshots, as ``delta("a", "b")`` gives the kernel's."""
        names = set(self.counters) | set(before.counters)
        return ModelDelta({name: self.counters.get(name, 0) - before.counters.get(name, 0) for name in names})


@dataclass(frozen=True)
class ModelDelta:
    """What the model predicts a counter grows by between two snapshots (a lower bound, like its counters)."""

    counters: Mapping[str, int]

    def counter(self, name: str) -> int:
        return self.counters.get(name, 0)


def _port(address: Any) -> int | None:
    if isinstance(address, (tuple, list)) and len(address) >= 2:
        return address[1]
    return None


def crosses_hosts(step: Step, addresses: Mapping[str, str] = LAB_ADDRESSES) -> bool:
    """Whether ``step`` sends to another VM over the lab segment (an address of another host of the lab)."""
    if step.kind != "call":
        return False
    others = {address for host, address in addresses.items() if host != step.host}
    value = step.args.get("addr")
    return isinstance(value, (list, tuple)) and bool(value) and value[0] in others


def run(scenario: Scenario, kernel: Backend | None, model: ModelBackend | None,
        on_step: Callable[[StepRecord], None] | None = None) -> RunResult:
    """Run every step on both sides (either may be None), judging each call step as it completes.

    Once a step has crossed the lab segment, the first call step that fails
    makes the kernel side check the segment (``segment_faults``, when it has
    one): a NIC that is down shows up on that step and in ``diagnosis``
    instead of as a puzzling disagreement with the model.
    """
    result = RunResult(scenario)
    kernel_names: dict[str, tuple[str, str, int]] = {}
    model_names: dict[str, tuple[str, str, int]] = {}
    crossed = False
    segment_checked = False
    for step in scenario.steps:
        record = StepRecord(step)
        started = time.monotonic()
        try:
            if step.kind == "sleep":
                if kernel is not None:
                    kernel.sleep(step.seconds)
                if model is not None:
                    model.sleep(step.seconds)
            elif step.kind == "snapshot":
                if kernel is not None:
                    result.kernel_snapshots[step.snapshot] = kernel.snapshot(step.snapshot)
                if model is not None:
                    result.model_snapshots[step.snapshot] = model.snapshot(step.snapshot)
            else:
                if kernel is not None:
                    record.kernel = _call(kernel, step, kernel_names)
                if model is not None:
                    record.model = _call(model, step, model_names)
                port_range = model.port_range(step.host) if model is not None else (32768, 60999)
                record.verdict = judge(step, record.kernel, record.model, port_range)
                crossed = crossed or crosses_hosts(step)
                if (crossed and not segment_checked and not record.verdict.ok
                        and hasattr(kernel, "segment_faults")):
                    segment_checked = True
                    faults = kernel.segment_faults()
                    if faults:
                        result.diagnosis += [f"lab segment: {fault}" for fault in faults]
                        record.verdict = replace(record.verdict, problems=record.verdict.problems + tuple(
                            f"lab segment: {fault}" for fault in faults))
        except LabError as exc:
            record.seconds = time.monotonic() - started
            result.records.append(record)
            result.error = f"step {step.index} ({step.host or '-'}: {step.describe()}): {exc}"
            raise RunAborted(result.error, result) from exc
        record.seconds = time.monotonic() - started
        result.records.append(record)
        if on_step:
            on_step(record)
    return result


def _call(backend: Backend, step: Step, names: dict[str, tuple[str, str, int]]) -> Outcome:
    """One call on one side; ``names`` maps each socket name to (host, user, descriptor) on that side."""
    # Descriptor numbers belong to one process: only this host's and this user's names apply.
    mine = {name: fd for name, (host, user, fd) in names.items() if host == step.host and user == step.user}
    outcome = backend.call(step.host, step.user, step.call, resolve_args(step.call, step.args, mine))
    if step.call in ("poll", "epoll_wait"):
        outcome = replace(outcome, ret=_fds_to_names(outcome.ret, mine))
    if step.save_as and outcome.errno is None and isinstance(outcome.ret, int) and outcome.ret >= 0:
        names[step.save_as] = (step.host, step.user, outcome.ret)
    return outcome
