"""Compare what the kernel did with what the model predicted and what the scenario expected."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .format import Expect, Step

# Calls whose return value is a new descriptor: its number depends on what else the process has open.
FD_RETURNING = frozenset({"socket", "accept", "accept4", "epoll_create1"})
ADDRESS_RETURNING = frozenset({"getsockname", "getpeername"})


@dataclass(frozen=True)
class Outcome:
    """One side's result of one step: a return value or an errno, and (from the model) why."""

    ret: Any
    errno: str | None = None
    rule: str = ""
    kernel_fn: str = ""
    approx: bool = False
    blocked: bool = False
    extra: dict = field(default_factory=dict)

    def describe(self) -> str:
        if self.blocked:
            return "blocks"
        if self.errno:
            return f"-1 {self.errno}"
        # Whole: the tables fold a long value over lines rather than cut it.
        return self.ret if isinstance(self.ret, str) else repr(self.ret)


@dataclass(frozen=True)
class Verdict:
    """How a step went: ``ok`` when kernel, model and expectation agree; ``problems`` says where not."""

    ok: bool
    problems: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()


def _short(value: Any, limit: int = 400) -> str:
    text = repr(value) if not isinstance(value, str) else value
    return text if len(text) <= limit else text[: limit - 1] + "…"


def normalize(value: Any) -> Any:
    """Make JSON-shaped and Python-shaped values comparable: tuples become lists, dict keys strings."""
    if isinstance(value, (list, tuple)):
        return [normalize(v) for v in value]
    if isinstance(value, dict):
        return {str(k): normalize(v) for k, v in value.items()}
    return value


def _ephemeral(port: Any, port_range: tuple[int, int]) -> bool:
    return isinstance(port, int) and port_range[0] <= port <= port_range[1]


def agree(step: Step, kernel: Outcome, model: Outcome, port_range: tuple[int, int] = (32768, 60999)) -> tuple[bool, str]:
    """Whether kernel and model agree on ``step``, under its compare mode. Returns (agree, note)."""
    mode = step.compare
    if mode == "none":
        return True, ""
    if kernel.errno != model.errno or kernel.blocked != model.blocked:
        return False, f"kernel {kernel.describe()}, model {model.describe()}"
    if kernel.blocked:
        return True, ""
    if mode in ("errno", "ok") or kernel.errno:
        return True, ""
    if step.call in FD_RETURNING:
        # Both gave a descriptor; which number depends on each process's other open files.
        return True, "descriptor numbers are not compared"
    if step.until and isinstance(kernel.ret, dict) and isinstance(model.ret, dict):
        # A loop's count depends on buffer fill levels the model may only estimate; why it stopped does not.
        if kernel.ret.get("stopped") != model.ret.get("stopped"):
            return False, f"loop stopped by {kernel.ret.get('stopped')} on the kernel, {model.ret.get('stopped')} on the model"
    if model.approx:
        return True, "the model only estimates this value"
    got, predicted = normalize(kernel.ret), normalize(model.ret)
    if (step.call in ADDRESS_RETURNING and isinstance(got, list) and isinstance(predicted, list)
            and len(got) == len(predicted) >= 2):
        # [ip, port] or [ip6, port, flowinfo, scope_id]: everything but an ephemeral port exactly.
        if (got[0] == predicted[0] and got[2:] == predicted[2:] and _ephemeral(got[1], port_range)
                and _ephemeral(predicted[1], port_range)):
            return True, "ephemeral ports compared by range"
    if got == predicted:
        return True, ""
    return False, f"kernel {_short(got)}, model {_short(predicted)}"


def meets(expect: Expect, outcome: Outcome) -> bool:
    if expect.errno is not None:
        return outcome.errno == expect.errno
    return outcome.errno is None and normalize(outcome.ret) == normalize(expect.ret)


def judge(step: Step, kernel: Outcome | None, model: Outcome | None,
          port_range: tuple[int, int] = (32768, 60999)) -> Verdict:
    """The verdict of one call step; either side may be absent (a model-only or kernel-only run)."""
    problems, notes = [], []
    if kernel is not None and model is not None:
        same, note = agree(step, kernel, model, port_range)
        if not same:
            problems.append(f"kernel and model differ: {note}")
        elif note:
            notes.append(note)
    if step.expect is not None:
        if kernel is not None and not meets(step.expect, kernel):
            problems.append(f"kernel gave {kernel.describe()}, expected {step.expect.describe()}")
        if model is not None and not meets(step.expect, model):
            problems.append(f"model gave {model.describe()}, expected {step.expect.describe()}")
    return Verdict(not problems, tuple(problems), tuple(notes))
