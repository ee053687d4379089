"""`python -m invoke ARGV` for the tests, from a server that imported invoke and the harness once.

A `python -m invoke` start costs about a second of imports on a loaded two-core machine, and the unit
tests start a few hundred. ``Forker`` keeps one server process (this file run with --serve) that has
imported invoke and the harness, and forks one child per command: each command is still a process of
its own, with its own environment, working directory, stdio and exit status, running invoke's
``program.run()`` as `python -m invoke` does. tests/unit/test_bad_input.py's
test_forked_runs_match_python_m_invoke checks that the two agree; a few CLI tests keep the real
`python -m invoke` start. ``ShellServer`` does the same for shell scripts (the guides' blocks): an
`invoke` on their PATH forks the command with the script's own stdio (tests/unit/test_forkinvoke.py).
"""

from __future__ import annotations

import atexit
import importlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 120.0


class Forker:
    """A server process that has imported invoke and the harness once and forks one child per command."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, __file__, "--serve"], cwd=REPO_ROOT, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)

    def __call__(self, argv: list[str], env: dict[str, str], uid: int | None = None, cwd: Path | None = None,
                 timeout: float = TIMEOUT, template_seconds: float | None = None) -> tuple[int, str, str]:
        """Run ``invoke ARGV``; (exit status, stdout, stderr). A command past ``timeout`` is killed (status -9).

        ``template_seconds`` replaces harness.template's time budget (5 s) in this command only, as the
        unit tests' monkeypatch does: a case about that budget need not burn 5 s of CPU to reach it.
        """
        with tempfile.TemporaryDirectory(prefix="socklab-forkinvoke-io-") as io:
            out, err = Path(io, "stdout"), Path(io, "stderr")
            self.proc.stdin.write(json.dumps({"argv": argv, "env": env, "out": str(out), "err": str(err), "uid": uid,
                                              "cwd": str(cwd or REPO_ROOT), "timeout": timeout,
                                              "template_seconds": template_seconds}) + "\n")
            self.proc.stdin.flush()
            reply = self.proc.stdout.readline()
            if not reply:
                raise RuntimeError("the fork server died")
            return json.loads(reply)["rc"], out.read_text(errors="replace"), err.read_text(errors="replace")

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


_shared: Forker | None = None


def invoke(argv: list[str], env: dict[str, str], cwd: Path | None = None,
           timeout: float = 60.0) -> subprocess.CompletedProcess:
    """``invoke ARGV`` as subprocess.run(..., capture_output=True, text=True, stdin=DEVNULL) gives it, forked.

    One fork server per test process, started on first use and stopped at exit.
    """
    global _shared
    if _shared is None:
        _shared = Forker()
        atexit.register(_shared.close)
    returncode, stdout, stderr = _shared(list(argv), dict(env), cwd=cwd, timeout=timeout)
    return subprocess.CompletedProcess(["invoke", *argv], returncode, stdout, stderr)


def _preload() -> None:
    sys.path.insert(0, str(REPO_ROOT))
    import invoke.main  # noqa: F401 - everything tasks.py imports, imported once here
    import harness.lab.lifecycle, harness.image.build, harness.scenario.check, harness.scenario.format  # noqa: E401,F401
    # rich imports its emoji table on first use; a `nobody: true` child may not be able to read this
    # interpreter's site-packages (here under root's 0700 home), so it is imported before the fork.
    import rich._emoji_codes  # noqa: F401


def _serve() -> None:
    """--serve: read one JSON command a line, run it in a fork, answer its exit status."""
    _preload()
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(request)
        deadline = time.monotonic() + request.get("timeout", TIMEOUT)
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                continue
            time.sleep(0.005)
        rc = os.waitstatus_to_exitcode(status)
        sys.stdout.write(json.dumps({"rc": rc}) + "\n")
        sys.stdout.flush()


def _child(request: dict, stdio: list[int] | None = None) -> None:
    """Run the request's command in this fork and exit with its status; never returns.

    The command's stdio is ``stdio`` (three descriptors a shim passed) or the request's files.
    """
    code = 1
    try:
        os.environ.clear()
        os.environ.update(request["env"])
        os.chdir(request.get("cwd", REPO_ROOT))
        if stdio is not None:
            for fd, passed in enumerate(stdio):
                os.dup2(passed, fd)
                os.close(passed)
            # The shim's signal dispositions, not the server's (an xdist worker ignores SIGINT), as
            # the interpreter sets them up at its start: SIGINT raises KeyboardInterrupt unless ignored.
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
                if int(sig) in request.get("ignored", ()):
                    signal.signal(sig, signal.SIG_IGN)
                else:
                    signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)
        else:
            for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, request["out"], os.O_WRONLY | os.O_CREAT),
                                    (2, request["err"], os.O_WRONLY | os.O_CREAT)):
                os.dup2(os.open(path, flags, 0o600), fd)
        if request.get("uid") is not None:  # a `nobody: true` case: an unprivileged user, as students are
            os.setgroups([])
            os.setgid(request["uid"])
            os.setuid(request["uid"])
        # harness.progress sizes its consoles from COLUMNS and the streams at import: made again here,
        # with this command's environment and stdio, as a fresh `python -m invoke` makes them.
        import harness.progress

        importlib.reload(harness.progress)
        if request.get("template_seconds") is not None:
            import harness.template

            harness.template.TEMPLATE_SECONDS = float(request["template_seconds"])
        sys.argv = ["invoke", *request["argv"]]
        from invoke.main import program

        try:
            program.run()
            code = 0
        except SystemExit as exc:  # what the interpreter would do with it
            if exc.code is None or isinstance(exc.code, int):
                code = exc.code or 0
            else:
                print(exc.code, file=sys.stderr)
        except BaseException:  # noqa: BLE001 - an uncaught exception: traceback and exit 1, as python does
            import traceback

            traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


# --- an `invoke` on PATH, for shell scripts (the guides' blocks, tests/live/conftest.py) -----------
#
# ``ShellServer(directory, env)`` starts a server on a UNIX socket and writes ``directory/invoke``, a
# Python script (no site, so it starts in a few ms) that hands the server its argv, environment,
# working directory and its own stdin, stdout and stderr (SCM_RIGHTS), and exits with the forked
# command's status. The command writes to the very descriptors the shell gave the shim, so its
# output lands in the script's output in order, and a signal to the shim reaches the command.

SHIM = """#!{python} -IS
# `invoke` for the tests: the command runs in a fork of {server} (tests/forkinvoke.py).
import json, os, signal, socket, sys
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.connect({socket!r})
# Signals this process was started with ignored stay ignored in the command, as in a real start.
ignored = [int(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
           if signal.getsignal(sig) == signal.SIG_IGN]
request = json.dumps({{"argv": sys.argv[1:], "env": dict(os.environ), "cwd": os.getcwd(),
                      "ignored": ignored}}).encode()
socket.send_fds(sock, [len(request).to_bytes(8, "big")], [0, 1, 2])
sock.sendall(request)
answers = sock.makefile("r")
pid = json.loads(answers.readline())["pid"]
for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    if int(sig) not in ignored:
        signal.signal(sig, lambda number, frame: os.kill(pid, number))
line = answers.readline()
rc = json.loads(line)["rc"] if line else 1
if rc < 0:
    signal.signal(-rc, signal.SIG_DFL)
    os.kill(os.getpid(), -rc)
sys.exit(rc)
"""


class ShellServer:
    """The fork server behind a shim ``invoke``; ``close()`` stops it and every command still running."""

    def __init__(self, directory: Path, env: dict[str, str]) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.socket = directory / "fork.sock"
        self.proc = subprocess.Popen([sys.executable, __file__, "--serve-socket", str(self.socket)], cwd=REPO_ROOT,
                                     env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        if self.proc.stdout.readline().strip() != "listening":
            raise RuntimeError("the fork server did not start")
        self.shim = directory / "invoke"
        self.shim.write_text(SHIM.format(python=sys.executable, server=self.proc.pid, socket=str(self.socket)))
        self.shim.chmod(0o755)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def _serve_socket(path: str) -> None:
    """--serve-socket PATH: fork one command per shim connection; stop (and kill what runs) when stdin closes."""
    import select
    import socket

    _preload()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    # A child's exit wakes the select below (SIGCHLD through a wakeup socket): no timeout to poll on.
    woken, wake = socket.socketpair()
    woken.setblocking(False)
    wake.setblocking(False)
    signal.set_wakeup_fd(wake.fileno(), warn_on_full_buffer=False)
    signal.signal(signal.SIGCHLD, lambda number, frame: None)
    print("listening", flush=True)
    running: dict[int, socket.socket] = {}  # pid -> the shim's connection
    while True:
        readable, _, _ = select.select([sys.stdin, listener, woken, *running.values()], [], [])
        if woken in readable:
            while True:
                try:
                    woken.recv(4096)
                except BlockingIOError:
                    break
        if sys.stdin in readable and not sys.stdin.readline():
            break
        if listener in readable:
            conn, _ = listener.accept()
            header, fds, _, _ = socket.recv_fds(conn, 8, 3)
            size, request = int.from_bytes(header, "big"), b""
            while len(request) < size:
                chunk = conn.recv(size - len(request))
                if not chunk:  # the shim died before its request was whole
                    break
                request += chunk
            if len(request) < size:
                for fd in fds:
                    os.close(fd)
                conn.close()
                continue
            pid = os.fork()
            if pid == 0:
                signal.set_wakeup_fd(-1)
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                woken.close()
                wake.close()
                listener.close()
                for other in running.values():
                    other.close()
                conn.close()
                _child(json.loads(request), stdio=fds)
            for fd in fds:
                os.close(fd)
            conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
            running[pid] = conn
        for pid, conn in list(running.items()):
            if conn in readable:  # the shim went away (killed): so does its command
                os.kill(pid, signal.SIGKILL)
        while running:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if not pid:
                break
            conn = running.pop(pid)
            try:
                conn.sendall(json.dumps({"rc": os.waitstatus_to_exitcode(status)}).encode() + b"\n")
            except OSError:
                pass
            conn.close()
    for pid in running:
        os.kill(pid, signal.SIGKILL)


if __name__ == "__main__" and sys.argv[1:] == ["--serve"]:
    _serve()
elif __name__ == "__main__" and sys.argv[1:2] == ["--serve-socket"]:
    _serve_socket(sys.argv[2])
