"""Tracing without a VM: the function_graph parser on recorded output, trees, citations, options, the runner's use of them."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from harness.guest.client import GUEST_AGENT
from harness.scenario.compare import Outcome
from harness.scenario.format import ScenarioError, load
from harness.scenario.runner import ModelBackend, run
from harness.guest.trace import (
    Call,
    Citation,
    KernelTrace,
    ProgramTrace,
    TraceError,
    TraceOptions,
    check_citation,
    check_depth,
)
from tests.unit.fakes import QuietBackend

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "trace"


@pytest.fixture(scope="module")
def guest():
    """The guest agent's module, imported as the guest runs it (stdlib only)."""
    spec = importlib.util.spec_from_file_location("socklab_guest_agent", GUEST_AGENT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def parsed(guest, name: str, noise: bool = True) -> KernelTrace:
    text = (FIXTURES / name).read_text()
    calls = guest.parse_function_graph(text, guest.glob_regex(guest.TRACE_NOISE) if noise else None)
    return KernelTrace.of({"calls": calls, "depth": 6})


def test_the_parser_nests_by_braces_and_keeps_each_functions_time(guest):
    trace = parsed(guest, "listen-tcp-udp.txt", noise=False)
    assert trace.roots == ["__x64_sys_listen", "__x64_sys_listen"]
    assert trace.path_to("inet_bind_hash") == ["__x64_sys_listen", "__sys_listen", "inet_listen",
                                               "inet_csk_listen_start", "inet_csk_get_port", "inet_bind_hash"]
    first = trace.calls[0]
    assert first == Call(0, "__x64_sys_listen", 1908.05)  # a function's time is on its closing brace
    assert Call(4, "__fget_light", 45.899) in trace.calls  # a leaf's on its own line


def test_noise_is_dropped_with_everything_below_it(guest):
    trace = parsed(guest, "listen-tcp-udp.txt")
    assert not {"lock_sock_nested", "__cond_resched", "_raw_spin_lock_bh", "release_sock", "tcp_release_cb",
                "__local_bh_enable_ip", "_raw_spin_unlock"} & trace.names
    assert trace.path_to("dst_release") == ["__x64_sys_listen", "__sys_listen", "inet_listen",
                                            "inet_csk_listen_start", "dst_release"]


def test_the_udp_listen_reaches_sock_no_listen_and_not_inet_listen(guest):
    trace = parsed(guest, "listen-tcp-udp.txt")
    udp = trace.calls[next(i for i, c in enumerate(trace.calls) if c.depth == 0 and i > 0):]
    names = [call.name for call in udp]
    assert "sock_no_listen" in names and "inet_listen" not in names


def test_lines_that_are_not_calls_are_skipped(guest):
    text = ("# tracer: function_graph\n CPU:0 [LOST 12 EVENTS]\n ------------------------------------------\n"
            " 0)               |  __x64_sys_close() {\n 0)   1.0 us    |    close_fd();\n 0)   2.0 us    |  }\n")
    assert guest.parse_function_graph(text) == [[0, "__x64_sys_close", 2.0], [1, "close_fd", 1.0]]


def test_full_tree_marks_the_cited_function_and_compact_lists_the_last_level_inline(guest):
    trace = parsed(guest, "listen-tcp-udp.txt")
    full = trace.tree("inet_csk_listen_start")
    assert "      inet_csk_listen_start  553.0 us  <== model" in full
    compact = trace.compact("inet_csk_listen_start", levels=4)
    assert "      [bold]inet_csk_listen_start[/] → reqsk_queue_alloc, inet_sk_state_store, inet_csk_get_port" in compact
    assert "inet_bind_hash" not in compact  # depth 5: below what the terminal shows
    deep = trace.compact("inet_bind_hash", levels=2)
    assert deep.splitlines()[-1].endswith("inet_csk_get_port → [bold]inet_bind_hash[/]")  # the cited path, always


@pytest.mark.parametrize("kernel_fn, traceable, same, status", [
    ("inet_csk_listen_start", {}, True, "on the path"),
    ("sock_map_fd", {"sock_map_fd": False}, True, "not traceable"),
    ("inet_csk_accept", {"inet_csk_accept": True}, True, "beyond the depth"),
    ("inet_csk_accept", {"inet_csk_accept": True}, False, "another outcome"),
    ("model", {}, True, "not a function"),
])
def test_a_citation_is_on_the_path_untraceable_beyond_the_depth_or_for_another_outcome(guest, kernel_fn, traceable,
                                                                                       same, status):
    trace = parsed(guest, "listen-tcp-udp.txt")
    trace = KernelTrace(trace.calls, 6, traceable)
    citation = check_citation(trace, kernel_fn, same_outcome=same)
    assert citation.status == status and not citation.model_bug
    assert kernel_fn in citation.describe() or kernel_fn == "model"


def test_a_traceable_citation_missing_from_a_complete_graph_is_a_model_bug(guest):
    trace = KernelTrace((Call(0, "__x64_sys_listen"), Call(1, "__sys_listen"), Call(2, "sock_no_listen")), 6,
                        {"inet_listen": True})
    citation = check_citation(trace, "inet_listen")
    assert citation == Citation("inet_listen", "not on the path") and citation.model_bug
    assert "NOT on the path" in citation.describe()


@pytest.mark.parametrize("value, expected", [
    (True, TraceOptions()), (False, None), (None, None),
    ({"depth": 9}, TraceOptions(depth=9)), ({"function": "inet_csk_accept"}, TraceOptions(function="inet_csk_accept")),
])
def test_trace_options_from_a_steps_trace_key(value, expected):
    assert TraceOptions.of(value) == expected


@pytest.mark.parametrize("value, message", [
    ({"depth": 0}, "out of range: use 1..20"), ({"depth": 21}, "out of range"), ({"depth": "six"}, "out of range"),
    ({"function": "a b"}, "not a kernel function name"), ({"colour": 1}, "unknown key"), ("yes", "true, false or"),
])
def test_bad_trace_options_are_refused_in_one_sentence(value, message):
    with pytest.raises(TraceError, match=message):
        TraceOptions.of(value, "here")


def test_a_depth_given_as_text_on_the_command_line_is_read():
    assert check_depth("8") == 8


def test_a_scenario_step_takes_a_trace_key(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("name: t\nhosts: [server]\n---\nsteps:\n"
                    "  - {on: server, call: socket, args: {family: AF_INET, type: SOCK_DGRAM}, as: u, trace: true}\n"
                    "  - {on: server, call: listen, args: {fd: $u, backlog: 1}, trace: {depth: 3}}\n"
                    "  - {on: server, call: close, args: {fd: $u}}\n")
    steps = load(path).steps
    assert [step.trace for step in steps] == [TraceOptions(), TraceOptions(depth=3), None]
    path.write_text(path.read_text().replace("depth: 3", "depth: 30"))
    with pytest.raises(ScenarioError, match=r"s\.yaml:6: step 2: trace depth 30 is out of range"):
        load(path)


class TracedKernel(QuietBackend):
    """A kernel backend that answers like the guest (UDP listen: EOPNOTSUPP) and records what it was asked to trace."""

    def __init__(self, trace: KernelTrace) -> None:
        self.trace = trace
        self.traced: list[tuple[str, object, list[str]]] = []

    def call(self, host, user, op, args):
        return Outcome(ret=3) if op == "socket" else Outcome(ret=-1, errno="EOPNOTSUPP") if op == "listen" \
            else Outcome(ret=0)

    def call_traced(self, host, user, op, args, options, functions):
        self.traced.append((op, options, functions))
        outcome = self.call(host, user, op, args)
        return Outcome(ret=outcome.ret, errno=outcome.errno, extra={"trace": self.trace})


def test_the_runner_traces_the_steps_that_ask_and_checks_the_models_citation(tmp_path, guest):
    path = tmp_path / "s.yaml"
    path.write_text("name: t\nhosts: [server]\n---\nsteps:\n"
                    "  - {on: server, call: socket, args: {family: AF_INET, type: SOCK_DGRAM}, as: u}\n"
                    "  - {on: server, call: listen, args: {fd: $u, backlog: 1}, trace: true}\n")
    scenario = load(path)
    kernel = TracedKernel(parsed(guest, "listen-tcp-udp.txt"))
    result = run(scenario, kernel, ModelBackend(scenario))
    assert [op for op, _, _ in kernel.traced] == ["listen"]
    assert kernel.traced[0][2] == ["sock_no_listen"]  # the model ran first: its citation is looked for
    listen = result.records[1]
    assert listen.verdict.ok and listen.citation.status == "on the path"
    assert result.records[0].trace is None


def test_with_trace_for_all_every_call_step_is_traced(tmp_path, guest):
    path = tmp_path / "s.yaml"
    path.write_text("name: t\nhosts: [server]\n---\nsteps:\n"
                    "  - {on: server, call: socket, args: {family: AF_INET, type: SOCK_DGRAM}, as: u}\n"
                    "  - sleep: 0\n"
                    "  - {on: server, call: listen, args: {fd: $u, backlog: 1}}\n")
    scenario = load(path)
    kernel = TracedKernel(parsed(guest, "listen-tcp-udp.txt"))
    run(scenario, kernel, ModelBackend(scenario), trace=TraceOptions(depth=4))
    assert [(op, options.depth) for op, options, _ in kernel.traced] == [("socket", 4), ("listen", 4)]


def test_a_programs_trace_keeps_only_the_trees_about_sockets():
    calls = (Call(0, "__x64_sys_newfstatat"), Call(1, "vfs_getattr_nosec"),
             Call(0, "__x64_sys_socket"), Call(1, "__sys_socket"),
             Call(0, "__x64_sys_read"), Call(1, "sock_read_iter"),
             Call(0, "__x64_sys_read"), Call(1, "__fdget_pos"))
    program = ProgramTrace("server", ("prog",), 0, "", KernelTrace(calls))
    assert program.socket_calls().roots == ["__x64_sys_socket", "__x64_sys_read"]
    assert program.syscalls() == ["__x64_sys_newfstatat", "__x64_sys_socket", "__x64_sys_read", "__x64_sys_read"]
