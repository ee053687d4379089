"""Tracing on the live guests: the kernel's graphs of lab steps, the model's citations against them, and tracefs put back."""

from __future__ import annotations

import time

import pytest

from harness.guest.client import Agent
from harness.lab.status import markdown
from harness.scenario.check import LabSpec, check, known_labs
from harness.scenario.format import load
from harness.scenario.live import LabBackend
from harness.paths import REPO_ROOT
from harness.guest.trace import TraceError, TraceOptions

pytestmark = pytest.mark.vm

# Deep enough that "not within the traced depth" does not hide a wrong citation on these paths.
CITATION_DEPTH = 14
TRACEFS_FILES = ("current_tracer", "set_ftrace_pid", "set_graph_function", "max_graph_depth", "tracing_on",
                 "options/funcgraph-irqs", "options/function-fork")


def tracefs_state(lab, vm: str = "server") -> str:
    """What tracefs holds on ``vm`` (or that it is not mounted), as one comparable text."""
    files = " ".join(f"/sys/kernel/tracing/{name}" for name in TRACEFS_FILES)
    command = (f"if [ -e /sys/kernel/tracing/current_tracer ]; then for f in {files}; do echo \"$f: $(cat $f)\"; done;"
               " echo filter: $(wc -l < /sys/kernel/tracing/set_ftrace_filter); else echo not mounted; fi")
    return lab.ssh(vm).run(command, timeout=30, check=True).stdout


@pytest.fixture(scope="module")
def traced_check(lab):
    """``traced_check(name)``: the lab's check, traced at CITATION_DEPTH, run once per lab and worker.

    Returns (tracefs before, the report, tracefs after). The citation test of 03-listen and the
    backlog test read the same run: that check runs backlog.yaml traced, as the backlog test did on its own.
    """
    reports: dict[str, tuple[str, object, str]] = {}

    def run(name: str):
        if name not in reports:
            before = tracefs_state(lab)
            report = check(LabSpec.load(name), lab, trace=TraceOptions(depth=CITATION_DEPTH))
            reports[name] = (before, report, tracefs_state(lab))
        return reports[name]

    return run


# One xdist group: the backlog test and 03-listen's citation test share one traced check of the lab.
@pytest.mark.xdist_group("trace-03-listen")
def test_backlog_trace_shows_inet_csk_listen_start_for_tcp_and_sock_no_listen_for_udp(traced_check):
    """The kernel's graphs of backlog.yaml's listen() steps, from 03-listen's traced check.

    The same scenario at the default depth is the guide's `invoke lab.run labs/03-listen/backlog.yaml
    --trace` block (tests/live/test_guides.py), which must show both functions.
    """
    _, report, _ = traced_check("03-listen")
    result = next(run for run in report.runs if run.scenario.path.name == "backlog.yaml")
    assert result.ok, result.error
    tcp_listen = next(r for r in result.records if r.step.call == "listen" and r.step.args["fd"] == "$listener")
    udp_listen = result.record("udp-listen")
    assert tcp_listen.trace.path_to("inet_csk_listen_start")[:3] == ["__x64_sys_listen", "__sys_listen", "inet_listen"]
    assert "sock_no_listen" in udp_listen.trace.names and "inet_listen" not in udp_listen.trace.names
    assert tcp_listen.citation.status == "on the path" and udp_listen.citation.status == "on the path"


def _labs():
    for name in known_labs():
        shared = name == "03-listen"  # its traced check is the backlog test's too: same worker
        yield pytest.param(name, marks=[pytest.mark.xdist_group("trace-03-listen")] if shared else [])


@pytest.mark.parametrize("name", list(_labs()))
def test_every_citation_of_a_traced_lab_is_on_the_path_or_untraceable(traced_check, name):
    before, report, after = traced_check(name)
    assert report.ok, markdown(report)
    traced = [record for run in report.runs for record in run.records if record.trace is not None]
    assert traced, f"{name}: no step was traced"
    wrong = [f"{run.scenario.name} step {record.step.index} {record.step.describe()}: {record.citation.describe()}"
             for run in report.runs for record in run.records if record.citation and record.citation.model_bug]
    assert not wrong, "\n".join(wrong)
    assert after == before


def test_a_killed_tracing_agent_leaves_tracefs_as_it_found_it(lab):
    before = tracefs_state(lab)
    agent = Agent(lab.ssh("server"), "server", timeout=60).start()
    try:
        agent.call("trace_arm")
        assert "function_graph" in tracefs_state(lab)
        lab.ssh("server").run(f"kill -KILL {agent.hello['pid']}", timeout=30, check=True)
        deadline = time.monotonic() + 60
        while tracefs_state(lab) != before and time.monotonic() < deadline:
            time.sleep(1)
    finally:
        agent.close()
    assert tracefs_state(lab) == before
    left = lab.ssh("server").run("ls /run/socklab/trace; ps -eo args | grep -c '[s]ocklab-trace-watchdog'", timeout=30)
    assert "state.json" not in left.stdout and left.stdout.strip().endswith("0")


def test_a_busy_tracer_is_refused_in_one_sentence_and_left_running(lab):
    ssh = lab.ssh("server")
    ssh.run("mountpoint -q /sys/kernel/tracing || mount -t tracefs nodev /sys/kernel/tracing; "
            "echo blk > /sys/kernel/tracing/current_tracer", timeout=30, check=True)
    try:
        busy = tracefs_state(lab)
        backend = LabBackend(lab, load(REPO_ROOT / "labs/03-listen/somaxconn.yaml"))
        try:
            with pytest.raises(TraceError, match="tracer is busy: current_tracer is 'blk'"):
                backend.arm_tracing(["server"])
        finally:
            backend.close()
        assert tracefs_state(lab) == busy
    finally:
        ssh.run("echo nop > /sys/kernel/tracing/current_tracer", timeout=30, check=True)


def test_an_unknown_function_is_refused_before_tracefs_changes(lab):
    from harness.guest.trace import trace_program

    before = tracefs_state(lab)
    with pytest.raises(TraceError, match="unknown function 'no_such_function_here'"):
        trace_program(lab, "server", ["true"], TraceOptions(function="no_such_function_here"))
    assert tracefs_state(lab) == before


def test_lab_trace_graphs_a_programs_socket_calls(lab):
    from harness.guest.trace import trace_program

    program = ("import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
               "s.bind(('127.0.0.1', 7300)); s.sendto(b'x', ('127.0.0.1', 7300)); print(s.recv(4))")
    result = trace_program(lab, "server", ["python3", "-c", program], TraceOptions())
    assert result.status == 0 and "b'x'" in result.output
    shown = result.socket_calls()
    assert {"__x64_sys_socket", "__x64_sys_bind", "__x64_sys_sendto", "__x64_sys_recvfrom"} <= set(shown.roots)
    assert "udp_sendmsg" in shown.names
