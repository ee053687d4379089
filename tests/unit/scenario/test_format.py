"""The scenario language: rendering, validation, and errors that name the file, line and step."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from harness.scenario.format import ScenarioError, declared_params, load, parse_params

HEADER = """\
name: t
hosts: [server, client]
params: {port: 7000, n: 2}
---
"""


def write(tmp_path: Path, body: str, header: str = HEADER) -> Path:
    path = tmp_path / "s.yaml"
    path.write_text(header + textwrap.dedent(body))
    return path


GOOD = """\
steps:
  - {on: server, call: socket, args: {family: AF_INET, type: SOCK_STREAM}, as: l}
  - {on: server, call: bind, args: {fd: $l, addr: [0.0.0.0, {{ port }}]}, expect: 0}
{% for i in range(n) %}
  - {on: client, call: socket, args: {family: AF_INET, type: "SOCK_STREAM|SOCK_NONBLOCK"}, as: c{{ i }}}
{% endfor %}
  - sleep: 0.5
  - snapshot: after
"""


def test_a_good_scenario_renders_loops_and_params(tmp_path):
    scenario = load(write(tmp_path, GOOD))
    assert [s.kind for s in scenario.steps] == ["call", "call", "call", "call", "sleep", "snapshot"]
    assert scenario.steps[1].args == {"fd": "$l", "addr": ["0.0.0.0", 7000]}
    assert scenario.steps[1].expect.ret == 0
    assert scenario.snapshots == ["after"]


def test_params_can_be_overridden(tmp_path):
    scenario = load(write(tmp_path, GOOD), {"n": 4, "port": 7100})
    assert sum(s.call == "socket" for s in scenario.steps) == 5
    assert scenario.steps[1].args["addr"] == ["0.0.0.0", 7100]


def test_quoted_numbers_become_numbers(tmp_path):
    body = 'steps:\n  - {on: server, call: socket, args: {family: AF_INET, type: SOCK_STREAM}, as: l}\n' \
           '  - {on: server, call: listen, args: {fd: $l, backlog: "-1"}}\n'
    assert load(write(tmp_path, body)).steps[1].args["backlog"] == -1


def test_on_is_a_key_not_a_boolean(tmp_path):
    assert load(write(tmp_path, GOOD)).steps[0].host == "server"


def test_errno_shorthand(tmp_path):
    body = GOOD.replace("expect: 0", "expect: EADDRINUSE")
    assert load(write(tmp_path, body)).steps[1].expect.errno == "EADDRINUSE"


@pytest.mark.parametrize("body,message", [
    ("steps:\n  - {on: server, call: socket, args: {family: AF_INET, type: SOCK_STREAM}\n", r"s.yaml:\d+ \(line of the rendered body\): malformed YAML"),
    ("steps:\n  - {on: server, call: sockit, args: {}}\n", r"s.yaml:6: step 1: unknown call 'sockit'"),
    ("steps:\n  - {on: router, call: close, args: {fd: 3}}\n", r"step 1: `on: router` is not one of the scenario's hosts"),
    ("steps:\n  - {on: server, call: close, args: {fd: $nope}}\n", r"step 1: close\(\) argument fd: no socket named \$nope yet"),
    ("steps:\n  - {on: server, call: listen, args: {fd: 3, backlog: lots}}\n", r"argument backlog: an integer, not 'lots'"),
    ("steps:\n  - {on: server, call: socket, args: {family: AF_NOPE, type: 1}}\n", r"argument family: unknown constant 'AF_NOPE'"),
    ("steps:\n  - {on: server, call: bind, args: {fd: 3, addr: [1.2.3.4, 70000]}}\n", r"argument addr: \[ip, port\] with a port 0-65535"),
    ("steps:\n  - {on: server, call: close, args: {fd: 3, force: true}}\n", r"close\(\) takes no argument 'force'"),
    ("steps:\n  - {on: server, call: close}\n", r"close\(\) needs `fd`"),
    ("steps:\n  - {on: server, call: close, args: {fd: 3}, user: admin}\n", r"`user: admin`"),
    ("steps:\n  - sleep: forever\n", r"`sleep:` takes 0 to 60 seconds"),
    ("steps:\n  - {on: server, call: close, args: {fd: 3}, compare: fuzzy}\n", r"`compare: fuzzy`"),
    ("steps:\n  - {on: server, call: close, args: {fd: {{ undefined_thing }}}}\n", r"template: 'undefined_thing' is undefined"),
    ("steps:\n  - {on: server, call: close, args: {fd: {{ ''.__class__.__mro__ }}}}\n", r"unsafe|undefined"),
    ("steps:\n  {% for %}\n", r"s.yaml:6: template syntax"),
    ("nosteps: []\n", r"the body must be a mapping with `steps:`"),
])
def test_bad_scenarios_are_one_clear_error(tmp_path, body, message):
    with pytest.raises(ScenarioError, match=message):
        load(write(tmp_path, body))


def test_socket_names_belong_to_their_host(tmp_path):
    body = GOOD + "  - {on: client, call: close, args: {fd: $l}}\n"
    with pytest.raises(ScenarioError, match=r"\$l lives on server, not on client"):
        load(write(tmp_path, body))


def test_unknown_override_names_the_params(tmp_path):
    with pytest.raises(ScenarioError, match=r"--param backlog: .* has no parameter 'backlog' \(it has: n, port\)"):
        load(write(tmp_path, GOOD), {"backlog": 3})


def test_hosts_must_exist_in_the_lab(tmp_path):
    with pytest.raises(ScenarioError, match="host 'client' is not a VM of this lab"):
        load(write(tmp_path, GOOD), known_hosts=("server",))


def test_missing_file(tmp_path):
    with pytest.raises(ScenarioError, match="cannot read the scenario"):
        load(tmp_path / "absent.yaml")


@pytest.mark.parametrize("pairs,expected", [
    (["backlog=4"], {"backlog": 4}),
    (["name=abc", "ratio=0.5"], {"name": "abc", "ratio": 0.5}),
    (["sizes=[1, 2]"], {"sizes": [1, 2]}),
])
def test_param_values_are_yaml(pairs, expected):
    assert parse_params(pairs) == expected


@pytest.mark.parametrize("bad", ["backlog", "=3", "bad name=1", "x=[1,"])
def test_bad_param_syntax(bad):
    with pytest.raises(ScenarioError, match="--param"):
        parse_params([bad])


def test_declared_params(tmp_path):
    assert declared_params(write(tmp_path, GOOD)) == {"port": 7000, "n": 2}
