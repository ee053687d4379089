"""Expected-behaviour templates: assertions over stats snapshots, their deltas and the step trace.

``labs/<lab>/expected.yaml.j2`` is rendered (sandboxed jinja2, StrictUndefined)
with the lab's parameters and the guests' sysctls, and gives a list of
assertions. Each names a *value*, a jinja2 expression over the run, and one
comparison::

    - name: the accept queue holds backlog + 1
      value: after.server.listener(port).recv_q
      equals: {{ backlog + 1 }}
      why: sk_acceptq_is_full() tests ack_backlog > max_ack_backlog
    - name: the SYNs that found the queue full were counted
      value: delta("before", "after").server.counter("TcpExt.ListenOverflows")
      at_least: {{ clients - backlog - 1 }}

Comparisons: ``equals``, ``not_equals``, ``at_least``, ``at_most``,
``between: [low, high]`` (inclusive, for timing-dependent counters) and
``one_of: [...]``. ``ask:`` turns the value into a question of the lab's
predictions sheet (see ``harness.course.sheet``). Inside a value expression these names exist:

- every snapshot name of the scenario (``before.server``: that host's stats);
- ``delta(a, b)``: per host, the counters of snapshot b minus those of a;
- ``model``: the model's predictions, e.g. ``model.after.server.listener(7000)``;
- ``trace``: the steps, e.g. ``trace.step("accept-first").kernel.errno``,
  ``trace.zerocopy_codes("client")``;
- ``sysctl.server["net.core.somaxconn"]`` and every parameter by name.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2

from .. import load as textio
from .. import template
from .format import ScenarioError, _shown, _strip_lines, render
from .predict import NotPredicted
from .runner import RunResult, StepRecord

COMPARISONS = ("equals", "not_equals", "at_least", "at_most", "between", "one_of")


@dataclass(frozen=True)
class Assertion:
    name: str
    value: str
    comparison: str
    operand: Any
    line: int
    why: str = ""
    # The question a predictions sheet asks about this value, in words ("Recv-Q of the listener
    # on port 7000 at snapshot full"); an assertion without one is not asked of students.
    ask: str = ""

    def describe(self) -> str:
        words = {"equals": "==", "not_equals": "!=", "at_least": ">=", "at_most": "<=",
                 "between": "within", "one_of": "one of"}
        return f"{words[self.comparison]} {self.operand!r}"


@dataclass(frozen=True)
class AssertionOutcome:
    """One assertion, evaluated: the value seen and whether it held."""

    assertion: Assertion
    value: Any
    ok: bool
    error: str = ""
    # False when the model was asked and does not simulate the figure (the error says which).
    predicted: bool = True
    # On a check with the lab: what the model predicted for the same value ("" = not predicted).
    model: str = ""


class _ByHost:
    """``before.server``: attribute access to one snapshot's hosts (what the sandbox allows)."""

    def __init__(self, label: str, hosts: Mapping[str, Any]) -> None:
        self._label = label
        self._hosts = dict(hosts)

    def __getattr__(self, host: str) -> Any:
        try:
            return self._hosts[host]
        except KeyError:
            raise AttributeError(f"snapshot {self._label!r} has no host {host!r}") from None

    def __getitem__(self, host: str) -> Any:
        try:
            return self._hosts[host]
        except KeyError:
            raise KeyError(f"{self._label!r} has no host {host!r}") from None


class Trace:
    """The run's steps, for assertions about results rather than stats."""

    def __init__(self, result: RunResult) -> None:
        self._records = result.records

    def step(self, label: str | int) -> StepRecord:
        for record in self._records:
            if record.step.label == label or record.step.index == label:
                return record
        raise KeyError(f"no step labelled {label!r}")

    def completions(self, host: str) -> list[dict]:
        """Every zerocopy completion the kernel reported on ``host`` (recvmsg with MSG_ERRQUEUE)."""
        found = []
        for record in self._records:
            if record.step.host == host and record.step.call == "recvmsg" and record.kernel is not None:
                if isinstance(record.kernel.ret, list):
                    found += [c for c in record.kernel.ret if isinstance(c, dict) and "code" in c]
        return found

    def zerocopy_codes(self, host: str) -> list[int]:
        """The distinct ee_code values of ``host``'s completions: [0] true zerocopy, [1] COPIED."""
        return sorted({c["code"] for c in self.completions(host)})

    def errnos(self, host: str, call: str) -> list[str | None]:
        return [r.kernel.errno for r in self._records
                if r.step.host == host and r.step.call == call and r.kernel is not None]


def load(path: Path, variables: Mapping[str, Any]) -> list[Assertion]:
    """Render and parse an expectation template."""
    where = str(path)
    text = textio.read_text(path, "expectation template", error=ScenarioError)
    rendered = render(text, variables, where)
    raw = textio.parse_yaml(rendered, where, error=ScenarioError)
    if not isinstance(raw, textio.YamlList):
        raise ScenarioError(f"{where}:1: an expectation file is a list of assertions")
    assertions = []
    for number, item in enumerate(raw, start=1):
        line = raw.line_of(number - 1)
        at = f"{where}:{line}: assertion {number}"
        if not isinstance(item, dict):
            raise ScenarioError(f"{at}: an assertion is a mapping with name, value and one comparison")
        textio.check_keys(item, ("name", "value", "why", "ask", *COMPARISONS), at, error=ScenarioError, add_line=False)
        for key in ("name", "why", "ask"):
            if key in item and (not isinstance(item[key], (str, int)) or isinstance(item[key], bool)):
                raise ScenarioError(f"{at}: `{key}:` must be a string, not {_shown(item[key])}")
        item = _strip_lines(item)
        comparisons = [key for key in COMPARISONS if key in item]
        if len(comparisons) != 1 or not isinstance(item.get("value"), str):
            raise ScenarioError(f"{at}: needs `value:` (an expression) and exactly one of {', '.join(COMPARISONS)}")
        comparison = comparisons[0]
        operand = item[comparison]
        if comparison == "between" and not (isinstance(operand, list) and len(operand) == 2
                                            and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                    for v in operand)):
            raise ScenarioError(f"{at}: `between:` takes [low, high]")
        if comparison == "one_of" and not isinstance(operand, list):
            raise ScenarioError(f"{at}: `one_of:` takes a list")
        try:
            template.expression(item["value"])
        except jinja2.TemplateSyntaxError as exc:
            raise ScenarioError(f"{at}: value {item['value']!r}: {exc.message}") from None
        assertions.append(Assertion(str(item.get("name", item["value"])), item["value"], comparison, operand, line,
                                    str(item.get("why", "")), str(item.get("ask", "") or "")))
    return assertions


def default_sysctls(overrides: Mapping[str, Any] | None = None) -> Any:
    """The guest's default socket sysctls as a stats ``Sysctls`` (from the model's table of 6.1 defaults).

    Used to render a template before the run, so that its mistakes stop the
    check before any VM is touched; the real values come from the run.
    """
    from ..model import DEFAULT_SYSCTLS
    from ..stats import Sysctls
    from ..stats.sysctl import SYSCTLS

    values: dict[str, Any] = {}  # attr -> its spec's kind
    for spec in SYSCTLS:
        value = (overrides or {}).get(spec.name, DEFAULT_SYSCTLS.get(spec.name, 0))
        if isinstance(value, str):  # a scenario's setting as sysctl takes it, e.g. "40000 40003"
            value = [int(part) for part in value.split()]
        values[spec.attr] = spec.kind(list(value) if isinstance(value, (tuple, list)) else [int(value)])
    return Sysctls(**values)


class KernelRules:
    """``kernel.rule("name", host)`` in a template: a version rule's value on that host's kernel series
    (``kernel.series(host)`` names it). Rules and their causes are in harness/model/versions.py."""

    def __init__(self, kernels: Mapping[str, str]) -> None:
        self.kernels = dict(kernels)

    def series(self, host: str) -> str:
        return self.kernels.get(host, "6.1")

    def rule(self, name: str, host: str) -> Any:
        from ..model.versions import RULES

        return RULES[name].value(self.series(host))


def precheck(path: Path, params: Mapping[str, Any], hosts: tuple[str, ...], scatter_gather: bool = True) -> list[Assertion]:
    """Render and parse the template with default sysctls: syntax, undefined names and shape, before any run.

    ``scatter_gather`` is the lab NIC's (True: the tap segment's), as ``check`` renders it.
    """
    defaults = default_sysctls()
    return load(path, {**params, "sysctl": _ByHost("sysctl", {host: defaults for host in hosts}),
                       "kernel": KernelRules({}), "scatter_gather": scatter_gather})


def context(result: RunResult, params: Mapping[str, Any], sysctls: Mapping[str, Any]) -> dict[str, Any]:
    """The names a value expression can use."""
    snapshots = {name: _ByHost(name, hosts) for name, hosts in result.kernel_snapshots.items()}

    def delta(first: str, second: str) -> _ByHost:
        if first not in result.kernel_snapshots or second not in result.kernel_snapshots:
            raise KeyError(f"delta({first!r}, {second!r}): the scenario took snapshots {sorted(result.kernel_snapshots)}")
        a, b = result.kernel_snapshots[first], result.kernel_snapshots[second]
        return _ByHost(f"{second} - {first}", {host: b[host] - a[host] for host in b})

    model = _ByHost("model", {name: _ByHost(name, hosts) for name, hosts in result.model_snapshots.items()})
    return {**params, **snapshots, "delta": delta, "model": model, "trace": Trace(result),
            "sysctl": _ByHost("sysctl", sysctls)}


def evaluate(assertions: list[Assertion], names: Mapping[str, Any]) -> list[AssertionOutcome]:
    outcomes = []
    for assertion in assertions:
        try:
            with template.template_budget():
                value = template.expression(assertion.value, False)(**names)
            if isinstance(value, jinja2.Undefined):
                value._fail_with_undefined_error()
        except NotPredicted as exc:
            outcomes.append(AssertionOutcome(assertion, None, True, str(exc), predicted=False))
            continue
        except jinja2.exceptions.SecurityError as exc:
            outcomes.append(AssertionOutcome(assertion, None, False, f"unsafe expression: {exc}"))
            continue
        except Exception as exc:  # noqa: BLE001 - any failure to compute the value fails this assertion, with why
            outcomes.append(AssertionOutcome(assertion, None, False, f"{type(exc).__name__}: {exc}"))
            continue
        outcomes.append(AssertionOutcome(assertion, value, _holds(assertion, value)))
    return outcomes


def _holds(assertion: Assertion, value: Any) -> bool:
    operand = assertion.operand
    try:
        if assertion.comparison == "equals":
            return value == operand
        if assertion.comparison == "not_equals":
            return value != operand
        if assertion.comparison == "at_least":
            return value >= operand
        if assertion.comparison == "at_most":
            return value <= operand
        if assertion.comparison == "between":
            return operand[0] <= value <= operand[1]
        return value in operand
    except TypeError:
        return False
