"""SSH to a guest: retry while it boots, the pinned host key, commands with both streams and timeouts.

The guest's sshd is stood in for by a paramiko server that runs commands locally.
"""

from __future__ import annotations

import subprocess
import time

import paramiko
import pytest

from harness.errors import SSHError
from harness.guest.ssh import GuestSSH, parse_host_key, retry

from .fakes import FakeSSHServer


def keygen(path):
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return path.with_suffix(".pub").read_text().strip()


@pytest.fixture
def keys(tmp_path):
    client_pub = keygen(tmp_path / "client")
    host_pub = keygen(tmp_path / "host")
    other_host_pub = keygen(tmp_path / "other")
    return {"client": tmp_path / "client", "client_pub": client_pub, "host": tmp_path / "host",
            "host_pub": host_pub, "other_host_pub": other_host_pub}


@pytest.fixture
def sshd(keys):
    server = FakeSSHServer(keys["host"], keys["client_pub"])
    yield server
    server.close()


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_retry_backs_off_until_the_guest_answers():
    clock = FakeClock()
    attempts = []

    def attempt():
        attempts.append(clock.now)
        if len(attempts) < 4:
            raise ConnectionRefusedError("not yet")
        return "connected"

    assert retry(attempt, deadline=30, what="vm", clock=clock, sleep=clock.sleep) == "connected"
    assert clock.sleeps == pytest.approx([0.2, 0.3, 0.45])


def test_retry_gives_up_at_the_deadline_with_the_last_error():
    clock = FakeClock()

    def attempt():
        raise paramiko.SSHException("Error reading SSH protocol banner")

    with pytest.raises(SSHError, match="vm: no SSH after waiting .*banner"):
        retry(attempt, deadline=3, what="vm", clock=clock, sleep=clock.sleep)
    assert clock.now <= 3


@pytest.mark.parametrize("final", [paramiko.AuthenticationException("no"), paramiko.BadHostKeyException("h", paramiko.Ed25519Key.__new__(paramiko.Ed25519Key), None)])
def test_retry_never_retries_a_refused_key(final):
    calls = []

    def attempt():
        calls.append(1)
        raise final

    with pytest.raises(type(final)):
        retry(attempt, deadline=30, what="vm", clock=FakeClock(), sleep=lambda s: None)
    assert len(calls) == 1


def test_parse_host_key_rejects_other_types():
    with pytest.raises(SSHError, match="not an ssh-ed25519"):
        parse_host_key("ssh-rsa AAAAB3Nza foo")


def test_run_returns_status_and_both_streams(keys, sshd):
    with GuestSSH("server", sshd.port, keys["client"], keys["host_pub"]).connect(timeout=5) as guest:
        result = guest.run("echo out; echo err >&2; exit 3")
    assert (result.exit_status, result.stdout, result.stderr) == (3, "out\n", "err\n")


def test_run_reads_large_output_on_both_streams_without_deadlock(keys, sshd):
    with GuestSSH("server", sshd.port, keys["client"], keys["host_pub"]).connect(timeout=5) as guest:
        result = guest.run("head -c 300000 /dev/zero | tr '\\0' o; head -c 300000 /dev/zero | tr '\\0' e >&2")
    assert len(result.stdout) == 300000 and len(result.stderr) == 300000


def test_run_timeout_kills_the_remote_command(keys, sshd, tmp_path):
    marker = tmp_path / "survived"
    with GuestSSH("server", sshd.port, keys["client"], keys["host_pub"]).connect(timeout=5) as guest:
        started = time.monotonic()
        with pytest.raises(SSHError, match="timed out after 1 s"):
            guest.run(f"sleep 3 && touch {marker}", timeout=1)
        assert time.monotonic() - started < 3
    time.sleep(3)
    assert not marker.exists()


def _exit_status_before_the_tail(channel):
    """What a real sshd may do: the exit status goes out while the last stderr bytes are still queued."""
    channel.sendall(b"4242\n")  # the wrapper's pid line
    channel.sendall(b"result\n")
    channel.send_exit_status(0)
    time.sleep(0.3)
    channel.sendall_stderr(b"the last diagnostic\n")
    channel.shutdown_write()
    channel.close()


def test_run_keeps_output_that_arrives_after_the_exit_status(keys):
    server = FakeSSHServer(keys["host"], keys["client_pub"], scripts={"selftest": _exit_status_before_the_tail})
    try:
        with GuestSSH("server", server.port, keys["client"], keys["host_pub"]).connect(timeout=5) as guest:
            result = guest.run("./selftest")
    finally:
        server.close()
    assert (result.exit_status, result.stdout, result.stderr) == (0, "result\n", "the last diagnostic\n")


def test_run_waits_for_eof_even_after_the_exit_status(keys):
    """A background child that holds stdout keeps the stream open, as with ssh(1): its output is kept."""
    server = FakeSSHServer(keys["host"], keys["client_pub"])
    try:
        with GuestSSH("server", server.port, keys["client"], keys["host_pub"]).connect(timeout=5) as guest:
            result = guest.run("(sleep 0.5; echo late) & echo early")
    finally:
        server.close()
    assert result.stdout == "early\nlate\n"


def test_argv_reaches_the_guest_word_for_word(keys, sshd):
    argv = ["python3", "-c", "import sys; print(sys.argv[1:])", "a b", "c", "$HOME", "'q'", "x;y"]
    with GuestSSH("server", sshd.port, keys["client"], keys["host_pub"]).connect(timeout=5) as guest:
        result = guest.run(argv)
    assert result.stdout == "['a b', 'c', '$HOME', \"'q'\", 'x;y']\n"


def test_merge_keeps_the_order_of_both_streams(keys, sshd):
    with GuestSSH("server", sshd.port, keys["client"], keys["host_pub"]).connect(timeout=5) as guest:
        result = guest.run("for i in 1 2 3; do echo out$i; sleep 0.1; echo err$i >&2; sleep 0.1; done", merge=True)
    assert (result.stdout, result.stderr) == ("out1\nerr1\nout2\nerr2\nout3\nerr3\n", "")


def test_stdin_bytes_reach_the_command_and_eof_ends_it(keys, sshd):
    with GuestSSH("server", sshd.port, keys["client"], keys["host_pub"]).connect(timeout=5) as guest:
        assert guest.run("base64 -d", stdin=b"aGkK\n", timeout=5).stdout == "hi\n"
        # Without stdin the command sees EOF at once instead of waiting for input that never comes.
        assert guest.run("cat; echo done", timeout=5).stdout == "done\n"


def test_stdin_from_a_file_descriptor_is_streamed_until_eof(keys, sshd):
    import os

    read_end, write_end = os.pipe()
    payload = b"".join(b"line %d\n" % i for i in range(20000))
    import threading

    def writer():
        with os.fdopen(write_end, "wb") as handle:
            handle.write(payload)

    threading.Thread(target=writer, daemon=True).start()
    with GuestSSH("server", sshd.port, keys["client"], keys["host_pub"]).connect(timeout=5) as guest:
        chunks: list[bytes] = []
        status = guest.execute("wc -l", timeout=10, on_stdout=chunks.append, on_stderr=chunks.append, stdin=read_end)
    os.close(read_end)
    assert (status, b"".join(chunks).strip()) == (0, b"20000")


def test_a_signal_comes_back_as_128_plus_its_number(keys, sshd):
    with GuestSSH("server", sshd.port, keys["client"], keys["host_pub"]).connect(timeout=5) as guest:
        assert guest.run("kill -TERM $$").exit_status == 128 + 15


def test_run_check_raises_with_stderr(keys, sshd):
    with GuestSSH("server", sshd.port, keys["client"], keys["host_pub"]).connect(timeout=5) as guest:
        with pytest.raises(SSHError, match="exited 2: boom"):
            guest.run("echo boom >&2; exit 2", check=True)


def test_changed_host_key_is_refused_with_a_clear_message(keys, sshd):
    with pytest.raises(SSHError, match="host key changed"):
        GuestSSH("server", sshd.port, keys["client"], keys["other_host_pub"]).connect(timeout=5)


def test_wrong_client_key_is_refused(keys, sshd, tmp_path):
    keygen(tmp_path / "stranger")
    with pytest.raises(SSHError, match="refused the socklab key"):
        GuestSSH("server", sshd.port, tmp_path / "stranger", keys["host_pub"]).connect(timeout=5)


def test_connect_to_nothing_times_out_with_the_vm_named(keys):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: connections are refused
        with pytest.raises(SSHError, match=f"server \\(127.0.0.1:{port}\\): no SSH after waiting"):
            GuestSSH("server", port, keys["client"], keys["host_pub"]).connect(timeout=1)


def test_commands_need_a_connection(keys):
    guest = GuestSSH("server", 1, keys["client"], keys["host_pub"])
    with pytest.raises(SSHError, match="not connected"):
        guest.run("true")


def test_a_silent_forward_is_retried_quickly_with_growing_patience(keys):
    """QEMU's forward accepts before the guest can answer: each try gives up fast, then waits longer."""
    import socket
    import threading

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    accepted = []

    def accept_and_stay_silent():
        while True:
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept_and_stay_silent, daemon=True).start()
    guest = GuestSSH("server", listener.getsockname()[1], keys["client"], keys["host_pub"])
    started = time.monotonic()
    try:
        with pytest.raises(SSHError, match="no SSH after waiting"):
            guest.connect(timeout=3)
    finally:
        listener.close()
        for conn in accepted:
            conn.close()
    assert time.monotonic() - started < 6
    assert len(accepted) >= 3  # several short tries, not one 5 s banner wait
    assert guest._probe_timeout > 0.5


class Forward:
    """QEMU's hostfwd in front of the fake sshd: accepts at once, then closes the first ``refuse``
    connections (the guest's RST while sshd is not listening yet), and holds every other one
    silent for ``delay`` seconds (sshd forking its child under TCG) before relaying it."""

    def __init__(self, target_port: int, refuse: int = 0, delay: float = 0.0) -> None:
        import socket
        import threading

        self.target_port, self.refuse, self.delay = target_port, refuse, delay
        self.accepted: list[float] = []
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(16)
        self.port = self._listener.getsockname()[1]
        self._conns: list[socket.socket] = []
        threading.Thread(target=self._accept_loop, daemon=True).start()

    def _accept_loop(self) -> None:
        import threading

        while True:
            try:
                conn = self._listener.accept()[0]
            except OSError:
                return
            self.accepted.append(time.monotonic())
            self._conns.append(conn)
            if len(self.accepted) <= self.refuse:
                conn.close()
                continue
            threading.Thread(target=self._relay, args=(conn,), daemon=True).start()

    def _relay(self, conn) -> None:
        import socket
        import threading

        time.sleep(self.delay)
        try:
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
        except OSError:
            return
        self._conns.append(upstream)

        def pump(src, dst):
            try:
                while data := src.recv(65536):
                    dst.sendall(data)
            except OSError:
                pass

        threading.Thread(target=pump, args=(upstream, conn), daemon=True).start()
        pump(conn, upstream)
        upstream.close()  # the client gave up on this one: so does the fake sshd's side

    def close(self) -> None:
        self._listener.close()
        for conn in self._conns:
            conn.close()


def test_a_guest_known_to_be_up_gets_the_time_its_banner_takes(keys, sshd):
    """A restored guest's first banner can take over a second: the attempt waits for it, not starts again.

    (Not known to be up, the same 1.2 s silence is abandoned after 0.5 s: the silent-forward test above.)
    """
    forward = Forward(sshd.port, delay=1.2)
    try:
        guest = GuestSSH("server", forward.port, keys["client"], keys["host_pub"]).connect(timeout=5, guest_up=True)
        assert guest.run("echo up").stdout == "up\n"
        guest.close()
    finally:
        forward.close()
    assert len(forward.accepted) == 1


def test_a_guest_known_to_be_up_is_tried_again_at_once_while_sshd_starts(keys, sshd):
    forward = Forward(sshd.port, refuse=4)
    try:
        GuestSSH("server", forward.port, keys["client"], keys["host_pub"]).connect(timeout=5, guest_up=True).close()
    finally:
        forward.close()
    gaps = [b - a for a, b in zip(forward.accepted, forward.accepted[1:])]
    assert len(forward.accepted) == 5 and max(gaps) < 0.5, gaps  # 0.05 s growing to 0.2 s, not 0.2 s to 1 s


def test_waiting_for_the_banner_tries_again_while_sshd_starts_and_keeps_no_connection(keys, sshd):
    forward = Forward(sshd.port, refuse=3, delay=0.3)
    try:
        guest = GuestSSH("server", forward.port, keys["client"], keys["host_pub"]).wait_answering(timeout=5)
        assert len(forward.accepted) == 4  # three refused, then one that waited 0.3 s for its banner
        with pytest.raises(SSHError, match="not connected"):
            guest.client  # noqa: B018 - no connection was kept
    finally:
        forward.close()


def test_a_forward_that_answers_no_ssh_banner_is_not_an_answering_sshd(keys):
    import socket
    import threading

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)

    def answer_http():
        while True:
            try:
                conn = listener.accept()[0]
            except OSError:
                return
            conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
            conn.close()

    threading.Thread(target=answer_http, daemon=True).start()
    try:
        with pytest.raises(SSHError, match="not an SSH-2.0 banner"):
            GuestSSH("server", listener.getsockname()[1], keys["client"], keys["host_pub"]).wait_answering(timeout=1)
    finally:
        listener.close()
