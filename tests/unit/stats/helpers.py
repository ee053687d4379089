"""Helpers for the stats parser tests: the recorded fixtures and a local stand-in for a guest's shell."""

from __future__ import annotations

import os
import re
import select
import shlex
import subprocess
import textwrap
from pathlib import Path

from harness.guest.ssh import CommandResult

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "stats"


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text()


def nonce_of(text: str) -> str:
    """The nonce the recorded collector output was made with (it is in every marker)."""
    match = re.search(r"@@socklab-stats ([0-9a-f]+) begin", text)
    assert match, "not a collector output"
    return match.group(1)


def section_of(text: str, name: str) -> str:
    """The stdout of one section of a recorded collector output."""
    nonce = nonce_of(text)
    start = text.index(f"@@socklab-stats {nonce} begin {name}@@\n") + len(f"@@socklab-stats {nonce} begin {name}@@\n")
    return text[start:text.index(f"@@socklab-stats {nonce} status", start)]


def line_of(text: str, needle: str) -> str:
    """The first line containing ``needle``."""
    return next(line for line in text.splitlines() if needle in line)


class LocalChannel:
    """Enough of a paramiko Channel for the stats shell, backed by a local ``sh`` process."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.closed = False
        self.commands: list[str] = []

    def exec_command(self, command: str) -> None:
        self.commands.append(command)
        # Like sshd, make the session's shell a process-group leader.
        self.proc = subprocess.Popen(["sh", "-c", command], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env=self.env, start_new_session=True)

    def fileno(self) -> int:
        return self.proc.stdout.fileno()

    def sendall(self, data: bytes) -> None:
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    @staticmethod
    def _ready(stream) -> bool:
        return bool(select.select([stream], [], [], 0)[0])

    def recv_ready(self) -> bool:
        return self._ready(self.proc.stdout) and not self._eof("out")

    def recv_stderr_ready(self) -> bool:
        return self._ready(self.proc.stderr) and not self._eof("err")

    def _eof(self, which: str) -> bool:
        return getattr(self, f"_{which}_eof", False)

    def recv(self, size: int) -> bytes:
        data = os.read(self.proc.stdout.fileno(), size)
        self._out_eof = not data
        return data

    def recv_stderr(self, size: int) -> bytes:
        data = os.read(self.proc.stderr.fileno(), size)
        self._err_eof = not data
        return data

    def exit_status_ready(self) -> bool:
        return self.proc.poll() is not None

    def recv_exit_status(self) -> int:
        return self.proc.wait()

    def close(self) -> None:
        """Like paramiko: return at once; the shell sees EOF on stdin and ends when its command does."""
        if self.closed:
            return
        self.closed = True
        if self.proc:
            self.proc.stdin.close()
            self.proc.stdout.close()
            self.proc.stderr.close()

    def reap(self) -> None:
        if self.proc and self.proc.poll() is None:
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class _Transport:
    def __init__(self, guest: "LocalGuest") -> None:
        self.guest = guest

    def open_session(self, timeout: float | None = None) -> LocalChannel:
        channel = LocalChannel(self.guest.env)
        self.guest.channels.append(channel)
        return channel


class _Client:
    def __init__(self, guest: "LocalGuest") -> None:
        self.guest = guest

    def get_transport(self) -> _Transport:
        return _Transport(self.guest)


class LocalGuest:
    """Stands in for ``GuestSSH``: commands run in a local sh whose PATH starts with fake ss/ethtool/busybox.

    The fakes print recorded guest output, so the collector's real shell
    command (markers, exit statuses, stderr capture) runs end to end.
    """

    def on_close(self, callback) -> None:
        self.closing.append(callback)

    def __init__(self, tmp_path: Path, vm: str = "server", snapshot: str = "snapshot-server-mixed.txt",
                 ss_script: str | None = None, ethtool_script: str | None = None) -> None:
        self.vm = vm
        self.channels: list[LocalChannel] = []
        self.client = _Client(self)
        self.closing: list = []  # what the collector registered with on_close, as GuestSSH keeps it
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir(exist_ok=True)
        recorded = fixture(snapshot)
        (tmp_path / "procfs.txt").write_text(section_of(recorded, "procfs"))
        (tmp_path / "ss.txt").write_text(section_of(recorded, "ss"))
        fixtures = shlex.quote(str(FIXTURES))
        self._tool(bin_dir, "ss", ss_script or f"""
            cat {shlex.quote(str(tmp_path / 'ss.txt'))}
            echo 'Failed to find cgroup2 mount' >&2
        """)
        self._tool(bin_dir, "ethtool", ethtool_script or f"""
            case "$1 $2" in
              "-k *") cat {fixtures}/ethtool-k-all.txt ;;
              "-S lo") echo 'no stats available' >&2; exit 94 ;;
              "-S mgmt0") cat {fixtures}/ethtool-S-mgmt0.txt ;;
              "-S "*) cat {fixtures}/ethtool-S-lab0.txt ;;
              *) echo "fake ethtool: $*" >&2; exit 1 ;;
            esac
        """)
        self._tool(bin_dir, "busybox", f"""
            case "$1" in
              grep) cat {shlex.quote(str(tmp_path / 'procfs.txt'))} ;;
              rm) shift; exec rm "$@" ;;
              *) echo "fake busybox: $*" >&2; exit 1 ;;
            esac
        """)
        self.env = {**os.environ, "PATH": f"{bin_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}",
                    "TMPDIR": str(tmp_path)}  # the shell's stderr file stays in the test's own dir

    @staticmethod
    def _tool(bin_dir: Path, name: str, body: str) -> None:
        path = bin_dir / name
        path.write_text("#!/bin/sh\n" + textwrap.dedent(body).lstrip())
        path.chmod(0o755)

    def run(self, command: str, timeout: float = 30.0, check: bool = False) -> CommandResult:
        proc = subprocess.run(["sh", "-c", command], capture_output=True, text=True, env=self.env, timeout=timeout)
        return CommandResult(proc.returncode, proc.stdout, proc.stderr)

    def close(self) -> None:
        for channel in self.channels:
            channel.close()
            channel.reap()
