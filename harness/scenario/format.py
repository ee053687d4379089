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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
import jinja2.sandbox
import yaml

from ..errors import SocklabError

# Each call the scenario language knows, with its arguments: name -> kind (a trailing ? = optional).
#   const: an int or constant names ("SOCK_STREAM|SOCK_NONBLOCK");  fd: a $name of an earlier `as:`;
#   addr: [ip, port] or a path;  int, str: as said;  fds: a list of fds;  any: passed through.
CALLS: dict[str, dict[str, str]] = {
    "socket": {"family": "const", "type": "const", "protocol": "const?"},
    "bind": {"fd": "fd", "addr": "addr", "addrlen": "int?"},
    "listen": {"fd": "fd", "backlog": "int"},
    "accept": {"fd": "fd"},
    "accept4": {"fd": "fd", "flags": "const?"},
    "connect": {"fd": "fd", "addr": "addr"},
    "close": {"fd": "fd"},
    "shutdown": {"fd": "fd", "how": "const"},
    "getsockname": {"fd": "fd"},
    "getpeername": {"fd": "fd"},
    "setsockopt": {"fd": "fd", "level": "const", "optname": "const", "value": "const"},
    "getsockopt": {"fd": "fd", "level": "const", "optname": "const"},
    "send": {"fd": "fd", "length": "int?", "data": "str?", "flags": "const?"},
    "sendmsg": {"fd": "fd", "length": "int?", "data": "str?", "flags": "const?"},
    "recv": {"fd": "fd", "length": "int?", "flags": "const?"},
    "recvmsg": {"fd": "fd", "length": "int?", "flags": "const?"},
    "poll": {"fds": "fds", "events": "const?", "timeout": "int?"},
    "epoll_create1": {"flags": "const?"},
    "epoll_ctl": {"epfd": "fd", "op": "const", "fd": "fd", "events": "const?"},
    "epoll_wait": {"epfd": "fd", "maxevents": "int?", "timeout": "int?"},
    "fcntl": {"fd": "fd", "cmd": "const", "arg": "const?"},
    "fstat": {"fd": "fd"},
}
COMPARE_MODES = ("exact", "ok", "errno", "none")
USERS = ("root", "student")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


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

    def describe(self) -> str:
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
        return f"{self.call}({', '.join(parts)})"


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

    @property
    def snapshots(self) -> list[str]:
        return [step.snapshot for step in self.steps if step.kind == "snapshot"]


def sandbox() -> jinja2.sandbox.SandboxedEnvironment:
    """The one template environment: sandboxed, strict about undefined names, no autoescape (YAML, not HTML)."""
    return jinja2.sandbox.SandboxedEnvironment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                                               autoescape=False)


def _split(text: str) -> tuple[str, str, int]:
    """(header, body, line of the first body line) split at the first line that is exactly ``---``."""
    lines = text.splitlines(keepends=True)
    for number, line in enumerate(lines):
        if line.rstrip() == "---" and number > 0:
            return "".join(lines[:number]), "".join(lines[number + 1:]), number + 2
    return "", text, 1


def _yaml(text: str, where: str, line_offset: int, note: str = "") -> Any:
    try:
        return yaml.load(text, Loader=_LineLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = (mark.line + line_offset) if mark else line_offset
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ScenarioError(f"{where}:{line}{note}: malformed YAML: {problem}") from None


class _LineLoader(yaml.SafeLoader):
    """SafeLoader that remembers the line of every mapping as key ``__line__``.

    It also reads booleans as YAML 1.2 does (true/false only): in YAML 1.1 the
    key ``on:`` of every step would be the boolean True.
    """


_LineLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_LineLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                  list("tTfF"))


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode) -> dict:
    mapping = loader.construct_mapping(node, deep=True)
    mapping["__line__"] = node.start_mark.line
    return mapping


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _strip_lines(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_lines(v) for k, v in value.items() if k != "__line__"}
    if isinstance(value, list):
        return [_strip_lines(v) for v in value]
    return value


def parse_params(pairs: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``--param k=v`` values; v is read as YAML, so numbers are numbers and lists are lists."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not _NAME.match(key.strip()):
            raise ScenarioError(f"--param {pair!r}: use name=value, e.g. --param backlog=4")
        try:
            out[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            raise ScenarioError(f"--param {pair!r}: the value is not valid YAML") from None
    return out


def declared_params(path: Path) -> dict[str, Any]:
    """The parameters a scenario's header declares, with their defaults."""
    header_text, _body, _line = _split(path.read_text())
    header = _strip_lines(_yaml(header_text, str(path), 1)) if header_text.strip() else {}
    return dict(header.get("params") or {}) if isinstance(header, dict) else {}


def load(path: Path, overrides: Mapping[str, Any] | None = None, known_hosts: tuple[str, ...] | None = None) -> Scenario:
    """Read, render and check the scenario at ``path``; ``overrides`` replace header params."""
    where = str(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ScenarioError(f"{where}: cannot read the scenario: {exc.strerror}") from None
    header_text, body_text, body_line = _split(text)
    if not header_text.strip():
        raise ScenarioError(f"{where}:1: no `---` line: a scenario is a header (name, hosts, params), "
                            "a line `---`, then the steps")
    header = _strip_lines(_yaml(header_text, where, 1))
    if not isinstance(header, dict):
        raise ScenarioError(f"{where}:1: the header must be a mapping (name, hosts, params)")
    unknown = set(header) - {"name", "description", "hosts", "params"}
    if unknown:
        raise ScenarioError(f"{where}:1: unknown header key(s): {', '.join(sorted(unknown))}")
    params = dict(header.get("params") or {})
    for key in (overrides or {}):
        if key not in params:
            known = ", ".join(sorted(params)) or "none"
            raise ScenarioError(f"--param {key}: {where} has no parameter {key!r} (it has: {known})")
    params.update(overrides or {})
    rendered = render(body_text, params, where, body_line)
    body = _yaml(rendered, where, body_line, " (line of the rendered body)")
    if not isinstance(body, dict) or "steps" not in body:
        raise ScenarioError(f"{where}:{body_line}: the body must be a mapping with `steps:`")
    hosts = tuple(header.get("hosts") or ())
    if not hosts:
        raise ScenarioError(f"{where}:1: the header names no `hosts:`")
    if known_hosts is not None:
        for host in hosts:
            if host not in known_hosts:
                raise ScenarioError(f"{where}:1: host {host!r} is not a VM of this lab ({', '.join(known_hosts)})")
    sysctls = _strip_lines(body.get("sysctls") or {})
    if not isinstance(sysctls, dict) or any(h not in hosts for h in sysctls):
        raise ScenarioError(f"{where}:{body_line}: `sysctls:` maps hosts of the header to settings")
    from ..model.config import DEFAULT_SYSCTLS

    for host, settings in sysctls.items():
        for name in (settings or {}):
            if name not in DEFAULT_SYSCTLS:
                raise ScenarioError(f"{where}:{body_line}: sysctl {name!r} on {host} is not one socklab knows; "
                                    f"known: {', '.join(sorted(DEFAULT_SYSCTLS))}")
    steps = _steps(body["steps"], where, body_line, hosts, _item_lines(rendered))
    return Scenario(path=path, name=str(header.get("name", path.stem)), description=str(header.get("description", "")),
                    hosts=hosts, params=params, sysctls=sysctls, steps=steps)


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
    """Render a template in the sandbox; undefined names and unsafe access become ScenarioErrors."""
    env = sandbox()
    try:
        return env.from_string(text).render(**params)
    except jinja2.TemplateSyntaxError as exc:
        raise ScenarioError(f"{where}:{(exc.lineno or 1) + line_offset - 1}: template syntax: {exc.message}") from None
    except (jinja2.UndefinedError, jinja2.exceptions.SecurityError, TypeError, ValueError, ArithmeticError,
            LookupError, AttributeError) as exc:
        line = _template_line(exc)
        at = f"{where}:{line + line_offset - 1}" if line else where
        if isinstance(exc, jinja2.exceptions.SecurityError):
            raise ScenarioError(f"{at}: template tried something unsafe: {exc}") from None
        if isinstance(exc, jinja2.UndefinedError):
            message = f"{exc.message} (params: {', '.join(sorted(params)) or 'none'})"
        else:  # a KeyError's str() is the repr of its key; its argument reads better
            message = str(exc.args[0] if isinstance(exc, KeyError) and exc.args else exc) or type(exc).__name__
        raise ScenarioError(f"{at}: template: {message}") from None


def _item_lines(rendered: str) -> list[int]:
    """The line of every entry of ``steps:`` in the rendered body, mappings or not (for error messages)."""
    try:
        root = yaml.compose(rendered, Loader=_LineLoader)
    except yaml.YAMLError:
        return []
    for key, value in getattr(root, "value", []):
        if getattr(key, "value", None) == "steps" and isinstance(value, yaml.SequenceNode):
            return [item.start_mark.line for item in value.value]
    return []


def _steps(raw: Any, where: str, line_offset: int, hosts: tuple[str, ...],
           item_lines: list[int] | None = None) -> tuple[Step, ...]:
    if not isinstance(raw, list):
        raise ScenarioError(f"{where}:{line_offset}: `steps:` must be a list")
    names: dict[str, str] = {}  # socket name -> host it lives on
    steps = []
    for index, item in enumerate(raw, start=1):
        if item_lines and len(item_lines) == len(raw):
            line = item_lines[index - 1] + line_offset
        else:
            line = (item.get("__line__", 0) if isinstance(item, dict) else 0) + line_offset
        at = f"{where}:{line}: step {index}"
        if not isinstance(item, dict):
            raise ScenarioError(f"{at}: a step is a mapping, not {item!r}")
        item = {k: v for k, v in item.items() if k != "__line__"}
        if "sleep" in item:
            seconds = item["sleep"]
            if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 <= seconds <= 60:
                raise ScenarioError(f"{at}: `sleep:` takes 0 to 60 seconds, not {seconds!r}")
            steps.append(Step(index, line, "sleep", seconds=float(seconds)))
            continue
        if "snapshot" in item:
            name = item["snapshot"]
            if not isinstance(name, str) or not _NAME.match(name):
                raise ScenarioError(f"{at}: `snapshot:` takes a name like `before`, not {name!r}")
            steps.append(Step(index, line, "snapshot", snapshot=name))
            continue
        steps.append(_call_step(item, index, line, at, hosts, names))
    return tuple(steps)


def _call_step(item: dict, index: int, line: int, at: str, hosts: tuple[str, ...], names: dict[str, str]) -> Step:
    unknown = set(item) - {"on", "call", "args", "as", "user", "expect", "compare", "label"}
    if unknown:
        raise ScenarioError(f"{at}: unknown key(s) {', '.join(sorted(unknown))}")
    host, call = item.get("on"), item.get("call")
    if host not in hosts:
        raise ScenarioError(f"{at}: `on: {host}` is not one of the scenario's hosts ({', '.join(hosts)})")
    if call not in CALLS:
        raise ScenarioError(f"{at}: unknown call {call!r}; known: {', '.join(CALLS)}")
    args = _strip_lines(item.get("args") or {})
    if not isinstance(args, dict):
        raise ScenarioError(f"{at}: `args:` must be a mapping")
    args = _numbers(call, args)
    _check_args(call, args, at, host, names)
    user = item.get("user", "root")
    if user not in USERS:
        raise ScenarioError(f"{at}: `user: {user}`; steps run as one of: {', '.join(USERS)}")
    save_as = item.get("as")
    if save_as is not None:
        if not isinstance(save_as, str) or not _NAME.match(save_as):
            raise ScenarioError(f"{at}: `as:` takes a socket name like `listener`, not {save_as!r}")
        names[save_as] = host
    compare = item.get("compare", "exact")
    if compare not in COMPARE_MODES:
        raise ScenarioError(f"{at}: `compare: {compare}`; use one of: {', '.join(COMPARE_MODES)}")
    return Step(index, line, "call", host=host, call=call, args=args, user=user, save_as=save_as,
                expect=_expect(item.get("expect"), at) if "expect" in item else None,
                compare=compare, label=str(item.get("label", "")))


def _expect(raw: Any, at: str) -> Expect:
    if isinstance(raw, dict):
        raw = {k: v for k, v in raw.items() if k != "__line__"}
        if set(raw) - {"ret", "errno"} or not raw:
            raise ScenarioError(f"{at}: `expect:` is a value, or a mapping with `ret:` or `errno:`")
        errno = raw.get("errno")
        if errno is not None and (not isinstance(errno, str) or not errno.startswith("E")):
            raise ScenarioError(f"{at}: `expect: errno:` takes a name like EADDRINUSE, not {errno!r}")
        return Expect(ret=_strip_lines(raw.get("ret")), errno=errno)
    if isinstance(raw, str) and raw.startswith("E") and raw.isupper():
        return Expect(errno=raw)
    return Expect(ret=_strip_lines(raw))


def _as_int(value: Any) -> Any:
    if isinstance(value, str) and re.fullmatch(r"-?\d+", value.strip()):
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
        problem = _type_problem(kind, value, host, names)
        if problem:
            raise ScenarioError(f"{at}: {call}() argument {key}: {problem}")


def _type_problem(kind: str, value: Any, host: str, names: dict[str, str]) -> str | None:
    if kind == "fd":
        return _fd_problem(value, host, names)
    if kind == "fds":
        if not isinstance(value, list) or not value:
            return f"a list of sockets, not {value!r}"
        for entry in value:
            if (problem := _fd_problem(entry, host, names)):
                return problem
        return None
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            return f"an integer, not {value!r}"
        return None
    if kind == "const":
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            return f"an integer or constant name, not {value!r}"
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
        return f"[ip, port] with a port 0-65535, or a path; not {value!r}"
    if kind == "str":
        return None if isinstance(value, str) else f"a string, not {value!r}"
    return None


def _fd_problem(value: Any, host: str, names: dict[str, str]) -> str | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return None  # a raw number: lets a scenario ask about a bad fd (EBADF)
    if not isinstance(value, str) or not value.startswith("$"):
        return f"a socket name like $listener, not {value!r}"
    name = value[1:]
    if name not in names:
        return f"no socket named {value} yet (name it earlier with `as: {name}`)"
    if names[name] != host:
        return f"{value} lives on {names[name]}, not on {host}"
    return None
