"""Fakes for the process boundary: a QMP server on a Unix socket, a scripted Popen, a guest console."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
from dataclasses import dataclass
from pathlib import Path


class FakeQMPServer:
    """Speaks enough QMP for socklab: greeting, qmp_capabilities, quit (which runs ``on_quit``).

    ``replies`` maps a command to what it returns (``{}`` otherwise); ``silent``
    accepts connections but never greets, like a QEMU stopped with SIGSTOP.
    Every connection is served, one after the other.
    """

    def __init__(self, path: Path, on_quit=None, replies: dict | None = None, silent: bool = False) -> None:
        self.path = path
        self.on_quit = on_quit
        self.replies = replies or {}
        self.silent = silent
        self.commands: list[str] = []
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(path))
        self._listener.listen(8)
        self._thread = threading.Thread(target=self._serve_all, daemon=True)
        self._thread.start()

    def _serve_all(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            if self.silent:
                self._held = conn  # kept open, never answered
                continue
            if self._serve(conn):
                return

    def _serve(self, conn) -> bool:
        """One client; True once it sent ``quit``."""
        with conn:
            greeting = {"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": ""},
                                "capabilities": []}}
            conn.sendall(json.dumps(greeting).encode() + b"\r\n")
            # QEMU parses a stream of JSON objects; clients send no newline after them.
            decoder = json.JSONDecoder()
            buffered = ""
            while True:
                data = conn.recv(4096)
                if not data:
                    return False
                buffered += data.decode()
                while buffered.strip():
                    try:
                        request, end = decoder.raw_decode(buffered.lstrip())
                    except ValueError:
                        break
                    buffered = buffered.lstrip()[end:]
                    self.commands.append(request["execute"])
                    reply = {"return": self.replies.get(request["execute"], {})}
                    if "id" in request:
                        reply["id"] = request["id"]
                    conn.sendall(json.dumps(reply).encode() + b"\r\n")
                    if request["execute"] == "quit":
                        if self.on_quit:
                            self.on_quit()
                        return True

    def close(self) -> None:
        self._listener.close()


class FakePopen:
    """Records the argv; ``communicate`` returns scripted output and exit status and may run a side effect."""

    calls: list[list[str]] = []

    def __init__(self, returncode=0, stdout="", stderr="", effect=None, hang=False) -> None:
        self._script = (returncode, stdout, stderr, effect, hang)

    def __call__(self, argv, **kwargs):
        FakePopen.calls.append(list(argv))
        self.argv = list(argv)
        returncode, stdout, stderr, effect, hang = self._script
        outer = self

        class _Proc:
            def __init__(self) -> None:
                self.returncode = None
                self.killed = False

            def communicate(self, timeout=None):
                import subprocess

                if hang and not self.killed:
                    raise subprocess.TimeoutExpired(argv, timeout)
                if effect:
                    effect(argv)
                self.returncode = -9 if self.killed else returncode
                return stdout, stderr

            def kill(self):
                self.killed = True

        outer.proc = _Proc()
        return outer.proc


def spawn_marked_process(marker: str):
    """A real process whose command line carries ``socklab-<marker>,`` as a QEMU of ours would."""
    import subprocess
    import sys

    import time

    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", f"socklab-{marker},"])
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # until exec has replaced the forked copy of us
        if f"socklab-{marker},".encode() in Path(f"/proc/{proc.pid}/cmdline").read_bytes():
            break
        time.sleep(0.01)
    return proc


def kill_quietly(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


class FakeSSHServer:
    """A paramiko SSH server on 127.0.0.1 that runs exec requests with the local /bin/sh.

    It stands in for a guest's sshd: the same host-key pinning, public-key auth
    and exec/exit-status flow, without a VM.
    """

    def __init__(self, host_key_file: Path, authorized_pubkey: str, scripts=None) -> None:
        import paramiko

        # scripts: {command substring: fn(channel)} that answer that exec request by hand,
        # e.g. to send the exit status before the last bytes, as a real sshd may.
        self.scripts = dict(scripts or {})
        self.commands: list[str] = []
        self.host_key = paramiko.Ed25519Key.from_private_key_file(str(host_key_file))
        self.authorized = authorized_pubkey.split()[1]
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(8)
        self.port = self._listener.getsockname()[1]
        self.transports = []
        threading.Thread(target=self._accept_loop, daemon=True).start()

    def _accept_loop(self) -> None:
        import paramiko

        server = self

        class Interface(paramiko.ServerInterface):
            def check_auth_publickey(self, username, key):
                ok = username == "root" and key.get_base64() == server.authorized
                return paramiko.AUTH_SUCCESSFUL if ok else paramiko.AUTH_FAILED

            def get_allowed_auths(self, username):
                return "publickey"

            def check_channel_request(self, kind, chanid):
                return paramiko.OPEN_SUCCEEDED if kind == "session" else paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED

            def check_channel_pty_request(self, channel, term, width, height, pixelwidth, pixelheight, modes):
                return True

            def check_channel_exec_request(self, channel, command):
                command = command.decode()
                server.commands.append(command)
                script = next((fn for key, fn in server.scripts.items() if key in command), None)
                target = (lambda: script(channel)) if script else (lambda: server._exec(channel, command))
                threading.Thread(target=target, daemon=True).start()
                return True

        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            transport = paramiko.Transport(conn)
            transport.add_server_key(self.host_key)
            transport.start_server(server=Interface())
            self.transports.append(transport)

    @staticmethod
    def _exec(channel, command: str) -> None:
        import subprocess

        # start_new_session: sshd runs each session's shell as a session leader too.
        with subprocess.Popen(["/bin/sh", "-c", command], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, start_new_session=True) as proc:

            def feed_stdin():
                # Channel data to the command's stdin until the client's EOF.
                try:
                    for chunk in iter(lambda: channel.recv(4096), b""):
                        proc.stdin.write(chunk)
                        proc.stdin.flush()
                except (OSError, ValueError):
                    pass
                finally:
                    try:
                        proc.stdin.close()
                    except (OSError, ValueError):
                        pass

            threading.Thread(target=feed_stdin, daemon=True).start()
            def relay_stderr():
                for chunk in iter(lambda: proc.stderr.read1(4096), b""):
                    channel.sendall_stderr(chunk)

            stderr_reader = threading.Thread(target=relay_stderr, daemon=True)
            stderr_reader.start()
            for chunk in iter(lambda: proc.stdout.read1(4096), b""):
                channel.sendall(chunk)
            stderr_reader.join()
            status = proc.wait()
        channel.send_exit_status(status if status >= 0 else 128 - status)  # as a shell reports a signal
        channel.close()

    def close(self) -> None:
        self._listener.close()
        for transport in self.transports:
            transport.close()


class QuietBackend:
    """The parts of a scenario backend (harness.scenario.runner.Backend) that a replaying test leaves idle.

    Subclasses answer ``call``; sleeping, snapshots and closing do nothing.
    """

    def sleep(self, seconds):
        pass

    def snapshot(self, name):
        return {}

    def close(self):
        pass


@dataclass
class FakeVM:
    """A lab state's VM as the matrix reads it: a name and the kernel release it runs."""

    name: str
    kernel: str
