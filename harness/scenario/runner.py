"""Run a scenario's steps, in order, on the live guests and on the reference model side by side."""

from __future__ import annotations

import time
from collections.abc import Callable, ItemsView, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, cast

from ..errors import LabError
from ..model import Network
from ..model.constants import resolve
from .compare import Outcome, Verdict, judge
from .. import template
from .format import CALLS, REFERENCE, Scenario, Step

LAB_ADDRESSES = {"client": "198.51.100.1", "server": "198.51.100.2"}


class Backend(Protocol):
    """One side of a run: the live guests or the model."""

    def call(self, host: str, user: str, op: str, args: dict[str, Any]) -> Outcome: ...

    def sleep(self, seconds: float) -> None: ...

    def snapshot(self, name: str) -> Mapping[str, Any]: ...

    def close(self) -> None: ...


class TracingBackend(Backend, Protocol):
    """The live side, which can also record the kernel's call graph of a call (harness.scenario.live)."""

    def call_traced(self, host: str, user: str, op: str, args: dict[str, Any], options: Any,
                    functions: list[str]) -> Outcome: ...


@dataclass
class StepRecord:
    """What happened at one step on each side, and the verdict."""

    step: Step
    kernel: Outcome | None = None
    model: Outcome | None = None
    verdict: Verdict | None = None
    seconds: float = 0.0
    trace: Any = None  # harness.guest.trace.KernelTrace of the kernel side, when the step was traced
    citation: Any = None  # harness.guest.trace.Citation: the model's kernel_fn held against that trace


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


class UnsetReference(LookupError):
    """A step refers to a result that this side never produced (the naming step failed there)."""


def resolve_reference(text: str, values: Mapping[str, Any]) -> Any:
    """``$name`` (the whole result), ``$name.port`` / ``.ip`` (of an address), ``$name[1]``, ``$name.key``."""
    match = REFERENCE.match(text)
    if match is None or match.group(1) not in values:
        raise UnsetReference(text)
    value = values[match.group(1)]
    for accessor in re_accessors(match.group(2)):
        if isinstance(accessor, int) or accessor in ("ip", "host", "port"):
            index = {"ip": 0, "host": 0, "port": 1}.get(accessor, accessor)  # type: ignore[arg-type]
            if not isinstance(value, (list, tuple)) or not -len(value) <= index < len(value):
                raise UnsetReference(text)
            value = value[index]
        elif isinstance(value, Mapping) and accessor in value:
            value = value[accessor]
        else:
            raise UnsetReference(text)
    if value is None:
        raise UnsetReference(text)  # e.g. the name of an unnamed AF_UNIX socket: nothing to pass on
    return value


def re_accessors(text: str) -> list[str | int]:
    """``.port[0].x`` -> ["port", 0, "x"]."""
    out: list[str | int] = []
    for part in text.replace("[", ".[").split("."):
        if part:
            out.append(int(part[1:-1]) if part.startswith("[") else part)
    return out


def _value(value: Any, values: Mapping[str, Any] | None) -> Any:
    if values is not None and isinstance(value, str) and REFERENCE.match(value):
        return resolve_reference(value, values)
    return value


def resolve_args(call: str, args: Mapping[str, Any], names: Mapping[str, int],
                 values: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Constant names to ints, ``$socket`` names to this side's descriptors, ``$name.port`` to results.

    A name whose socket() failed on this side becomes -1, so using it fails
    with EBADF there, as it would in a program that ignored the error.
    ``values`` holds every named result of this side (any host): a reference
    to one that is missing raises UnsetReference.
    """
    schema = CALLS[call]
    out: dict[str, Any] = {}
    for key, value in args.items():
        kind = schema.get(key, "any").rstrip("?")
        if kind == "fd":
            fd = names.get(value[1:], -1) if isinstance(value, str) else value
            out[key] = fd if isinstance(fd, int) else -1
        elif kind == "fds":
            out[key] = [names.get(v[1:], -1) if isinstance(v, str) else v for v in value]
        elif kind == "const":
            value = _value(value, values)
            out[key] = resolve(value) if isinstance(value, str) else value
        elif kind == "addr" and isinstance(value, list):
            out[key] = tuple(_value(part, values) for part in value)
        elif kind == "addr":
            value = _value(value, values)
            out[key] = tuple(value) if isinstance(value, list) else value
        else:
            out[key] = _value(value, values)
    return out


def _fds_to_names(value: Any, by_fd: Mapping[int, str]) -> Any:
    """poll answers {fd: revents}; fd numbers differ between the sides, so name them."""
    if not isinstance(value, dict):
        return value
    return {f"${by_fd[int(fd)]}" if int(fd) in by_fd else str(fd): revents for fd, revents in value.items()}


class SocketNames:
    """One side's named results: name -> (host, user, value), indexed per process (host, user).

    A step looks up its own process's names, and every name a reference may
    use, in constant time: building them from one flat table on every step
    made a run quadratic in its steps (20,000 steps: minutes). Used as a
    mapping: ``names[name] = (host, user, value)``, ``names.items()``.
    """

    def __init__(self) -> None:
        self._all: dict[str, tuple[str, str, Any]] = {}
        self._values: dict[str, Any] = {}
        self._mine: dict[tuple[str, str], dict[str, Any]] = {}
        self._by_fd: dict[tuple[str, str], dict[int, str]] = {}

    def __setitem__(self, name: str, entry: tuple[str, str, Any]) -> None:
        """``name`` now means ``value`` in that process, and nothing anywhere else."""
        old = self._all.get(name)
        if old is not None:
            old_host, old_user, old_value = old
            self._mine.get((old_host, old_user), {}).pop(name, None)
            by_fd = self._by_fd.get((old_host, old_user), {})
            if _is_fd(old_value) and by_fd.get(old_value) == name:
                del by_fd[old_value]
        host, user, value = entry
        self._all[name] = entry
        self._values[name] = value
        self._mine.setdefault((host, user), {})[name] = value
        if _is_fd(value):
            self._by_fd.setdefault((host, user), {})[value] = name

    def __getitem__(self, name: str) -> tuple[str, str, Any]:
        return self._all[name]

    def __contains__(self, name: object) -> bool:
        return name in self._all

    def items(self) -> ItemsView[str, tuple[str, str, Any]]:
        return self._all.items()

    def of(self, host: str, user: str) -> Mapping[str, Any]:
        """name -> value in that process (do not change it: assign to ``names[name]``)."""
        return self._mine.get((host, user), {})

    def by_fd(self, host: str, user: str) -> Mapping[int, str]:
        return self._by_fd.get((host, user), {})

    @property
    def values(self) -> Mapping[str, Any]:
        """name -> value of every named result of this side, any process (for ``$name.port`` references)."""
        return self._values


def _is_fd(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


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
    sysctl_values: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, host: Any) -> "ModelStats":
        return cls(tuple(host.ss()), dict(host.predict_counters()), dict(host.sysctls))

    @property
    def sysctls(self) -> Any:
        """The host's sysctls by their last name component (``.somaxconn``), as a kernel snapshot names them."""
        from types import SimpleNamespace

        short: dict[str, Any] = {}
        for name, value in self.sysctl_values.items():
            short.setdefault(name.rsplit(".", 1)[-1], value)  # net.ipv4.ip_nonlocal_bind before net.ipv6's
        return SimpleNamespace(**short)

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


# Steps that are the guest agent's own work, not one system call of the step's thread: a sysctl read,
# and the epoll herd, whose waits and wakeups run in the agent's waiter threads (the tracer follows
# the agent's main thread only). A whole-run --trace leaves them untraced instead of judging a citation
# against a graph that cannot hold it. A loop step (`until:`/`max:`) is many calls: it is not traced either.
NOT_ONE_SYSCALL = frozenset({"sysctl_get", "epoll_herd", "epoll_herd_wakeups"})


def traced_options(step: Step, trace: Any = None) -> Any:
    """The trace options of ``step`` in a run traced with ``trace`` (every call step) or not (``trace: true`` steps)."""
    if step.kind != "call" or step.until is not None or step.max_repeats:
        return None
    if step.call in NOT_ONE_SYSCALL and not step.trace:
        return None
    return step.trace or trace


def run(scenario: Scenario, kernel: Backend | None, model: ModelBackend | None,
        on_step: Callable[[StepRecord], None] | None = None, trace: Any = None) -> RunResult:
    """Run every step on both sides (either may be None), judging each call step as it completes.

    A step is traced on the kernel side (``record.trace``, ``record.citation``)
    when it says ``trace:`` or ``trace`` (TraceOptions) is given for all.

    Once a step has crossed the lab segment, the first call step that fails
    makes the kernel side check the segment (``segment_faults``, when it has
    one): a NIC that is down shows up on that step and in ``diagnosis``
    instead of as a puzzling disagreement with the model.
    """
    result = RunResult(scenario)
    kernel_names, model_names = SocketNames(), SocketNames()
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
            elif step.kind == "value":
                if kernel is not None:
                    record.kernel = evaluate_value(step, result.kernel_snapshots, kernel_names)
                if model is not None:
                    record.model = evaluate_value(step, result.model_snapshots, model_names)
                record.verdict = judge(step, record.kernel, record.model)
            else:
                if kernel is not None and model is not None and traced_options(step, trace) is not None \
                        and hasattr(kernel, "call_traced"):
                    # The model first: its citation is one of the functions the trace looks for.
                    record.model = _call(model, step, model_names)
                    record.kernel = _call(kernel, step, kernel_names, traced_options(step, trace),
                                          record.model.kernel_fn)
                    record.trace = record.kernel.extra.get("trace")
                    if record.trace is not None:
                        from harness.guest.trace import check_citation

                        record.citation = check_citation(record.trace, record.model.kernel_fn,
                                                         same_outcome=_same_outcome(record.kernel, record.model))
                elif step.compare == "eventually" and model is not None and hasattr(kernel, "call_settled"):
                    # The model first: the agent asks the kernel again while its answer is a "not yet"
                    # one that differs from the model's (docs/scenarios.md), as batched runs do.
                    record.model = _call(model, step, model_names)
                    record.kernel = _call(cast(Backend, kernel), step, kernel_names, awaited=record.model)
                else:
                    if kernel is not None:
                        record.kernel = _call(kernel, step, kernel_names)
                    if model is not None:
                        record.model = _call(model, step, model_names)
                port_range = model.port_range(step.host) if model is not None else (32768, 60999)
                record.verdict = judge(step, record.kernel, record.model, port_range)
                crossed = crossed or crosses_hosts(step)
                if (crossed and not segment_checked and not record.verdict.ok
                        and kernel is not None and hasattr(kernel, "segment_faults")):
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


UNSET = "UNSET"  # the errno-like mark of a step that refers to a result its side never produced


def _same_outcome(kernel: Outcome, model: Outcome) -> bool:
    """Whether both sides took the same exit (same errno, both blocked or not): only then do their paths match."""
    return kernel.errno == model.errno and kernel.blocked == model.blocked


def _call(backend: Backend, step: Step, names: SocketNames, trace: Any = None, cited: str = "",
          awaited: Outcome | None = None) -> Outcome:
    """One call on one side; ``names`` holds that side's named results per process.

    With ``trace`` (TraceOptions) the kernel side also records the call's kernel graph; with
    ``awaited`` (the model's outcome of a ``compare: eventually`` step) it is settled toward it.
    """
    # Descriptor numbers belong to one process: only this host's and this user's names apply.
    mine = names.of(step.host, step.user)
    try:
        args = resolve_args(step.call, step.args, mine, names.values)
    except UnsetReference as exc:
        return Outcome(ret=None, errno=UNSET, rule=f"{exc.args[0]} was never set on this side: the step did not run")
    if trace is not None:
        outcome = cast(TracingBackend, backend).call_traced(step.host, step.user, step.call, args, trace, [cited] if cited else [])
    elif awaited is not None:
        outcome = cast(Any, backend).call_settled(step, args, awaited)
    elif step.until:
        outcome = call_until(backend, step, args)
    else:
        outcome = backend.call(step.host, step.user, step.call, args)
    if step.call in ("poll", "epoll_wait"):
        outcome = replace(outcome, ret=_fds_to_names(outcome.ret, names.by_fd(step.host, step.user)))
    if step.save_as and outcome.errno is None and not outcome.blocked:
        if step.call not in ("socket", "accept", "accept4") or _is_fd(outcome.ret):
            names[step.save_as] = (step.host, step.user, outcome.ret)
    return outcome


def call_until(backend: Backend, step: Step, args: dict[str, Any]) -> Outcome:
    """Repeat one call until it fails with ``step.until`` (or any other errno, or ``max`` times).

    The outcome is ``{"calls": successful calls, "total": the sum of their
    return values, "stopped": the errno that ended the loop or "max"}``. A
    backend with its own ``call_until`` (the guest agent) runs the loop there,
    in one round trip.
    """
    own = getattr(backend, "call_until", None)
    if own is not None:
        return own(step.host, step.user, step.call, args, step.until, step.max_repeats)
    calls = total = 0
    approx = False
    last = Outcome(ret=None)
    stopped: str | None = "max"
    for _ in range(step.max_repeats):
        last = backend.call(step.host, step.user, step.call, args)
        approx = approx or last.approx
        if last.errno is not None or last.blocked:
            stopped = "blocked" if last.blocked else last.errno
            break
        calls += 1
        total += last.ret if isinstance(last.ret, int) else 0
    return Outcome(ret={"calls": calls, "total": total, "stopped": stopped}, rule=last.rule,
                   kernel_fn=last.kernel_fn, approx=approx)


def evaluate_value(step: Step, snapshots: Mapping[str, Any], names: SocketNames) -> Outcome:
    """A value step on one side: its expression over that side's snapshots (and named results)."""
    scope = dict(names.values)
    scope.update(snapshots)
    try:
        value = template.expression(step.expression, False)(**scope)
    except Exception as exc:  # noqa: BLE001 - a template error is this step's outcome, not the run's end
        return Outcome(ret=None, errno=UNSET, rule=f"cannot evaluate {step.expression}: {exc}")
    if value is not None and hasattr(value, "_asdict"):
        value = list(value)
    if step.save_as:
        names[step.save_as] = ("", "", value)
    return Outcome(ret=value)
