"""Run a scenario with each run of consecutive steps on one VM and user sent to its agent in one request.

The model side runs first, step by step (it is in-process and instant). The kernel side then goes
segment by segment: a segment is a maximal run of call steps on the same host and user, sent as one
``batch`` request, so a 10,000-step program on one VM costs one SSH round trip. Names saved inside a
segment are resolved by the agent (``{"$ref": ...}``); names from earlier segments, by the host.

Steps with ``compare: eventually`` carry the model's answer to the agent, which asks the kernel again
for up to ``settle_ms`` while the kernel's answer is a "not yet" one (see the guest's ``Batch``):
a handshake or datagram still on the wire is waited for instead of reported.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any, Protocol

from ..errors import LabError
from .compare import Outcome, judge
from .format import REFERENCE, Scenario, Step, CALLS
from .runner import (
    UNSET, ModelBackend, RunAborted, RunResult, SocketNames, StepRecord, UnsetReference, _call, _fds_to_names,
    evaluate_value,
    resolve_args,
)

DEFAULT_SETTLE_MS = 200
# A call the model says sleeps for ever is confirmed asleep after this long (the agent's guard is
# 300 ms otherwise): a kernel that answers later than this still counts as blocked.
CONFIRM_BLOCK_MS = 100
BLOCKING_CALLS = frozenset({"connect", "accept", "accept4", "send", "sendto", "sendmsg", "recv", "recvfrom",
                            "recvmsg", "poll", "epoll_wait", "close"})


class SegmentBackend(Protocol):
    """The kernel side of a batched run."""

    def run_segment(self, host: str, user: str, steps: list[dict[str, Any]]) -> list[Outcome]: ...

    def sleep(self, seconds: float) -> None: ...

    def snapshot(self, name: str) -> Mapping[str, Any]: ...


def segments(steps: tuple[Step, ...]) -> list[tuple[int, int]]:
    """(start, end) of each maximal run of call steps on one (host, user); other steps stand alone."""
    out = []
    i = 0
    while i < len(steps):
        j = i + 1
        if steps[i].kind == "call":
            key = (steps[i].host, steps[i].user)
            while j < len(steps) and steps[j].kind == "call" and (steps[j].host, steps[j].user) == key:
                j += 1
        out.append((i, j))
        i = j
    return out


def wanted(step: Step, model: Outcome) -> dict[str, Any]:
    """The model's answer as the agent compares it while settling: the errno, or poll's revents in order."""
    if step.call == "poll" and isinstance(model.ret, dict):
        # Keys are $names, or the number for raw fds and for names never set on the model side (-1).
        return {"revents": [model.ret.get(f, model.ret.get("-1")) if isinstance(f, str) else model.ret.get(str(f))
                            for f in step.args.get("fds", [])]}
    if step.until and isinstance(model.ret, dict) and "stopped" in model.ret:
        # A loop is waited out only while it stops at its first call with a "not yet" errno (calls 0).
        return {"stopped": model.ret["stopped"]}
    if step.call == "epoll_wait" and model.errno is None and isinstance(model.ret, dict):
        # Only "nothing ready yet" is waited out: asking again then consumes no edge or one-shot event.
        return {"errno": None, "ready": len(model.ret)}
    return {"errno": model.errno}


def _mark(value: Any, pending: set[str], fd: bool) -> Any:
    """A reference to a name saved earlier in this segment becomes a marker the agent resolves."""
    if not isinstance(value, str):
        return value
    match = REFERENCE.match(value)
    if match is None or match.group(1) not in pending:
        return value
    path = [part.strip("[]") for part in match.group(2).replace("[", ".[").split(".") if part]
    marker: dict[str, Any] = {"$ref": match.group(1)}
    if path:
        marker["path"] = [int(part) if part.isdigit() else part for part in path]
    if fd:
        marker["fd"] = True
    return marker


def wire_args(step: Step, mine: Mapping[str, Any], values: Mapping[str, Any], pending: set[str]) -> dict[str, Any]:
    """The step's arguments for the agent: constants resolved, references resolved or marked."""
    schema = CALLS[step.call]
    marked: dict[str, Any] = {}
    for key, value in step.args.items():
        kind = schema.get(key, "any").rstrip("?")
        if kind == "fds":
            marked[key] = [_mark(v, pending, True) for v in value]
        elif kind == "addr" and isinstance(value, list):
            marked[key] = [_mark(v, pending, False) for v in value]
        else:
            marked[key] = _mark(value, pending, kind == "fd")
    fixed = {k: v for k, v in marked.items() if not isinstance(v, dict) and not (isinstance(v, list) and any(
        isinstance(part, dict) for part in v))}
    out = resolve_args(step.call, fixed, mine, values)
    for key, value in marked.items():
        if key not in fixed:
            if isinstance(value, list):
                # Resolve the plain parts (constants, earlier names) and keep the markers.
                plain = [part for part in value if not isinstance(part, dict)]
                resolved = list(resolve_args(step.call, {key: plain}, mine, values)[key]) if plain else []
                out[key] = [part if isinstance(part, dict) else resolved.pop(0) for part in value]
            else:
                out[key] = value
    return out


def run_batched(scenario: Scenario, kernel: SegmentBackend, model: ModelBackend,
                settle_ms: int = DEFAULT_SETTLE_MS, on_step: Callable[[StepRecord], None] | None = None) -> RunResult:
    """Run ``scenario`` on the model, then on the kernel one segment per round trip; judge every step."""
    result = RunResult(scenario)
    records = [StepRecord(step) for step in scenario.steps]
    model_names = SocketNames()
    for record in records:
        step = record.step
        if step.kind == "sleep":
            model.sleep(step.seconds)
        elif step.kind == "snapshot":
            result.model_snapshots[step.snapshot] = model.snapshot(step.snapshot)
        elif step.kind == "value":
            record.model = evaluate_value(step, result.model_snapshots, model_names)
        else:
            record.model = _call(model, step, model_names)
    kernel_names = SocketNames()
    for start, end in segments(scenario.steps):
        step = scenario.steps[start]
        try:
            if step.kind == "sleep":
                kernel.sleep(step.seconds)
            elif step.kind == "snapshot":
                result.kernel_snapshots[step.snapshot] = kernel.snapshot(step.snapshot)
            elif step.kind == "value":
                records[start].kernel = evaluate_value(step, result.kernel_snapshots, kernel_names)
            else:
                _kernel_segment(kernel, records[start:end], kernel_names, settle_ms)
        except LabError as exc:
            result.records = records[:end]
            result.error = f"step {step.index} ({step.host or '-'}: {step.describe()}): {exc}"
            raise RunAborted(result.error, result) from exc
    port_range = model.port_range
    for record in records:
        if record.step.kind in ("call", "value"):
            host_range = port_range(record.step.host) if record.step.host else (32768, 60999)
            record.verdict = judge(record.step, record.kernel, record.model, host_range)
        result.records.append(record)
        if on_step:
            on_step(record)
    return result


def _kernel_segment(kernel: SegmentBackend, records: list[StepRecord], names: SocketNames,
                    settle_ms: int) -> None:
    host, user = records[0].step.host, records[0].step.user
    mine = dict(names.of(host, user))
    values = names.values
    pending: set[str] = set()
    wire: list[dict[str, Any]] = []
    sent: list[StepRecord] = []
    for record in records:
        step = record.step
        try:
            args = wire_args(step, mine, values, pending)
        except UnsetReference as exc:
            record.kernel = Outcome(ret=None, errno=UNSET, rule=f"{exc.args[0]} was never set on this side")
            continue
        entry: dict[str, Any] = {"op": step.call, "args": args}
        if step.save_as:
            entry["save"] = step.save_as
            pending.add(step.save_as)
        if step.until:
            entry["until"], entry["max"] = step.until, step.max_repeats
        if record.model is not None and record.model.blocked and step.call in BLOCKING_CALLS \
                and "block_ms" not in args:
            entry["args"] = {**args, "block_ms": CONFIRM_BLOCK_MS}
        if step.compare == "eventually" and record.model is not None:
            entry["await"], entry["settle_ms"] = wanted(step, record.model), settle_ms
        wire.append(entry)
        sent.append(record)
    outcomes = kernel.run_segment(host, user, wire) if wire else []
    for record, outcome in zip(sent, outcomes):
        step = record.step
        if step.save_as and outcome.errno is None and not outcome.blocked:
            if step.call not in ("socket", "accept", "accept4") or (isinstance(outcome.ret, int) and outcome.ret >= 0):
                names[step.save_as] = (host, user, outcome.ret)
                mine[step.save_as] = outcome.ret
        if step.call in ("poll", "epoll_wait"):
            outcome = replace(outcome, ret=_fds_to_names(outcome.ret, names.by_fd(host, user)))
        record.kernel = outcome
