"""Read a scenario file: a plain YAML header, then a jinja2-templated body of steps.

A scenario file has two YAML documents separated by a line ``---``::

    name: listen-backlog                 # header: plain YAML, never templated
    hosts: [server, client]
    params: {backlog: 2, clients: 6, port: 7000}
    ---
    sysctls:                             # body: rendered with the params first
      server: {net.core.somaxconn: 4096}
    steps:
      - {on: server, call: socket, args: {family: AF_INET, type: SOCK_STREAM}, as: listener}
      - {on: server, call: listen, args: {fd: $listener, backlog: "{{ backlog }}"}, expect: 0}
    {% for i in range(clients) %}
      - {on: client, call: connect, args: {fd: $c{{ i }}, addr: [198.51.100.2, "{{ port }}"]}}
    {% endfor %}

The body is rendered in a jinja2 ``SandboxedEnvironment`` with
``StrictUndefined``: a typo in a parameter name is an error, and a template
cannot reach Python internals. Every error names the file and line, and the
step when there is one.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import jinja2
import jinja2.sandbox

from .. import load as textio
from .. import template
from ..errors import SocklabError
from ..model.versions import KERNELS

# Each call the scenario language knows, with its arguments: name -> kind (a trailing ? = optional).
#   const: an int or constant names ("SOCK_STREAM|SOCK_NONBLOCK");  fd: a $name of an earlier `as:`;
#   addr: [ip, port] or a path;  int, str: as said;  fds: a list of fds;  any: passed through.
CALLS: dict[str, dict[str, str]] = {
    "socket": {"family": "const", "type": "const", "protocol": "const?"},
    "bind": {"fd": "fd", "addr": "addr", "addrlen": "int?", "family": "const?"},
    "listen": {"fd": "fd", "backlog": "int"},
    "accept": {"fd": "fd"},
    "accept4": {"fd": "fd", "flags": "const?"},
    "connect": {"fd": "fd", "addr": "addr", "addrlen": "int?", "family": "const?"},
    "close": {"fd": "fd"},
    "shutdown": {"fd": "fd", "how": "const"},
    "getsockname": {"fd": "fd"},
    "getpeername": {"fd": "fd"},
    "setsockopt": {"fd": "fd", "level": "const", "optname": "const", "value": "const", "optlen": "int?"},
    "getsockopt": {"fd": "fd", "level": "const", "optname": "const", "optlen": "int?"},
    "send": {"fd": "fd", "length": "int?", "data": "str?", "flags": "const?",
             "addr": "addr?", "addrlen": "int?", "family": "const?"},
    "sendto": {"fd": "fd", "length": "int?", "data": "str?", "flags": "const?",
               "addr": "addr?", "addrlen": "int?", "family": "const?"},
    "sendmsg": {"fd": "fd", "length": "int?", "data": "str?", "flags": "const?",
                "addr": "addr?", "addrlen": "int?", "family": "const?"},
    "sendfile": {"fd": "fd", "length": "int", "offset": "int?"},  # from a file of the guest agent's own
    "recv": {"fd": "fd", "length": "int?", "flags": "const?"},
    "recvfrom": {"fd": "fd", "length": "int?", "flags": "const?"},
    "recvmsg": {"fd": "fd", "length": "int?", "flags": "const?"},
    "poll": {"fds": "fds", "events": "const?", "timeout": "int?"},
    "epoll_create1": {"flags": "const?"},
    "epoll_ctl": {"epfd": "fd", "op": "const", "fd": "fd", "events": "const?"},
    "epoll_wait": {"epfd": "fd", "maxevents": "int?", "timeout": "int?"},
    # Not system calls: `waiters` threads of the guest agent asleep in epoll_wait on fd at once, each on its
    # own epoll file; then how many of them a wakeup reached (harness/guest/inside/agent.py Herd).
    "epoll_herd": {"fd": "fd", "waiters": "int", "events": "const?", "timeout": "int?"},
    "epoll_herd_wakeups": {"fd": "fd"},
    "fcntl": {"fd": "fd", "cmd": "const", "arg": "const?"},
    "fstat": {"fd": "fd"},
    "sysctl_get": {"name": "str"},  # not a system call: a read of /proc/sys/<name>
}
COMPARE_MODES = ("exact", "ok", "errno", "none", "eventually")
HEADER_KEYS = ("name", "description", "hosts", "params", "kernels")
BODY_KEYS = ("sysctls", "steps")
STEP_KEYS = ("on", "call", "args", "as", "user", "expect", "compare", "label", "until", "max", "trace")
VALUE_STEP_KEYS = ("value", "as", "expect", "compare", "label")
# The largest buffer the guest agent allocates for one send or recv (harness/guest/inside/agent.py MAX_BUFFER);
# a bigger step is refused here, before a VM is touched, not by the agent halfway through a run.
MAX_BUFFER = 64 << 20
USERS = ("root", "student")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# A reference to an earlier step's result: $name, $name.port, $name.ip, $name[1] (see resolve_reference).
REFERENCE = re.compile(r"^\$([A-Za-z_][A-Za-z0-9_]*)((?:\.[A-Za-z_][A-Za-z0-9_]*|\[\d+\])*)$")
UNTIL_MAX = 100_000  # `max:` of a step repeated `until:` an errno



class ScenarioError(SocklabError):
    """A scenario (or expectation) file is malformed; the message names file, line and step."""


@dataclass(frozen=True)
class Expect:
    """What a step must return: a value (``ret``) or an errno name."""

    ret: Any = None
    errno: str | None = None

    def describe(self) -> str:
        return f"-1 {self.errno}" if self.errno else repr(self.ret)


@dataclass(frozen=True)
class Step:
    """One entry of ``steps``. ``kind`` is call, sleep or snapshot."""

    index: int
    line: int
    kind: str
    host: str = ""
    call: str = ""
    args: Mapping[str, Any] = field(default_factory=dict)
    user: str = "root"
    save_as: str | None = None
    expect: Expect | None = None
    compare: str = "exact"
    label: str = ""
    seconds: float = 0.0
    snapshot: str = ""
    until: str | None = None  # repeat the call until it fails with this errno (or `max` times)
    max_repeats: int = 0
    expression: str = ""  # a value step's expression over the snapshots taken so far
    trace: Any = None  # harness.guest.trace.TraceOptions when the step asks for the kernel's call graph (`trace: true`)

    def describe(self) -> str:
        if self.kind == "value":
            return f"value {self.expression}"
        if self.kind == "sleep":
            return f"sleep {self.seconds:g} s"
        if self.kind == "snapshot":
            return f"snapshot {self.snapshot}"
        parts = []
        for key, value in self.args.items():
            if key == "addr" and isinstance(value, list) and len(value) == 2:
                value = f"{value[0]}:{value[1]}"
            elif isinstance(value, list):
                value = "[" + ", ".join(str(v) for v in value) + "]"
            # The descriptor and the address read best without their names, as in C.
            parts.append(str(value) if key in ("fd", "addr", "fds") else f"{key}={value}")
        text = f"{self.call}({', '.join(parts)})"
        return f"{text} until {self.until}" if self.until else text


@dataclass(frozen=True)
class Scenario:
    """A parsed, rendered and checked scenario."""

    path: Path
    name: str
    description: str
    hosts: tuple[str, ...]
    params: Mapping[str, Any]
    sysctls: Mapping[str, Mapping[str, Any]]
    steps: tuple[Step, ...]
    kernels: tuple[str, ...] = ()  # the kernel series its answers hold on; () for every one

    def holds_on(self, series: str) -> bool:
        """Whether this scenario's answers are those of kernel ``series`` (a header without `kernels:`: all)."""
        return not self.kernels or series in self.kernels

    @property
    def snapshots(self) -> list[str]:
        return [step.snapshot for step in self.steps if step.kind == "snapshot"]


def sandbox() -> jinja2.sandbox.SandboxedEnvironment:
    """The one template environment (harness.template's budgeted sandbox)."""
    return template.sandbox()


def _split(text: str) -> tuple[str, str, int]:
    """(header, body, line of the first body line) split at the first line that is exactly ``---``."""
    lines = text.splitlines(keepends=True)
    for number, line in enumerate(lines):
        if line.rstrip() == "---" and number > 0:
            return "".join(lines[:number]), "".join(lines[number + 1:]), number + 2
    return "", text, 1


def _yaml(text: str, where: str, line_offset: int, note: str = "") -> Any:
    return textio.parse_yaml(text, where, line_offset, note, error=ScenarioError)


def _strip_lines(value: Any) -> Any:
    """Plain dicts and lists (the parsed file's line bookkeeping stays behind)."""
    return textio.plain(value)


def _shown(value: Any, limit: int = 60) -> str:
    """``repr(value)``, cut short: a message quotes what was given, not all of a megabyte of it."""
    text = repr(_strip_lines(value))
    return text if len(text) <= limit else text[:limit] + "…"


def parse_params(pairs: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``--param k=v`` values; v is read as YAML, so numbers are numbers and lists are lists."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not _NAME.match(key.strip()):
            raise ScenarioError(f"--param {_shown(pair, 200)}: use name=value, e.g. --param backlog=4")
        if key.strip() in out:
            raise ScenarioError(f"--param {key.strip()} is given twice")
        if not raw.strip():
            out[key.strip()] = ""
            continue
        try:
            value = textio.parse_yaml(raw, "--param", error=ScenarioError)
        except ScenarioError as exc:
            if "malformed YAML" in str(exc):
                raise ScenarioError(f"--param {_shown(pair, 200)}: the value is not valid YAML") from None
            reason = str(exc).split(": ", 1)[1]
            raise ScenarioError(f"--param {key.strip()}: {reason}") from None
        out[key.strip()] = _strip_lines(value)
    return out


def _read(path: Path) -> str:
    return textio.read_text(path, "scenario", error=ScenarioError)


def _header(header_text: str, where: str) -> textio.YamlMap:
    header = _yaml(header_text, where, 1)
    if not isinstance(header, textio.YamlMap):
        raise ScenarioError(f"{where}:1: the header must be a mapping (name, hosts, params)")
    textio.check_keys(header, HEADER_KEYS, where, "header key", error=ScenarioError)
    for key, kind in (("name", (str, int)), ("description", str), ("hosts", list), ("params", dict),
                      ("kernels", list)):
        if header.get(key) is not None:
            textio.expect_type(header[key], kind, where, header.line_of(key), key, error=ScenarioError)
    hosts = header.get("hosts") or textio.YamlList()
    for index, host in enumerate(hosts):
        textio.expect_type(host, str, where, hosts.line_of(index), "hosts", error=ScenarioError)
    kernels = header.get("kernels") or textio.YamlList()
    for index, series in enumerate(kernels):
        if not isinstance(series, str) or series not in KERNELS:
            raise ScenarioError(f"{where}:{kernels.line_of(index)}: kernels: {_shown(series)} is not a kernel series "
                                f"the model knows; write one of {', '.join(KERNELS)}, quoted (YAML reads 6.12 "
                                "unquoted as a number)")
    params = header.get("params") or textio.YamlMap()
    for name in params:
        if not isinstance(name, str) or not _NAME.match(name):
            raise ScenarioError(f"{where}:{params.line_of(name)}: parameter {_shown(name)} is not a name "
                                "(letters, digits, _)")
    return header


def declared_params(path: Path) -> dict[str, Any]:
    """The parameters a scenario's header declares, with their defaults."""
    header_text, _body, _line = _split(_read(path))
    if not header_text.strip():
        return {}
    return dict(_strip_lines(_header(header_text, str(path)).get("params") or {}))


def load(path: Path, overrides: Mapping[str, Any] | None = None, known_hosts: tuple[str, ...] | None = None,
         scatter_gather: bool = True) -> Scenario:
    """Read, render and check the scenario at ``path``; ``overrides`` replace header params.

    ``scatter_gather`` says whether the lab NIC gathers pages (the tap segment; not the socket
    segment, nor ``lab.model --no-sg``): the answer key is rendered with it, for the answers
    that depend on it (lab 07's zero-copy codes).
    """
    where = str(path)
    text = _read(path)
    header_text, body_text, body_line = _split(text)
    if not header_text.strip():
        raise ScenarioError(f"{where}:1: no `---` line: a scenario is a header (name, hosts, params), "
                            "a line `---`, then the steps")
    header = _header(header_text, where)
    params = dict(_strip_lines(header.get("params") or {}))
    for key in (overrides or {}):
        if key not in params:
            known = ", ".join(sorted(params)) or "none"
            raise ScenarioError(f"--param {key}: {where} has no parameter {key!r} (it has: {known})")
    params.update(overrides or {})
    rendered = render(body_text, params, where, body_line)
    body = _yaml(rendered, where, body_line, " (line of the rendered body)")
    if not isinstance(body, textio.YamlMap) or "steps" not in body:
        raise ScenarioError(f"{where}:{body_line}: the body must be a mapping with `steps:`")
    textio.check_keys(body, BODY_KEYS, where, "body key", error=ScenarioError)
    hosts = tuple(header.get("hosts") or ())
    if not hosts:
        raise ScenarioError(f"{where}:1: the header names no `hosts:`")
    if len(set(hosts)) != len(hosts):
        raise ScenarioError(f"{where}:{header.line_of('hosts')}: a host is named twice in `hosts:`")
    if known_hosts is not None:
        for host in hosts:
            if host not in known_hosts:
                raise ScenarioError(f"{where}:1: host {host!r} is not a VM of this lab ({', '.join(known_hosts)})")
    sysctls = _sysctls(body.get("sysctls") or {}, where, body.line_of("sysctls") if "sysctls" in body else body_line,
                       hosts)
    steps = _apply_key(_steps(body["steps"], where, body_line, hosts), key_path(path), params, scatter_gather)
    return Scenario(path=path, name=str(header.get("name", path.stem)), description=str(header.get("description", "")),
                    hosts=hosts, params=params, sysctls=sysctls, steps=steps,
                    kernels=tuple(header.get("kernels") or ()))


def key_path(path: Path) -> Path:
    """Where a scenario's answer key lives: ``key/<file>`` beside it (labs/01-.../key/files.yaml)."""
    return path.parent / "key" / path.name


def _apply_key(steps: tuple[Step, ...], key: Path, params: Mapping[str, Any],
               scatter_gather: bool = True) -> tuple[Step, ...]:
    """The scenario's steps with the ``expect:`` of its answer key, if it has one.

    A lab's scenario files hold only the calls, so a student can open them before predicting; what
    each labelled step must return is in the key, a mapping ``label: expect`` rendered with the same
    params (its comments say why). Every entry must name exactly one step that has no ``expect:`` of
    its own, so a renamed label stops the check instead of silently dropping an answer.
    """
    if not key.is_file():
        return steps
    where = str(key)
    raw = _yaml(render(_read(key), {**params, "scatter_gather": scatter_gather}, where), where, 1,
                " (line of the rendered key)")
    if raw is None:
        return steps
    if not isinstance(raw, textio.YamlMap):
        raise ScenarioError(f"{where}:1: an answer key maps step labels to what they return (label: 0)")
    by_label: dict[str, list[int]] = {}
    for position, step in enumerate(steps):
        if step.kind in ("call", "value") and step.label:
            by_label.setdefault(step.label, []).append(position)
    out = list(steps)
    for label, value in raw.items():
        at = f"{where}:{raw.line_of(label)}"
        positions = by_label.get(str(label), [])
        if len(positions) != 1:
            problem = "no step of the scenario has" if not positions else f"{len(positions)} steps of the scenario have"
            raise ScenarioError(f"{at}: {problem} the label {str(label)!r}"
                                f"{textio.did_you_mean(str(label), by_label) if not positions else ''}")
        step = out[positions[0]]
        if step.expect is not None:
            raise ScenarioError(f"{at}: step {step.index} ({step.label}) has an `expect:` in the scenario too")
        out[positions[0]] = replace(step, expect=_expect(value, f"{at}: step {step.index}"))
    return tuple(out)


def _sysctls(raw: Any, where: str, line: int, hosts: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    from ..model.config import DEFAULT_SYSCTLS

    if not isinstance(raw, dict) or any(h not in hosts for h in raw):
        raise ScenarioError(f"{where}:{line}: `sysctls:` maps hosts of the header to settings")
    for host, settings in raw.items():
        at = raw.line_of(host) if isinstance(raw, textio.YamlMap) else line
        textio.expect_type(settings, dict, where, at, f"sysctls: {host}", error=ScenarioError)
        for name, value in settings.items():
            if not isinstance(name, str):
                raise ScenarioError(f"{where}:{settings.line_of(name)}: a sysctl is named by a string, not {_shown(name)}")
            if name not in DEFAULT_SYSCTLS:
                raise ScenarioError(f"{where}:{settings.line_of(name)}: sysctl {name!r} on {host} is not one socklab "
                                    f"knows{textio.did_you_mean(name, DEFAULT_SYSCTLS)}; known: {', '.join(sorted(DEFAULT_SYSCTLS))}")
            ok = (isinstance(value, (int, str)) and not isinstance(value, bool)) or (
                isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value))
            if not ok:
                raise ScenarioError(f"{where}:{settings.line_of(name)}: sysctl {name} takes a number, a string or a "
                                    f"list of numbers, not {_shown(value)}")
    return _strip_lines(raw)


def _template_line(exc: BaseException) -> int | None:
    """The template line an error was raised at: jinja2 gives template frames the name ``<template>``."""
    line = None
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<template>":
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def render(text: str, params: Mapping[str, Any], where: str, line_offset: int = 1) -> str:
    """Render a template in the budgeted sandbox; undefined names, unsafe access and budget overruns become ScenarioErrors."""
    try:
        return template.render_budgeted(template.compiled(text), params)
    except jinja2.TemplateSyntaxError as exc:
        raise ScenarioError(f"{where}:{(exc.lineno or 1) + line_offset - 1}: template syntax: {exc.message}") from None
    except RecursionError:
        raise ScenarioError(f"{where}: template: recursion too deep (a macro that calls itself without end?)") from None
    except MemoryError:
        raise ScenarioError(f"{where}: template: ran out of memory (a loop too big?)") from None
    except (jinja2.UndefinedError, jinja2.exceptions.SecurityError, template.TemplateLimit, TypeError, ValueError,
            ArithmeticError, LookupError, AttributeError) as exc:
        line = _template_line(exc)
        at = f"{where}:{line + line_offset - 1}" if line else where
        if isinstance(exc, jinja2.exceptions.SecurityError):
            raise ScenarioError(f"{at}: template tried something unsafe: {exc}") from None
        if isinstance(exc, jinja2.UndefinedError):
            message = f"{exc.message} (params: {', '.join(sorted(params)) or 'none'})"
        else:  # a KeyError's str() is the repr of its key; its argument reads better
            message = str(exc.args[0] if isinstance(exc, KeyError) and exc.args else exc) or type(exc).__name__
        raise ScenarioError(f"{at}: template: {' '.join(message.split())[:300]}") from None


def _steps(raw: Any, where: str, line_offset: int, hosts: tuple[str, ...]) -> tuple[Step, ...]:
    if not isinstance(raw, list):
        raise ScenarioError(f"{where}:{line_offset}: `steps:` must be a list")
    names: dict[str, str] = {}  # socket name -> host it lives on
    steps = []
    for index, item in enumerate(raw, start=1):
        line = raw.line_of(index - 1) if isinstance(raw, textio.YamlList) else line_offset
        at = f"{where}:{line}: step {index}"
        if not isinstance(item, dict):
            raise ScenarioError(f"{at}: a step is a mapping, not {_shown(item)}")
        if "sleep" in item:
            textio.check_keys(item, ("sleep",), at, "key of a sleep step", error=ScenarioError,
                              add_line=False)
            seconds = item["sleep"]
            if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 <= seconds <= 60:
                raise ScenarioError(f"{at}: `sleep:` takes 0 to 60 seconds, not {_shown(seconds)}")
            steps.append(Step(index, line, "sleep", seconds=float(seconds)))
            continue
        if "snapshot" in item:
            textio.check_keys(item, ("snapshot",), at, "key of a snapshot step", error=ScenarioError,
                              add_line=False)
            name = item["snapshot"]
            if not isinstance(name, str) or not _NAME.match(name):
                raise ScenarioError(f"{at}: `snapshot:` takes a name like `before`, not {_shown(name)}")
            steps.append(Step(index, line, "snapshot", snapshot=name))
            continue
        if "value" in item:
            steps.append(_value_step(item, index, line, at, names))
            continue
        steps.append(_call_step(item, index, line, at, hosts, names))
    return tuple(steps)


def _call_step(item: dict, index: int, line: int, at: str, hosts: tuple[str, ...], names: dict[str, str]) -> Step:
    for key in item:
        if key not in STEP_KEYS:
            raise ScenarioError(f"{at}: unknown key {_shown(key)}{textio.did_you_mean(key, STEP_KEYS + ('sleep', 'snapshot', 'value'))}")
    host, call = item.get("on"), item.get("call")
    if not isinstance(host, str) or host not in hosts:
        raise ScenarioError(f"{at}: `on: {_strip_lines(host)}` is not one of the scenario's hosts ({', '.join(hosts)})")
    if not isinstance(call, str) or call not in CALLS:
        raise ScenarioError(f"{at}: unknown call {_shown(call)}; known: {', '.join(CALLS)}")
    args = item.get("args") or {}
    if not isinstance(args, dict):
        raise ScenarioError(f"{at}: `args:` must be a mapping")
    args = _numbers(call, _strip_lines(args))
    _check_args(call, args, at, host, names)
    user = item.get("user", "root")
    if not isinstance(user, str) or user not in USERS:
        raise ScenarioError(f"{at}: `user: {_strip_lines(user)}`; steps run as one of: {', '.join(USERS)}")
    save_as = item.get("as")
    if save_as is not None:
        if not isinstance(save_as, str) or not _NAME.match(save_as):
            raise ScenarioError(f"{at}: `as:` takes a socket name like `listener`, not {_shown(save_as)}")
        names[save_as] = host
    compare = item.get("compare", "exact")
    if not isinstance(compare, str) or compare not in COMPARE_MODES:
        raise ScenarioError(f"{at}: `compare: {_strip_lines(compare)}`; use one of: {', '.join(COMPARE_MODES)}")
    label = item.get("label", "")
    if not isinstance(label, (str, int)) or isinstance(label, bool):
        raise ScenarioError(f"{at}: `label:` takes a name or a number, not {_shown(label)}")
    until, max_repeats = _until(item, at)
    from harness.guest.trace import TraceError, TraceOptions

    try:
        trace = TraceOptions.of(item.get("trace"), at)
    except TraceError as exc:
        raise ScenarioError(str(exc)) from None
    return Step(index, line, "call", host=host, call=call, args=args, user=user, save_as=save_as,
                expect=_expect(item.get("expect"), at) if "expect" in item else None,
                compare=compare, label=str(label), until=until, max_repeats=max_repeats, trace=trace)


def _until(item: dict, at: str) -> tuple[str | None, int]:
    """`until: EAGAIN` (and `max: N`, default and cap UNTIL_MAX) repeats a call until that errno."""
    until = item.get("until")
    if until is None:
        if "max" in item:
            raise ScenarioError(f"{at}: `max:` only bounds a step with `until:`")
        return None, 0
    if not isinstance(until, str) or not re.fullmatch(r"E[A-Z0-9]+", until):
        raise ScenarioError(f"{at}: `until:` takes an errno name like EAGAIN, not {until!r}")
    limit = item.get("max", UNTIL_MAX)
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= UNTIL_MAX:
        raise ScenarioError(f"{at}: `max:` takes 1 to {UNTIL_MAX} repetitions, not {limit!r}")
    return until, limit


def _value_step(item: dict, index: int, line: int, at: str, names: dict[str, str]) -> Step:
    """`{value: "before.server.sysctls.somaxconn", as: q}`: a snapshot's content, compared and named."""
    for key in item:
        if key not in VALUE_STEP_KEYS:
            raise ScenarioError(f"{at}: unknown key {_shown(key)} for a value step"
                                f"{textio.did_you_mean(key, VALUE_STEP_KEYS)}")
    expression = item["value"]
    if not isinstance(expression, str) or not expression.strip():
        raise ScenarioError(f"{at}: `value:` takes an expression over the snapshots, like before.server.sysctls.somaxconn")
    try:
        template.expression(expression)
    except jinja2.TemplateSyntaxError as exc:
        raise ScenarioError(f"{at}: `value: {expression}`: {exc.message}") from None
    save_as = item.get("as")
    if save_as is not None:
        if not isinstance(save_as, str) or not _NAME.match(save_as):
            raise ScenarioError(f"{at}: `as:` takes a name like `queue`, not {_shown(save_as)}")
        names[save_as] = ""  # a value, on no host
    compare = item.get("compare", "exact")
    if not isinstance(compare, str) or compare not in COMPARE_MODES:
        raise ScenarioError(f"{at}: `compare: {_strip_lines(compare)}`; use one of: {', '.join(COMPARE_MODES)}")
    return Step(index, line, "value", save_as=save_as, expression=expression.strip(),
                expect=_expect(item.get("expect"), at) if "expect" in item else None,
                compare=compare, label=str(item.get("label", "")))


def _expect(raw: Any, at: str) -> Expect:
    if isinstance(raw, dict):
        if set(raw) - {"ret", "errno"} or not raw:
            raise ScenarioError(f"{at}: `expect:` is a value, or a mapping with `ret:` or `errno:`")
        errno = raw.get("errno")
        if errno is not None and (not isinstance(errno, str) or not errno.startswith("E")):
            raise ScenarioError(f"{at}: `expect: errno:` takes a name like EADDRINUSE, not {_shown(errno)}")
        return Expect(ret=_strip_lines(raw.get("ret")), errno=errno)
    if isinstance(raw, str) and raw.startswith("E") and raw.isupper():
        return Expect(errno=raw)
    return Expect(ret=_strip_lines(raw))


def _as_int(value: Any) -> Any:
    # At most 20 digits: past Python's digit limit int() raises, and no socket quantity needs more.
    if isinstance(value, str) and re.fullmatch(r"-?\d{1,20}", value.strip()):
        return int(value)
    return value


def _numbers(call: str, args: dict) -> dict:
    """A quoted template (``"{{ port }}"``) renders to a YAML string; where a number belongs, read it as one."""
    out = dict(args)
    for key, kind in CALLS[call].items():
        if key not in out:
            continue
        if kind.rstrip("?") in ("int", "const"):
            out[key] = _as_int(out[key])
        elif kind.rstrip("?") == "addr" and isinstance(out[key], list) and len(out[key]) == 2:
            out[key] = [out[key][0], _as_int(out[key][1])]
    return out


def _check_args(call: str, args: dict, at: str, host: str, names: dict[str, str]) -> None:
    schema = CALLS[call]
    for key in args:
        if key not in schema:
            raise ScenarioError(f"{at}: {call}() takes no argument {key!r}; it takes: {', '.join(schema)}")
    for key, kind in schema.items():
        optional = kind.endswith("?")
        kind = kind.rstrip("?")
        if key not in args:
            if not optional:
                raise ScenarioError(f"{at}: {call}() needs `{key}`")
            continue
        value = args[key]
        problem = _type_problem(kind, value, host, names) or _size_problem(call, key, value)
        if problem:
            raise ScenarioError(f"{at}: {call}() argument {key}: {problem}")


def _size_problem(call: str, key: str, value: Any) -> str | None:
    """What the guest cannot do: buffers past the agent's limit, numbers past 64 bits."""
    if isinstance(value, int) and not isinstance(value, bool) and not -(1 << 63) <= value < (1 << 64):
        return f"{value} does not fit in 64 bits"
    if key in ("length", "data") and call in ("send", "sendto", "sendmsg", "sendfile", "recv", "recvfrom", "recvmsg"):
        size = len(value.encode()) if isinstance(value, str) else value
        if isinstance(size, int) and size > MAX_BUFFER:
            return (f"{size} bytes is more than the guest agent's {MAX_BUFFER >> 20} MiB buffer for one step "
                    "(split it into several steps)")
    return None


def _reference_problem(value: Any, names: dict[str, str]) -> str | None:
    """None when ``value`` is a reference to a name an earlier step set ("" when it is no reference)."""
    match = REFERENCE.match(value) if isinstance(value, str) else None
    if match is None:
        return ""
    if match.group(1) not in names:
        return f"no result named ${match.group(1)} yet (name it earlier with `as: {match.group(1)}`)"
    return None


def _type_problem(kind: str, value: Any, host: str, names: dict[str, str]) -> str | None:
    if kind in ("int", "const", "addr") and (problem := _reference_problem(value, names)) != "":
        return problem
    if kind == "addr" and isinstance(value, list) and len(value) == 2:
        # [ip, $srv.port]: either part may be an earlier result.
        for part in value:
            if (problem := _reference_problem(part, names)) not in ("", None):
                return problem
        if any(_reference_problem(part, names) is None for part in value):
            return None
    if kind == "fd":
        return _fd_problem(value, host, names)
    if kind == "fds":
        if not isinstance(value, list) or not value:
            return f"a list of sockets, not {_shown(value)}"
        for entry in value:
            if (problem := _fd_problem(entry, host, names)):
                return problem
        return None
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            return f"an integer, not {_shown(value)}"
        return None
    if kind == "const":
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            return f"an integer or constant name, not {_shown(value)}"
        if isinstance(value, str):
            from ..model.constants import resolve

            try:
                resolve(value)
            except ValueError as exc:
                return str(exc)
        return None
    if kind == "addr":
        if isinstance(value, str):
            return None
        if (isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)
                and isinstance(value[1], int) and not isinstance(value[1], bool) and 0 <= value[1] <= 65535):
            return None
        return f"[ip, port] with a port 0-65535, or a path; not {_shown(value, 120)}"
    if kind == "str":
        return None if isinstance(value, str) else f"a string, not {_shown(value)}"
    return None


def _fd_problem(value: Any, host: str, names: dict[str, str]) -> str | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return None  # a raw number: lets a scenario ask about a bad fd (EBADF)
    if not isinstance(value, str) or not value.startswith("$"):
        return f"a socket name like $listener, not {_shown(value)}"
    name = value[1:]
    if name not in names:
        return f"no socket named {value} yet (name it earlier with `as: {name}`)"
    if names[name] == "":
        return f"{value} is a value step's result, not a socket"
    if names[name] != host:
        return f"{value} lives on {names[name]}, not on {host}"
    return None


def from_body(name: str, hosts: tuple[str, ...], body: Mapping[str, Any], description: str = "",
              where: str = "<generated>") -> Scenario:
    """A scenario from a body already in memory (a generated program), checked as a file's would be."""
    hosts = tuple(hosts)
    sysctls = {host: dict(settings) for host, settings in (body.get("sysctls") or {}).items()}
    if any(host not in hosts for host in sysctls):
        raise ScenarioError(f"{where}: `sysctls:` maps hosts of the header to settings")
    steps = _steps(list(body.get("steps") or []), where, 1, hosts)
    return Scenario(path=Path(where), name=name, description=description, hosts=hosts, params={},
                    sysctls=sysctls, steps=steps)
