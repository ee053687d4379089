"""The one step list runner: the same ``Step`` list (host, user, op, args with symbolic constants) drives the model
and the guests.

``run_steps`` takes any mapping of host name to something with ``call(op, args, user=)``: the model's
``Network`` (or its ``Host`` objects), or the lab's ``harness.guest.client.AgentHost`` per VM. Scenario
runs go through ``harness.scenario.runner``'s ``Backend`` instead; this is the API for code and tests
that build steps themselves.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Protocol

from .constants import NAMES, resolve

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


class Caller(Protocol):
    """What a step runs on: a model host, or a guest's agents."""

    def call(self, op: str, args: Mapping[str, Any], user: str = "root") -> Any: ...


class UnknownHost(LookupError):
    """A step names a host the network or lab does not have."""


def run_steps(hosts: Any, steps: Iterable[Step | Mapping[str, Any]]) -> list[Any]:
    """Run steps in order on ``hosts`` (a ``Network``, or a mapping of names to ``Caller``s): one result per step.

    On the model the results are ``Result``s, on guests ``AgentReply``s; both have ``ret``, ``errno``
    and ``blocked``, so the two lists compare item by item.
    """
    saved: dict[str, Any] = {}
    results: list[Any] = []
    for raw in steps:
        step = raw if isinstance(raw, Step) else Step(**raw)
        try:
            host: Caller = hosts[step.host]
        except KeyError:
            raise UnknownHost(f"step {step.op} names host {step.host!r}; there are: "
                              f"{', '.join(getattr(hosts, 'hosts', hosts))}") from None
        result = host.call(step.op, resolve_args(step.args, saved), user=step.user)
        if step.save:
            saved[step.save] = result.ret
        results.append(result)
    return results
