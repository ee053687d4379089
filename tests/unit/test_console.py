"""The serial console: login, marked command output, and errors quoting the console log.

A thread on a Unix socket plays the guest's ttyS0 the way agetty and bash do.
"""

from __future__ import annotations

import re
import socket
import subprocess
import threading

import pytest

from harness.vm.console import GuestConsole, log_tail, parse_marked_output
from harness.errors import ConsoleError


class FakeTTY:
    """A guest console: a login prompt (or an autologin shell), then a shell that runs commands locally."""

    def __init__(self, path, autologin=True, silent=False) -> None:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(1)
        self.autologin = autologin
        self.silent = silent
        self.received: list[str] = []
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self) -> None:
        conn, _ = self.listener.accept()
        logged_in = self.autologin
        buffered = b""
        with conn:
            while True:
                try:
                    data = conn.recv(4096)
                except OSError:  # the console client hung up
                    return
                if not data:
                    return
                if self.silent:
                    continue
                buffered += data
                while b"\r" in buffered:
                    line, buffered = buffered.split(b"\r", 1)
                    text = line.decode()
                    self.received.append(text)
                    if not logged_in:
                        if text == "root":
                            logged_in = True
                            conn.sendall(b"\r\n\x1b[?2004hroot@server:~# ")
                        else:
                            conn.sendall(b"\r\nserver login: ")
                        continue
                    if text and not text.startswith("stty"):
                        output = subprocess.run(["/bin/bash", "-c", text], capture_output=True).stdout
                        conn.sendall(output.replace(b"\n", b"\r\n"))
                    conn.sendall(b"\x1b[?2004hroot@server:~# ")


@pytest.fixture
def console_paths(tmp_path):
    log = tmp_path / "server.console.log"
    log.write_text("[    0.000000] Linux version 6.1\r\n\x1b[?2004hKernel panic - not syncing: test\r\n")
    return tmp_path / "server.console", log


def test_parse_marked_output_separates_output_and_status():
    text = "hello\r\nworld\r\n\nSLab12:7:SLab12"
    assert parse_marked_output(text, "SLab12") == ("hello\nworld", 7)


def test_parse_marked_output_without_marker_is_an_error():
    with pytest.raises(ConsoleError):
        parse_marked_output("no marker", "SLx")


def test_log_tail_strips_escape_sequences(console_paths):
    _sock, log = console_paths
    assert log_tail(log).splitlines()[-1] == "Kernel panic - not syncing: test"


def test_log_tail_of_missing_log(tmp_path):
    assert log_tail(tmp_path / "nothing.log") == "(no console log)"


def test_autologin_shell_runs_commands(console_paths):
    sock_path, log = console_paths
    FakeTTY(sock_path)
    with GuestConsole("server", sock_path, log) as console:
        console.login(timeout=5)
        assert console.run("echo hello; echo world", timeout=5) == ("hello\nworld", 0)
        assert console.run("(exit 3)", timeout=5)[1] == 3


def test_login_prompt_is_answered_with_root(console_paths):
    sock_path, log = console_paths
    tty = FakeTTY(sock_path, autologin=False)
    with GuestConsole("server", sock_path, log) as console:
        console.login(timeout=5)
        assert console.run("echo in", timeout=5) == ("in", 0)
    assert "root" in tty.received


def test_silent_console_times_out_with_the_log_tail(console_paths):
    sock_path, log = console_paths
    FakeTTY(sock_path, silent=True)
    with GuestConsole("server", sock_path, log) as console:
        with pytest.raises(ConsoleError, match=re.compile(r"server: console did not show .* within 1 s.*Kernel panic", re.S)):
            console.login(timeout=1)


def test_missing_console_socket_names_the_vm(tmp_path):
    with pytest.raises(ConsoleError, match="server: cannot open the console"):
        GuestConsole("server", tmp_path / "absent", tmp_path / "log").open()
