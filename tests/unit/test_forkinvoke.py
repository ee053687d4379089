"""The shim `invoke` of the guide shell (tests/forkinvoke.py ``ShellServer``) behaves as a real start does.

A shell script cannot tell them apart: same exit status, same bytes on stdout and stderr in the same
order, a signal to the shim reaches the command, and a shim that is killed takes its command along.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.forkinvoke import REPO_ROOT, ShellServer

pytestmark = pytest.mark.xdist_group("fork-shim")

SCRIPTS = [
    "invoke --version",
    "invoke lab.model /nonexistent/lab.yaml",  # bad input: one socklab line, exit 2
    "invoke lab.model labs/02-bind/bind.yaml --kernel 6.1 --reveal | head -4; echo piped: $?",
    "invoke lab.nope 2>&1; echo status $?",
]


@pytest.fixture(scope="module")
def shell(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOCKLAB_")}
    env.update(SOCKLAB_HOME=str(home), SOCKLAB_RESULTS=str(tmp_path_factory.mktemp("results")), COLUMNS="200")
    server = ShellServer(tmp_path_factory.mktemp("bin"), env)
    real_bin = tmp_path_factory.mktemp("real-bin")
    (real_bin / "invoke").write_text(f"#!/bin/sh\nexec {sys.executable} -m invoke \"$@\"\n")
    (real_bin / "invoke").chmod(0o755)

    def run(script: str, shim: bool = True) -> subprocess.Popen:
        path = server.shim.parent if shim else real_bin
        # As a terminal's shell has it: an xdist worker, and so its children, ignore SIGINT.
        return subprocess.Popen(["bash", "-c", script], cwd=REPO_ROOT, env=dict(env, PATH=f"{path}:{env['PATH']}"),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))

    yield SimpleNamespace(run=run, server=server)
    server.close()
    assert server.proc.returncode == 0


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_shim_gives_what_a_real_start_gives(shell, script):
    outcomes = []
    for proc in (shell.run(script), shell.run(script, shim=False)):
        out, err = proc.communicate(timeout=120)
        # The report directory is named by the second it was written in.
        outcomes.append((proc.returncode, re.sub(r"-20\d{6}-\S*", "-TIME", out), re.sub(r"-20\d{6}-\S*", "-TIME", err)))
    forked, real = outcomes
    assert forked == real


def test_stdout_and_stderr_keep_their_order_in_one_pipe(shell):
    # One pipe for both streams: a stderr line, then a stdout line, in the order they were written.
    forked = shell.run("invoke lab.model /nonexistent/lab.yaml 2>&1; invoke --version 2>&1")
    out, _ = forked.communicate(timeout=120)
    lines = out.splitlines()
    assert lines[0].startswith("socklab: ") and lines[1].startswith("Invoke "), out


def _commands_of(server: ShellServer) -> list[int]:
    """The commands the server forked that still run (its children)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == server.proc.pid and fields[0] != "Z":
                found.append(int(entry.name))
    return found


OPENAT = {"x86_64": 257, "aarch64": 56}.get(os.uname().machine)


def _opening(pid: int) -> bool:
    """Whether ``pid`` sits in openat(2) (/proc/PID/syscall names the call it is blocked in)."""
    try:
        return Path(f"/proc/{pid}/syscall").read_text().split()[0] == str(OPENAT)
    except (OSError, IndexError):
        return False


def _blocked_command(shell, tmp_path) -> subprocess.Popen:
    """`invoke lab.model FIFO`, returned once the command is blocked opening a FIFO nobody writes."""
    fifo = tmp_path / "never.yaml"
    os.mkfifo(fifo)
    proc = shell.run(f"exec invoke lab.model {fifo}")
    deadline = time.monotonic() + 30
    while not any(_opening(pid) for pid in _commands_of(shell.server)):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    return proc


@pytest.fixture
def blocked(shell, tmp_path):
    """A blocked command (``_blocked_command``); whatever the test leaves of it is killed afterwards."""
    proc = _blocked_command(shell, tmp_path)
    yield proc
    proc.kill()
    proc.wait()
    for pid in _commands_of(shell.server):
        os.kill(pid, signal.SIGKILL)


def test_a_signal_to_the_shim_reaches_the_command_and_the_status_is_the_commands(shell, blocked):
    blocked.send_signal(signal.SIGINT)
    out, err = blocked.communicate(timeout=30)
    assert blocked.returncode == 130 and err.startswith("socklab: interrupted;"), (blocked.returncode, out, err)
    assert not _commands_of(shell.server)


def test_a_signal_the_shell_ignores_is_ignored_by_the_command(shell, tmp_path):
    # bash starts a background command with SIGINT ignored, as it does a real one.
    fifo = tmp_path / "never.yaml"
    os.mkfifo(fifo)
    proc = shell.run(f"invoke lab.model {fifo} & pid=$!; sleep 2; kill -INT $pid; sleep 2; "
                     "kill -0 $pid && echo still running; kill -TERM $pid; wait $pid; echo status $?")
    out, err = proc.communicate(timeout=60)
    assert "still running" in out and "status 130" in out and "Traceback" not in err, (out, err)


def test_a_killed_shim_takes_its_command_along(shell, blocked):
    blocked.kill()
    blocked.wait()
    deadline = time.monotonic() + 10
    while _commands_of(shell.server) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _commands_of(shell.server)
