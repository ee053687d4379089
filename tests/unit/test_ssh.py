"""SSH to a guest: retry while it boots, the pinned host key, commands with both streams and timeouts.

The guest's sshd is stood in for by a paramiko server that runs commands locally.
"""

from __future__ import annotations

import subprocess
import time

import paramiko
import pytest

from harness.errors import SSHError
from harness.ssh import GuestSSH, parse_host_key, retry

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
