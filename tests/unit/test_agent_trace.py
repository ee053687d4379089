"""The guest agent's tracing ops against a fake tracefs (a directory of plain files), the agent run as a subprocess."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from tests.unit.test_agent_guest import GuestAgent

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "trace"
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the agent refuses to trace unless it runs as root")

FUNCTIONS = ["__x64_sys_listen", "__sys_listen", "inet_listen", "inet_csk_listen_start", "sock_no_listen",
             "__x64_sys_socket", "__sys_socket", "__x64_sys_read", "schedule", "task_work_run", "sock_close"]
# Files as a freshly booted guest shows them (tracefs's "no pid" and "all functions enabled" read as empty).
INITIAL = {
    "available_tracers": "blk function_graph function nop\n", "current_tracer": "nop\n", "set_event": "",
    "available_filter_functions": "".join(f"{name}\n" for name in FUNCTIONS), "set_ftrace_filter": "",
    "set_ftrace_pid": "no pid\n", "set_graph_function": "", "max_graph_depth": "0\n", "tracing_on": "1\n",
    "trace": "", "trace_pipe": "", "options/funcgraph-irqs": "1\n", "options/funcgraph-cpu": "1\n", "options/function-fork": "0\n",
}
EMPTY_MARKS = {"no pid", "#### all functions enabled ####"}


def tracefs(tmp_path: Path, **changes: str) -> Path:
    root = tmp_path / "tracing"
    (root / "options").mkdir(parents=True)
    for name, text in {**INITIAL, **changes}.items():
        (root / name).write_text(text)
    return root


def contents(root: Path) -> dict[str, str]:
    """Every file but the ring buffer, with tracefs's words for "empty" read as empty."""
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.name not in ("trace", "trace_pipe"):
            text = path.read_text().strip()
            out[str(path.relative_to(root))] = "" if text in EMPTY_MARKS else text
    return out


def start(tmp_path: Path, root: Path) -> GuestAgent:
    return GuestAgent("--tracefs", str(root), "--trace-state-dir", str(tmp_path / "state"))


def test_a_traced_step_returns_its_graph_and_every_setting_comes_back(tmp_path):
    root = tracefs(tmp_path)
    before = contents(root)
    agent = start(tmp_path, root)
    begun = agent.call("trace_begin", depth=6, functions=["inet_csk_listen_start", "sock_map_fd"])
    assert begun["errno"] is None, begun
    assert begun["extra"]["traceable"] == {"inet_csk_listen_start": True, "sock_map_fd": False}
    assert (root / "current_tracer").read_text().strip() == "function_graph"
    assert (root / "set_ftrace_pid").read_text().strip() == str(agent.hello["pid"])
    assert (root / "max_graph_depth").read_text().strip() == "6"
    assert (root / "options/funcgraph-irqs").read_text().strip() == "0"
    traced = set((root / "set_ftrace_filter").read_text().split())
    assert {str(FUNCTIONS.index(name) + 1) for name in ("inet_listen", "__x64_sys_listen")} <= traced  # by index
    assert str(FUNCTIONS.index("schedule") + 1) not in traced and str(FUNCTIONS.index("__x64_sys_read") + 1) not in traced
    (root / "trace_pipe").write_text((FIXTURES / "listen-tcp-udp.txt").read_text())  # what the kernel would record
    ended = agent.call("trace_end")
    calls = ended["extra"]["calls"]
    assert calls[0][:2] == [0, "__x64_sys_listen"] and [3, "inet_csk_listen_start", 552.994] in calls
    assert (root / "tracing_on").read_text().strip() == "0"
    assert (tmp_path / "state" / "state.json").exists()
    status, stderr = agent.finish()
    assert status == 0, stderr
    assert contents(root) == before
    assert not (tmp_path / "state" / "state.json").exists()


def test_the_watchdog_puts_tracefs_back_when_the_agent_is_killed(tmp_path):
    root = tracefs(tmp_path)
    before = contents(root)
    agent = start(tmp_path, root)
    assert agent.call("trace_arm")["errno"] is None
    assert contents(root) != before
    agent.proc.send_signal(signal.SIGKILL)
    agent.proc.wait(timeout=10)
    deadline = time.monotonic() + 20
    while (tmp_path / "state" / "state.json").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert contents(root) == before
    assert not (tmp_path / "state" / "state.json").exists()


def test_a_state_file_left_by_a_dead_agent_is_restored_before_arming(tmp_path):
    root = tracefs(tmp_path, current_tracer="function_graph\n", set_ftrace_pid="4242\n")
    state = tmp_path / "state"
    state.mkdir()
    plan = {"owner": 2**22 + 7, "root": str(root), "mounted": False,
            "writes": [["current_tracer", ["nop"]], ["set_ftrace_pid", []]]}
    (state / "state.json").write_text(json.dumps(plan))
    agent = start(tmp_path, root)
    assert agent.call("trace_arm")["errno"] is None
    agent.finish()
    assert (root / "current_tracer").read_text().strip() == "nop" and (root / "set_ftrace_pid").read_text() == ""


@pytest.mark.parametrize("changes, request_args, message", [
    ({"current_tracer": "function\n"}, {}, "the tracer is busy: current_tracer is 'function'"),
    ({"set_event": "sched:sched_switch\n"}, {}, r"the tracer is busy: 1 trace event\(s\) are enabled"),
    ({"available_tracers": "blk nop\n"}, {}, "no function_graph tracer"),
    ({"set_ftrace_filter": "schedule:traceoff:unlimited\n"}, {}, "holds function triggers"),
    ({}, {"function": "no_such_function"}, "unknown function 'no_such_function': it is not in "
                                           "available_filter_functions"),
    ({}, {"depth": 0}, r"trace depth 0 is out of range: use 1\.\.20"),
    ({}, {"depth": 99}, "out of range"),
    ({}, {"functions": "inet_listen"}, "must be a list of kernel function names"),
])
def test_tracing_is_refused_in_one_sentence_and_tracefs_is_left_as_it_was(tmp_path, changes, request_args, message):
    import re

    root = tracefs(tmp_path, **changes)
    before = contents(root)
    agent = start(tmp_path, root)
    reply = agent.call("trace_begin", **request_args)
    assert reply["errno"] == "EINVAL" and re.search(message, reply["error"]), reply
    assert "\n" not in reply["error"]
    repeated = agent.call("trace_end")  # the host may post trace_begin and learn of a refusal here
    assert repeated["errno"] == "EINVAL" and re.search(message, repeated["error"])
    assert contents(root) == before
    assert not (tmp_path / "state" / "state.json").exists()
    status, _ = agent.finish()
    assert status == 0 and contents(root) == before


def test_a_traced_program_starts_only_once_it_is_the_traced_process(tmp_path):
    root = tracefs(tmp_path)
    agent = start(tmp_path, root)
    probe = "import os, sys; print(open(sys.argv[1]).read().strip() == str(os.getpid()))"
    reply = agent.call("trace_program", argv=["python3", "-c", probe, str(root / "set_ftrace_pid")], depth=4)
    assert reply["errno"] is None, reply
    assert reply["extra"]["status"] == 0 and reply["extra"]["output"].strip() == "True"
    assert (root / "options/function-fork").read_text().strip() == "0"
    agent.finish()


def test_a_reset_that_keeps_tracing_leaves_the_tracer_armed_and_stopped_and_a_plain_reset_restores(tmp_path):
    """A lab check's scenarios share their agents: between two, the tracer stays armed, tracing off."""
    root = tracefs(tmp_path)
    before = contents(root)
    agent = start(tmp_path, root)
    assert agent.call("trace_begin", depth=6)["errno"] is None  # armed; tracing_on 1 until trace_end
    assert (root / "tracing_on").read_text().strip() == "1"
    fd = agent.ok("socket", family=2, type=1)
    kept = agent.call("reset", tracing="keep")  # as if the scenario stopped between begin and end
    assert kept["errno"] is None and kept["extra"]["closed"] == [fd]
    assert "tracing_restore_failed" not in kept["extra"]
    assert (root / "current_tracer").read_text().strip() == "function_graph"
    assert (root / "tracing_on").read_text().strip() == "0"
    assert (tmp_path / "state" / "state.json").exists()  # the watchdog would still put it back
    armed = agent.call("trace_arm")["extra"]["arm_s"]
    assert agent.call("trace_begin", depth=6)["extra"]["arm_s"] == armed  # not armed again
    assert agent.ok("socket", family=2, type=1) == fd  # the next scenario's numbers are a fresh agent's
    assert agent.call("trace_end")["errno"] is None
    assert agent.call("reset", tracing="sometimes")["errno"] == "EINVAL"
    restored = agent.call("reset")
    assert restored["extra"]["tracing_restore_failed"] == []
    assert contents(root) == before and not (tmp_path / "state" / "state.json").exists()
    status, stderr = agent.finish()
    assert status == 0, stderr
