"""A generic step runner: the same step list (host, user, op, args with symbolic constants) drives the model."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from .constants import NAMES, resolve
from .result import Result

# Arguments whose string values are constant names ("AF_INET", "SOCK_STREAM|SOCK_NONBLOCK").
SYMBOLIC_ARGS = frozenset({"family", "type", "protocol", "level", "optname", "flags", "how", "events", "cmd"})


@dataclass(frozen=True)
class Step:
    """One syscall for one host and user; ``save`` names the return value for later ``$name`` references."""

    host: str
    op: str
    args: Mapping[str, Any] = field(default_factory=dict)
    user: str = "root"
    save: str | None = None


def resolve_args(args: Mapping[str, Any], saved: Mapping[str, Any]) -> dict[str, Any]:
    """Translate constant names and ``$var`` references into the ints the model (or a real kernel) takes."""
    out: dict[str, Any] = {}
    for key, value in args.items():
        if isinstance(value, str) and value.startswith("$") and value[1:] in saved:
            value = saved[value[1:]]
        elif key in SYMBOLIC_ARGS and isinstance(value, str):
            value = resolve(value)
        elif key == "value" and isinstance(value, str) and value.split("|")[0].strip() in NAMES:
            value = resolve(value)
        out[key] = value
    return out


def run_steps(net: Any, steps: Iterable[Step | Mapping[str, Any]]) -> list[Result]:
    """Run steps in order against a Network; returns one Result per step."""
    saved: dict[str, Any] = {}
    results: list[Result] = []
    for raw in steps:
        step = raw if isinstance(raw, Step) else Step(**raw)
        result = net[step.host].call(step.op, resolve_args(step.args, saved), user=step.user)
        if step.save:
            saved[step.save] = result.ret
        results.append(result)
    return results
