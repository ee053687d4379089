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


def test_a_header_can_name_the_kernels_a_scenario_s_answers_hold_on(tmp_path):
    everywhere = load(write(tmp_path, GOOD))
    assert everywhere.kernels == () and everywhere.holds_on("6.1") and everywhere.holds_on("7.2")
    newer = load(write(tmp_path, GOOD, header='name: t\nhosts: [server, client]\nparams: {port: 7000, n: 2}\n'
                                             'kernels: ["6.12", "7.2"]\n---\n'))
    assert newer.kernels == ("6.12", "7.2")
    assert newer.holds_on("6.12") and newer.holds_on("7.2") and not newer.holds_on("6.1")


@pytest.mark.parametrize("kernels, message", [
    ("[6.12]", r"s.yaml:4: kernels: 6.12 is not a kernel series the model knows; write one of 6.1, 6.12, 7.2, quoted"),
    ('["5.10"]', r"s.yaml:4: kernels: '5.10' is not a kernel series"),
    ('"6.12"', r"s.yaml:4: `kernels:` must be a list"),
])
def test_a_kernels_line_the_model_cannot_use_is_one_clear_error(tmp_path, kernels, message):
    header = f"name: t\nhosts: [server, client]\nparams: {{port: 7000, n: 2}}\nkernels: {kernels}\n---\n"
    with pytest.raises(ScenarioError, match=message):
        load(write(tmp_path, GOOD, header=header))


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


KEYED = """\
steps:
  - {on: server, call: socket, args: {family: AF_INET, type: SOCK_STREAM}, as: l}
  - {on: server, call: bind, args: {fd: $l, addr: [0.0.0.0, {{ port }}]}, label: bind-l}
{% for i in range(n) %}
  - {on: client, call: socket, args: {family: AF_INET, type: "SOCK_STREAM|SOCK_NONBLOCK"}, as: c{{ i }}}
  - {on: client, call: getsockname, args: {fd: $c{{ i }}}, label: name-{{ i }}}
{% endfor %}
"""


def write_key(tmp_path: Path, text: str) -> Path:
    (tmp_path / "key").mkdir(exist_ok=True)
    key = tmp_path / "key" / "s.yaml"
    key.write_text(textwrap.dedent(text))
    return key


def test_the_answer_key_beside_a_scenario_fills_in_its_expects(tmp_path):
    """A lab's scenario holds the calls; key/<file> holds what they return, rendered with the same params."""
    path = write(tmp_path, KEYED)
    assert all(step.expect is None for step in load(path).steps)
    write_key(tmp_path, """\
        # why: nothing listens yet
        bind-l: {{ 0 if port > 1023 else "EACCES" }}
        {% for i in range(n) %}
        name-{{ i }}: [0.0.0.0, 0]
        {% endfor %}
        """)
    steps = load(path).steps
    assert steps[1].expect.ret == 0 and steps[3].expect.ret == ["0.0.0.0", 0] and steps[5].expect.ret == ["0.0.0.0", 0]
    assert load(path, {"port": 80}).steps[1].expect.errno == "EACCES"
    assert [s.index for s in load(path, {"n": 1}).steps if s.expect] == [2, 4]


@pytest.mark.parametrize("key, message", [
    ("bind-x: 0\n", r"key/s.yaml:1: no step of the scenario has the label 'bind-x'; did you mean 'bind-l'\?"),
    ("bind-l: 0\nname-5: 0\n", r"key/s.yaml:2: no step .* 'name-5'"),
    ("- bind-l\n", r"key/s.yaml:1: an answer key maps step labels to what they return"),
    ("bind-l: 0\nbind-l: 1\n", r"key/s.yaml:2.*duplicate key 'bind-l'"),
    ("bind-l: {{ nope }}\n", r"key/s.yaml:1: template: 'nope' is undefined"),
    ("bind-l: {errno: 5}\n", r"key/s.yaml:1: step 2: `expect: errno:` takes a name"),
])
def test_a_bad_answer_key_is_one_clear_error(tmp_path, key, message):
    path = write(tmp_path, KEYED)
    write_key(tmp_path, key)
    with pytest.raises(ScenarioError, match=message):
        load(path)


def test_a_step_answered_twice_is_refused(tmp_path):
    """An answer in both the scenario and its key would let one silently win."""
    path = write(tmp_path, KEYED.replace("label: bind-l}", "label: bind-l, expect: 0}"))
    write_key(tmp_path, "bind-l: 0\n")
    with pytest.raises(ScenarioError, match=r"key/s.yaml:1: step 2 \(bind-l\) has an `expect:` in the scenario too"):
        load(path)


def test_two_steps_with_the_key_s_label_are_refused(tmp_path):
    path = write(tmp_path, KEYED.replace("label: name-{{ i }}", "label: name"))
    write_key(tmp_path, "name: 0\n")
    with pytest.raises(ScenarioError, match=r"key/s.yaml:1: 2 steps of the scenario have the label 'name'"):
        load(path)
