"""Talk to a guest over its serial console (pexpect on QEMU's console socket).

The console is the way in when SSH is not: during boot, after sshd died, or to
read a panic. QEMU's console chardev takes one client at a time and also logs
everything the guest prints to a file, which is what error messages quote.
"""

from __future__ import annotations

import re
import secrets
import socket
from collections.abc import Iterable
from pathlib import Path

import pexpect
import pexpect.fdpexpect

from harness.deadline import CONSOLE_READ
from harness.errors import ConsoleError

LOGIN_PROMPT = re.compile(rb"login: ?$", re.M)
SHELL_PROMPT = re.compile(rb"[#$] ?$", re.M)
# CSI sequences (bracketed paste, colours) that bash prints around its prompt.
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _log_lines(log: Path) -> list[str] | None:
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return None
    cleaned = [_ANSI.sub("", line).rstrip() for line in text.replace("\r", "").splitlines()]
    return [line for line in cleaned if line.strip()]


def log_tail(log: Path, lines: int = 15) -> str:
    """The last ``lines`` lines the guest printed on its console, cleaned for an error message."""
    kept = _log_lines(log)
    if kept is None:
        return "(no console log)"
    kept = kept[-lines:]
    return "\n".join(kept) if kept else "(the guest printed nothing)"


PANIC = re.compile(r"Kernel panic - not syncing")


def panic_lines(log: Path, before: int = 2, after: int = 9) -> str | None:
    """The kernel's panic as the console showed it, for an error message; None if it has none.

    The guest runs with ``panic=-1`` under ``-no-reboot``: after a panic QEMU
    exits, and the reason is only in the console log. The last lines of that
    log are a register dump; the lines that say what happened come first: the
    line before the panic (the oops or sysrq that caused it), the panic, the
    task and the top of the call trace.
    """
    kept = _log_lines(log)
    if not kept:
        return None
    for index, line in enumerate(kept):
        if PANIC.search(line):
            return "\n".join(kept[max(0, index - before):index + after + 1])
    return None


def parse_marked_output(text: str, token: str) -> tuple[str, int]:
    """Split what the console showed into the command's output and its exit status.

    The command is sent as ``CMD; printf 'TOKEN:%s:TOKEN\\n' $?``: the typed line
    holds ``%s`` where the output holds the number, so the echo never matches.
    """
    match = re.search(rf"{token}:(\d+):{token}", text)
    if not match:
        raise ConsoleError("console output has no end marker")
    body = _ANSI.sub("", text[: match.start()].replace("\r", ""))
    return body.strip("\n"), int(match.group(1))


class GuestConsole:
    """A pexpect session on one guest's serial console socket."""

    def __init__(self, vm: str, socket_path: Path, log_path: Path) -> None:
        self.vm = vm
        self.socket_path = socket_path
        self.log_path = log_path
        self._sock: socket.socket | None = None
        self.child: pexpect.fdpexpect.fdspawn | None = None

    def open(self) -> "GuestConsole":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(self.socket_path))
        except OSError as exc:
            sock.close()
            raise ConsoleError(f"{self.vm}: cannot open the console {self.socket_path}: {exc.strerror or exc}") from exc
        self._sock = sock
        self.child = pexpect.fdpexpect.fdspawn(sock.fileno(), timeout=10)
        return self

    def expect(self, patterns: Iterable, timeout: float) -> int:
        """Wait for one of ``patterns``; on timeout or EOF raise with the console's last lines."""
        assert self.child is not None, "open() first"
        try:
            return self.child.expect(list(patterns), timeout=timeout)
        except pexpect.TIMEOUT as exc:
            raise ConsoleError(f"{self.vm}: console did not show {self._names(patterns)} within {timeout:.0f} s; "
                               f"last lines:\n{log_tail(self.log_path)}") from exc
        except pexpect.EOF as exc:
            raise ConsoleError(f"{self.vm}: console closed (QEMU gone?); last lines:\n{log_tail(self.log_path)}") from exc

    @staticmethod
    def _names(patterns: Iterable) -> str:
        return " or ".join(repr(p.pattern if hasattr(p, "pattern") else p) for p in patterns)

    def login(self, timeout: float = CONSOLE_READ) -> None:
        """Get a root shell: the guest autologs in on ttyS0; a plain login prompt is answered with root."""
        assert self.child is not None, "open() first"
        self.child.send(b"\r")
        if self.expect([SHELL_PROMPT, LOGIN_PROMPT], timeout) == 1:
            self.child.send(b"root\r")
            self.expect([SHELL_PROMPT], timeout)
        # Quiet, predictable shell: no echo of what we type, no bracketed paste.
        self.child.send(b"stty -echo; bind 'set enable-bracketed-paste off' 2>/dev/null\r")
        self.expect([SHELL_PROMPT], timeout)

    def run(self, command: str, timeout: float = CONSOLE_READ) -> tuple[str, int]:
        """Run ``command`` in the console shell; return (output, exit status)."""
        assert self.child is not None, "open() first"
        token = "SL" + secrets.token_hex(4)
        self.child.send(f"{command}; printf '\\n{token}:%s:{token}\\n' $?\r".encode())
        self.expect([re.compile(rf"{token}:\d+:{token}".encode())], timeout)
        before, after = self.child.before, self.child.after
        if not isinstance(before, bytes) or not isinstance(after, bytes):  # bytes once expect() matched the marker
            raise ConsoleError(f"{self.vm}: the console lost the output of {command!r}")
        text = (before + after).decode(errors="replace")
        return parse_marked_output(text, token)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            self.child = None

    def __enter__(self) -> "GuestConsole":
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()


def interact(socket_path: Path, vm: str, escape: bytes = b"\x1d") -> None:
    """Attach the terminal to the console socket until the user types Ctrl-] (or QEMU goes away)."""
    import os
    import select
    import sys
    import termios
    import tty

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(socket_path))
    except OSError as exc:
        raise ConsoleError(f"{vm}: cannot open the console {socket_path}: {exc.strerror or exc}") from exc
    stdin = sys.stdin.fileno()
    saved = termios.tcgetattr(stdin) if os.isatty(stdin) else None
    sys.stderr.write(f"connected to {vm}'s serial console; Ctrl-] leaves\r\n")
    sock.send(b"\r")
    try:
        if saved is not None:
            tty.setraw(stdin)
        while True:
            ready, _, _ = select.select([stdin, sock], [], [])
            if sock in ready:
                data = sock.recv(4096)
                if not data:
                    break
                os.write(sys.stdout.fileno(), data)
            if stdin in ready:
                data = os.read(stdin, 1024)
                if not data or escape in data:
                    break
                sock.sendall(data)
    finally:
        if saved is not None:
            termios.tcsetattr(stdin, termios.TCSADRAIN, saved)
        sock.close()
        sys.stderr.write("\n")
