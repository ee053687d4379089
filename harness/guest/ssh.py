"""Talk to a guest over SSH (paramiko): one persistent connection, commands, files.

The guest's host key was generated when the image was built and is pinned
here: a guest that shows another key is refused, never silently trusted.
"""

from __future__ import annotations

import base64
import logging
import os
import select
import shlex
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import paramiko

from harness.deadline import SSH_CHANNEL_OPEN, SSH_COMMAND, SSH_CONNECT, SSH_EXIT_STATUS
from harness.errors import SSHError, SSHRefused
from harness.log import truncate

RETRYABLE = (OSError, EOFError, paramiko.SSHException)
# Opening a channel on a live connection takes milliseconds; paramiko's own default is an hour.
OPEN_TIMEOUT = SSH_CHANNEL_OPEN
# How long a guest known to be up may take to send sshd's banner: a restored guest's first
# connection under TCG translates sshd's code afresh (0.4-0.8 s quiet, several times that loaded).
UP_BANNER_PATIENCE = 5.0

# paramiko logs every failed attempt of a booting guest with a traceback; our own errors say
# what matters, so the command line drops its records unless --debug is on (harness/log.py).
log = logging.getLogger(__name__)


def transport_of(client: paramiko.SSHClient) -> paramiko.Transport:
    """``client``'s transport; paramiko.SSHException when it has none (never connected, or closed)."""
    transport = client.get_transport()
    if transport is None:
        raise paramiko.SSHException("the SSH connection is closed")
    return transport


@dataclass(frozen=True)
class CommandResult:
    """What a command did: its exit status and both output streams."""

    exit_status: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.exit_status == 0


def _shown(command: str | Sequence[str]) -> str:
    """A command as a user would type it, for messages."""
    return command if isinstance(command, str) else shlex.join(command)


class _StdinFeeder:
    """Copies the caller's stdin (bytes, or a file descriptor until EOF) to a channel, then closes it."""

    def __init__(self, channel: paramiko.Channel, stdin: bytes | int | None) -> None:
        self.channel = channel
        self.fds: list[int] = []
        if isinstance(stdin, int):
            self.fds = [stdin]
            return
        if stdin:
            channel.sendall(stdin)
        channel.shutdown_write()

    def pump(self) -> None:
        try:
            chunk = os.read(self.fds[0], 65536)
        except OSError:  # a closed or unreadable stdin reads as EOF
            chunk = b""
        if chunk:
            try:
                self.channel.sendall(chunk)
                return
            except OSError:  # the command is gone; what it did not read is not ours to keep
                pass
        self.fds = []
        try:
            self.channel.shutdown_write()
        except (OSError, EOFError):
            pass

    def stop(self) -> None:
        self.fds = []


def parse_host_key(line: str) -> paramiko.PKey:
    """An ``ssh-ed25519 AAAA... comment`` line as a paramiko key."""
    parts = line.split()
    if len(parts) < 2 or parts[0] != "ssh-ed25519":
        raise SSHError(f"pinned host key is not an ssh-ed25519 key: {line[:40]!r}")
    return paramiko.Ed25519Key(data=base64.b64decode(parts[1]))


def retry(
    attempt: Callable[[], object],
    deadline: float,
    what: str,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    first_delay: float = 0.2,
    max_delay: float = 1.0,
):
    """Call ``attempt`` until it succeeds or ``deadline`` (a ``clock`` time) passes.

    Only connection-level failures are retried (the guest is still booting);
    a wrong host key or a refused key is final and raised at once.
    """
    delay = first_delay
    while True:
        try:
            return attempt()
        except (paramiko.BadHostKeyException, paramiko.AuthenticationException):
            raise
        except RETRYABLE as exc:
            if clock() + delay > deadline:
                raise SSHError(f"{what}: no SSH after waiting ({type(exc).__name__}: {exc})") from exc
            sleep(delay)
            delay = min(delay * 1.5, max_delay)


class _PinnedKeyPolicy(paramiko.MissingHostKeyPolicy):
    def missing_host_key(self, client, hostname, key):  # pragma: no cover - paramiko calls it only when no key is pinned
        raise SSHError(f"no pinned host key for {hostname}; refusing to trust {key.get_name()}")


class GuestSSH:
    """A persistent SSH connection to one guest, through its 127.0.0.1 forward."""

    def __init__(self, vm: str, port: int, key_file: Path, host_key: str, user: str = "root") -> None:
        self.vm = vm
        self.port = port
        self.key_file = key_file
        self.host_key = host_key
        self.user = user
        self._client: paramiko.SSHClient | None = None
        self._probe_timeout = 0.5
        # What layers above keep on this connection (the stats shell's channel) and must stop before it closes.
        self._on_close: list[Callable[[], None]] = []

    def connect(self, timeout: float = SSH_CONNECT, guest_up: bool = False) -> "GuestSSH":
        """Connect, retrying while the guest boots, until ``timeout`` seconds have passed.

        ``guest_up`` says the guest's NICs are known to be up (its console printed
        the ready line, or it was restored from a snapshot). Then a forward that
        closes at once means sshd does not listen yet, worth another try within
        50 ms, and a silent one means sshd is busy forking its child under TCG:
        the banner is waited for instead of the work being thrown away.
        """
        started = time.monotonic()
        deadline = started + timeout
        log.debug("%s: connecting to %s@127.0.0.1:%d (up to %g s%s)", self.vm, self.user, self.port, timeout,
                  ", guest up" if guest_up else "")
        if guest_up:
            self._probe_timeout = max(self._probe_timeout, UP_BANNER_PATIENCE)
        first_delay, max_delay = (0.05, 0.2) if guest_up else (0.2, 1.0)
        try:
            self._client = retry(self._connect_once, deadline, f"{self.vm} (127.0.0.1:{self.port})",
                                 first_delay=first_delay, max_delay=max_delay)
        except paramiko.BadHostKeyException as exc:
            raise SSHRefused(
                f"{self.vm}: the guest's host key changed (got {exc.key.get_fingerprint().hex()[:16]}…): "
                "it is not the image socklab built; rebuild the image or `invoke lab.down` and up again"
            ) from exc
        except paramiko.AuthenticationException as exc:
            raise SSHRefused(f"{self.vm}: the guest refused the socklab key {self.key_file}") from exc
        log.debug("%s: SSH connected in %.3f s", self.vm, time.monotonic() - started)
        return self

    def wait_answering(self, timeout: float = SSH_CONNECT) -> "GuestSSH":
        """Return once sshd sends its banner on the forward, without logging in (retried as ``connect`` is).

        For a guest restored from a snapshot, whose sshd was running when it was saved
        (``Lab._wait_ssh``): the first command logs in instead (in the ``invoke lab.up`` command,
        a login would be thrown away when it ends).
        """
        self._probe_timeout = max(self._probe_timeout, UP_BANNER_PATIENCE)
        retry(self._banner_once, time.monotonic() + timeout, f"{self.vm} (127.0.0.1:{self.port})",
              first_delay=0.05, max_delay=0.2)
        return self

    def _banner_once(self) -> None:
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
            self._peek_banner(sock)
            head = sock.recv(255)  # RFC 4253: the version line is at most 255 bytes
            if not head.startswith(b"SSH-2.0-"):
                raise paramiko.SSHException(f"the forward answered {head[:40]!r}, not an SSH-2.0 banner")

    def _connect_once(self) -> paramiko.SSHClient:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            self._peek_banner(sock)
        except BaseException:
            sock.close()
            raise
        client = paramiko.SSHClient()
        client.get_host_keys().add(f"[127.0.0.1]:{self.port}", "ssh-ed25519", parse_host_key(self.host_key))
        client.set_missing_host_key_policy(_PinnedKeyPolicy())
        try:
            client.connect(
                "127.0.0.1", port=self.port, username=self.user, key_filename=str(self.key_file),
                sock=sock, timeout=5, banner_timeout=5, auth_timeout=5,
                allow_agent=False, look_for_keys=False,
            )
        except BaseException:
            client.close()
            sock.close()
            raise
        # paramiko waits 3,600 s for a channel to open (a command, SFTP, the agent); a paused guest never answers.
        transport_of(client).channel_timeout = SSH_CHANNEL_OPEN
        return client

    def _peek_banner(self, sock: socket.socket) -> None:
        """Wait a short while for sshd's banner without consuming it.

        QEMU's user networking accepts the host side of the forward at once, even
        while the booting guest cannot answer yet; paramiko would then sit out its
        whole banner timeout (5 s) before the next try. A short peek lets a boot
        be noticed within a fraction of a second. The peek's patience grows after
        each miss, so a slow but working sshd (a loaded host) is still reached.
        """
        sock.settimeout(self._probe_timeout)
        try:
            head = sock.recv(4, socket.MSG_PEEK)
        except TimeoutError:
            self._probe_timeout = min(self._probe_timeout * 1.5, 5.0)
            raise
        if not head:
            raise EOFError("the forward closed before sshd answered (the guest is not up yet)")
        sock.settimeout(5)

    @property
    def client(self) -> paramiko.SSHClient:
        if self._client is None:
            raise SSHError(f"{self.vm}: not connected")
        transport = self._client.get_transport()
        if transport is None or not transport.is_active():
            raise SSHError(f"{self.vm}: the SSH connection is gone (sshd or the guest went away)")
        return self._client

    def run(self, command: str | Sequence[str], timeout: float = SSH_COMMAND, check: bool = False,
            merge: bool = False, stdin: bytes | None = None) -> CommandResult:
        """Run ``command`` in the guest and collect what it printed.

        ``command`` is a shell line, or an argv list that reaches the guest word for
        word. With ``merge`` stderr is folded into stdout in the order the guest sent
        it (``result.stderr`` is then empty). ``stdin`` is written to the command's
        standard input, which is closed after it (and at once without it).
        """
        out, err = bytearray(), bytearray()
        status = self.execute(command, timeout=timeout, on_stdout=out.extend, on_stderr=err.extend,
                              merge=merge, stdin=stdin)
        result = CommandResult(status, bytes(out).decode(errors="replace"), bytes(err).decode(errors="replace"))
        if check and not result.ok:
            raise SSHError(f"{self.vm}: {_shown(command)!r} exited {status}: {result.stderr.strip()[-300:]}")
        return result

    def execute(
        self,
        command: str | Sequence[str],
        *,
        timeout: float | None,
        on_stdout: Callable[[bytes], object],
        on_stderr: Callable[[bytes], object],
        merge: bool = False,
        stdin: bytes | int | None = None,
        pty: tuple[str, int, int] | None = None,
    ) -> int:
        """Run ``command`` and stream its output to ``on_stdout``/``on_stderr``; return its exit status.

        Output is read until the channel's EOF *and* its exit status have both
        arrived, whichever comes last: sshd may send the status before the last
        bytes of a stream, and stopping at the status loses them. ``stdin`` is
        bytes, or a file descriptor read until EOF (then the guest's stdin is
        closed). ``pty`` is ``(term, columns, rows)`` for interactive tools.
        A signal that ends the command comes back as 128 + its number, as a shell
        says it. On timeout the command's process group is killed.
        """
        line = command if isinstance(command, str) else shlex.join(command)
        shown = _shown(command)
        log.debug("%s: ssh %s", self.vm, truncate(shown))
        started = time.monotonic()
        try:
            channel = transport_of(self.client).open_session(timeout=OPEN_TIMEOUT)
            if merge:
                channel.set_combine_stderr(True)
            if pty is not None:
                term, columns, rows = pty
                channel.get_pty(term=term, width=columns, height=rows)
            # The first line is the pid of this wrapper shell, a session and group
            # leader under sshd: a timeout kills its group. `sh -c` keeps the user's
            # line apart from ours; `exit $?` reports a signal as 128 + n.
            channel.exec_command(f"echo $$; sh -c {shlex.quote(line)}; exit $?")
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise SSHError(f"{self.vm}: cannot run {shown!r}: SSH is gone ({exc})") from exc
        pid = bytearray()
        header = {"done": False}

        def stdout_chunk(data: bytes) -> None:
            if not header["done"]:
                pid.extend(data)
                if b"\n" not in pid:
                    return
                first, _, rest = bytes(pid).partition(b"\n")
                pid[:] = first.strip()
                header["done"] = True
                data = rest
            if data:
                on_stdout(data)

        feeder = _StdinFeeder(channel, stdin)
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while True:
                remaining = 0.5 if deadline is None else deadline - time.monotonic()
                if remaining <= 0:
                    self._kill_remote(bytes(pid))
                    raise SSHError(f"{self.vm}: {shown!r} timed out after {timeout:.0f} s")
                watched: list[paramiko.Channel | int] = [channel, *feeder.fds]  # the feeder drops its fd at EOF
                readable, _, _ = select.select(watched, [], [], min(remaining, 0.5))
                if feeder.fds and feeder.fds[0] in readable:
                    feeder.pump()
                while channel.recv_ready():
                    stdout_chunk(channel.recv(65536))
                while channel.recv_stderr_ready():
                    on_stderr(channel.recv_stderr(65536))
                drained = not channel.recv_ready() and not channel.recv_stderr_ready()
                ended = channel.eof_received or channel.closed
                if drained and ended and channel.exit_status_ready():
                    break
                if drained and channel.closed and not channel.exit_status_ready():
                    raise SSHError(f"{self.vm}: SSH channel closed while running {shown!r} (sshd or the guest went away)")
            status = channel.recv_exit_status()
        finally:
            feeder.stop()
            channel.close()
        if not header["done"] and pid:
            on_stdout(bytes(pid))  # no pid line at all: never swallow what the guest printed
        log.debug("%s: exit %d in %.3f s: %s", self.vm, status, time.monotonic() - started, truncate(shown, 80))
        return status

    def _kill_remote(self, pid: bytes) -> None:
        if pid.isdigit():
            try:
                channel = transport_of(self.client).open_session(timeout=OPEN_TIMEOUT)
                # sshd makes the command's shell a session (and group) leader, and the
                # exec keeps its pid: killing the group takes its children too.
                # (`kill -KILL -PID`, not `kill -- -PID`: dash, a possible login shell, rejects the latter.)
                channel.exec_command(f"kill -KILL -{int(pid)} 2>/dev/null || kill -KILL {int(pid)}")
                channel.status_event.wait(SSH_EXIT_STATUS)
                channel.close()
            except (paramiko.SSHException, OSError, EOFError, SSHError):
                pass

    def on_close(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` when this connection closes: for what a layer above keeps open on it (the stats shell)."""
        self._on_close.append(callback)

    def put(self, local: Path, remote: str, mode: int | None = None) -> None:
        with self.client.open_sftp() as sftp:
            sftp.put(str(local), remote)
            if mode is not None:
                sftp.chmod(remote, mode)

    def get(self, remote: str, local: Path) -> None:
        with self.client.open_sftp() as sftp:
            sftp.get(remote, str(local))

    def close(self) -> None:
        if self._client is not None:
            # The stats shell kept on this connection holds a channel (and its select pipe) of its own.
            callbacks, self._on_close = self._on_close, []
            for callback in callbacks:
                callback()
            self._client.close()
            self._client = None

    def __enter__(self) -> "GuestSSH":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
