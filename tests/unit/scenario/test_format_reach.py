"""What the scenario format can say: sysctl reads, explicit families and lengths, destinations, results of
earlier steps, loops until an errno, and snapshot contents; each run on the model and on a replayed kernel."""

from __future__ import annotations

import textwrap

import pytest

from harness.scenario.compare import Outcome
from harness.scenario.format import ScenarioError, load
from harness.scenario.runner import (
    UNSET,
    ModelBackend,
    UnsetReference,
    resolve_reference,
    run,
)
from tests.unit.fakes import QuietBackend

HEADER = "name: reach\nhosts: [server, client]\n---\n"


def scenario_of(tmp_path, body: str):
    path = tmp_path / "reach.yaml"
    path.write_text(HEADER + textwrap.dedent(body))
    return load(path)


def model_run(tmp_path, body: str):
    scenario = scenario_of(tmp_path, body)
    return run(scenario, None, ModelBackend(scenario))


class Replay(QuietBackend):
    """A kernel side answering from a list, recording the arguments it was given."""

    def __init__(self, outcomes):
        self.outcomes = list(outcomes)
        self.calls = []

    def call(self, host, user, op, args):
        self.calls.append((host, op, dict(args)))
        return self.outcomes.pop(0)


def test_a_sysctl_read_is_a_step_that_both_sides_answer(tmp_path):
    result = model_run(tmp_path, """\
        sysctls: {server: {net.core.somaxconn: 64}}
        steps:
          - {on: server, call: sysctl_get, args: {name: net.core.somaxconn}, expect: 64}
          - {on: server, call: sysctl_get, args: {name: net.ipv4.ip_local_port_range}, expect: [32768, 60999]}
          - {on: server, call: sysctl_get, args: {name: net.core.no_such_thing}, expect: ENOENT}
        """)
    assert result.ok, [r.verdict for r in result.records]


def test_bind_takes_an_explicit_family_and_connect_an_addrlen(tmp_path):
    result = model_run(tmp_path, """\
        steps:
          - {on: server, call: socket, args: {family: AF_INET, type: SOCK_STREAM}, as: s}
          - {on: server, call: bind, args: {fd: $s, addr: [0.0.0.0, 7000], family: AF_INET6}, expect: EAFNOSUPPORT}
          - {on: server, call: connect, args: {fd: $s, addr: [198.51.100.1, 7000], addrlen: 8}, expect: EINVAL}
        """)
    assert result.ok, [r.verdict.problems for r in result.records]


def test_setsockopt_takes_an_optlen(tmp_path):
    result = model_run(tmp_path, """\
        steps:
          - {on: server, call: socket, args: {family: AF_INET, type: SOCK_STREAM}, as: s}
          - {on: server, call: setsockopt, args: {fd: $s, level: SOL_SOCKET, optname: SO_REUSEADDR, value: 1, optlen: 2}, expect: EINVAL}
          - {on: server, call: getsockopt, args: {fd: $s, level: SOL_SOCKET, optname: SO_REUSEADDR, optlen: 4}, expect: 0}
        """)
    assert result.ok, [r.verdict.problems for r in result.records]


def test_send_and_sendmsg_take_a_destination(tmp_path):
    result = model_run(tmp_path, """\
        steps:
          - {on: server, call: socket, args: {family: AF_INET, type: SOCK_DGRAM}, as: r}
          - {on: server, call: bind, args: {fd: $r, addr: [0.0.0.0, 5000]}}
          - {on: client, call: socket, args: {family: AF_INET, type: SOCK_DGRAM}, as: u}
          - {on: client, call: sendto, args: {fd: $u, length: 10, addr: [198.51.100.2, 5000]}, expect: 10}
          - {on: client, call: sendmsg, args: {fd: $u, length: 7, addr: [198.51.100.2, 5000]}, expect: 7}
          - {on: client, call: send, args: {fd: $u, length: 7}, expect: EDESTADDRREQ}
          - {on: server, call: recvfrom, args: {fd: $r}, expect: 10}
        """)
    assert result.ok, [r.verdict.problems for r in result.records]


def test_a_port_from_getsockname_feeds_a_later_connect_on_another_host(tmp_path):
    body = """\
        steps:
          - {on: server, call: socket, args: {family: AF_INET, type: SOCK_STREAM}, as: l}
          - {on: server, call: listen, args: {fd: $l, backlog: 4}}
          - {on: server, call: getsockname, args: {fd: $l}, as: where}
          - {on: client, call: socket, args: {family: AF_INET, type: SOCK_STREAM}, as: c}
          - {on: client, call: connect, args: {fd: $c, addr: [198.51.100.2, $where.port]}, expect: 0}
          - {on: client, call: getpeername, args: {fd: $c}, as: peer}
          - {on: client, call: connect, args: {fd: $c, addr: $peer}, expect: EISCONN}
        """
    result = model_run(tmp_path, body)
    assert result.ok, [r.verdict.problems for r in result.records]
    # Each side uses its own answer: the kernel's ephemeral port is not the model's.
    scenario = scenario_of(tmp_path, body)
    kernel = Replay([Outcome(3), Outcome(0), Outcome(["0.0.0.0", 45111]), Outcome(3), Outcome(0),
                     Outcome(["198.51.100.2", 45111]), Outcome(-1, "EISCONN")])
    result = run(scenario, kernel, ModelBackend(scenario))
    assert kernel.calls[4][2]["addr"] == ("198.51.100.2", 45111)
    assert result.records[4].model.ret == 0 and result.ok


def test_a_reference_to_a_result_one_side_never_produced_skips_the_step_there(tmp_path):
    scenario = scenario_of(tmp_path, """\
        steps:
          - {on: server, call: socket, args: {family: AF_INET, type: SOCK_STREAM}, as: l}
          - {on: server, call: getsockname, args: {fd: $l}, as: where}
          - {on: client, call: socket, args: {family: AF_INET, type: SOCK_STREAM}, as: c}
          - {on: client, call: connect, args: {fd: $c, addr: [198.51.100.2, $where.port]}}
        """)
    kernel = Replay([Outcome(3), Outcome(-1, "EBADF"), Outcome(3)])
    result = run(scenario, kernel, ModelBackend(scenario))
    assert result.records[3].kernel.errno == UNSET and len(kernel.calls) == 3
    assert not result.records[3].verdict.ok


def test_references_reach_into_addresses_lists_and_mappings():
    values = {"a": ("198.51.100.2", 7000), "m": {"calls": 3}, "n": 5}
    assert resolve_reference("$a.port", values) == 7000
    assert resolve_reference("$a.ip", values) == "198.51.100.2"
    assert resolve_reference("$a[1]", values) == 7000
    assert resolve_reference("$m.calls", values) == 3
    assert resolve_reference("$n", values) == 5
    for bad in ("$a.nope", "$n.port", "$zz", "$a[7]"):
        with pytest.raises(UnsetReference):
            resolve_reference(bad, values)


def test_a_send_until_eagain_loops_in_one_step(tmp_path):
    result = model_run(tmp_path, """\
        steps:
          - {on: server, call: socket, args: {family: AF_UNIX, type: SOCK_DGRAM}, as: r}
          - {on: server, call: bind, args: {fd: $r, addr: "@fz"}}
          - {on: server, call: socket, args: {family: AF_UNIX, type: "SOCK_DGRAM|SOCK_NONBLOCK"}, as: w}
          - {on: server, call: connect, args: {fd: $w, addr: "@fz"}}
          - {on: server, call: send, args: {fd: $w, length: 1}, until: EAGAIN, max: 100, as: filled, label: fill}
          - {on: server, call: recv, args: {fd: $r, flags: MSG_DONTWAIT}, until: EAGAIN, max: 100, label: drain}
        """)
    assert result.ok, [r.verdict.problems for r in result.records]
    fill = result.record("fill").model.ret
    # unix_recvq_full() is `>`: max_dgram_qlen (10) + 1 datagrams fit.
    assert fill == {"calls": 11, "total": 11, "stopped": "EAGAIN"}
    assert result.record("drain").model.ret == {"calls": 11, "total": 11, "stopped": "EAGAIN"}


def test_a_loop_that_stops_for_another_reason_disagrees_with_one_that_reached_its_errno(tmp_path):
    scenario = scenario_of(tmp_path, """\
        steps:
          - {on: server, call: socket, args: {family: AF_INET, type: "SOCK_DGRAM|SOCK_NONBLOCK"}, as: u}
          - {on: server, call: recv, args: {fd: $u}, until: EAGAIN, max: 3}
        """)
    kernel = Replay([Outcome(3), Outcome(0), Outcome(0), Outcome(0)])
    result = run(scenario, kernel, ModelBackend(scenario))
    assert result.records[1].kernel.ret == {"calls": 3, "total": 0, "stopped": "max"}
    assert result.records[1].model.ret["stopped"] == "EAGAIN"
    assert "loop stopped by max on the kernel, EAGAIN on the model" in result.records[1].verdict.problems[0]


def test_a_value_step_reads_a_snapshot_and_feeds_a_later_argument(tmp_path):
    result = model_run(tmp_path, """\
        sysctls: {server: {net.core.somaxconn: 8}}
        steps:
          - snapshot: before
          - {value: before.server.sysctls.somaxconn, as: somax, expect: 8}
          - {on: server, call: socket, args: {family: AF_INET, type: SOCK_STREAM}, as: l}
          - {on: server, call: listen, args: {fd: $l, backlog: $somax}, expect: 0}
          - snapshot: listening
          - {value: listening.server.listener(32768) is none, compare: none}
        """)
    assert result.ok, [r.verdict.problems for r in result.records]
    assert result.records[1].model.ret == 8


@pytest.mark.parametrize("body, message", [
    ("  - {on: server, call: send, args: {fd: 3, length: 1}, until: again}\n", "`until:` takes an errno name"),
    ("  - {on: server, call: send, args: {fd: 3, length: 1}, until: EAGAIN, max: 0}\n", "`max:` takes 1 to 100000"),
    ("  - {on: server, call: send, args: {fd: 3, length: 1}, max: 5}\n", "`max:` only bounds a step with `until:`"),
    ("  - {on: server, call: listen, args: {fd: 3, backlog: $nothing}}\n", "no result named $nothing yet"),
    ("  - {on: client, call: connect, args: {fd: 3, addr: [198.51.100.2, $gone.port]}}\n", "no result named $gone"),
    ("  - {value: \"a.(\"}\n", "`value: a.(`"),
    ("  - {value: x, on: server}\n", "unknown key 'on' for a value step"),
    ("  - {value: x, as: v}\n  - {on: server, call: close, args: {fd: $v}}\n", "$v is a value step's result"),
])
def test_the_new_keys_are_checked_before_any_vm_is_touched(tmp_path, body, message):
    with pytest.raises(ScenarioError) as error:
        scenario_of(tmp_path, "steps:\n" + body)
    assert message in str(error.value)


def test_the_model_answer_a_settling_poll_waits_for_names_unset_ones_too(tmp_path):
    from harness.scenario.batch import wanted

    scenario = scenario_of(tmp_path, """\
        steps:
          - {on: server, call: socket, args: {family: AF_INET, type: SOCK_DGRAM}, as: u}
          - {on: server, call: accept, args: {fd: $u}, as: never}
          - {on: server, call: poll, args: {fds: [$u, $never, 7], events: POLLOUT}, compare: eventually}
        """)
    result = run(scenario, None, ModelBackend(scenario))
    poll = result.records[2]
    # POLLOUT for the socket, nothing for -1 (the unset name: poll ignores negative fds), POLLNVAL for 7.
    assert wanted(poll.step, poll.model) == {"revents": [4, 0, 0x20]}
