"""The host-side agent client against a paramiko-like channel that runs the command as a local subprocess."""

from __future__ import annotations

import dataclasses
import os
import pwd
import shlex
import signal
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import pytest

from harness.guest import client as agent_mod
from harness.guest.client import (
    GUEST_AGENT, Agent, AgentDied, AgentGuestStopped, AgentHost, AgentReply, AgentRequestError, AgentTimeout,
    decode_reply,
    describe_step, encode_args, measure_latency,
)
from harness.errors import LabError


class LocalChannel:
    """Enough of paramiko.Channel for the agent client, backed by ``/bin/sh -c`` on this host.

    Like paramiko, stdout and stderr are buffered by background readers and ``fileno()`` is a
    pipe that select() sees readable while anything (data, EOF, exit) is waiting. ``chunk``
    caps what one recv() returns, to split replies at arbitrary bytes.
    """

    def __init__(self, chunk: int | None = None) -> None:
        self.chunk = chunk
        self.out = bytearray()
        self.err = bytearray()
        self.lock = threading.Lock()
        self.event_r, self.event_w = os.pipe()
        self.event_set = False
        self.eof_received = False
        self.closed = False
        self.status: int | None = None
        self.proc: subprocess.Popen | None = None
        self.readers: list[threading.Thread] = []
        self.waiter: threading.Thread | None = None

    def exec_command(self, command: str) -> None:
        self.proc = subprocess.Popen(["/bin/bash", "-c", command], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, start_new_session=True)
        self.readers = [threading.Thread(target=self._read, args=(self.proc.stdout, self.out, True), daemon=True),
                        threading.Thread(target=self._read, args=(self.proc.stderr, self.err, False), daemon=True)]
        self.waiter = threading.Thread(target=self._wait, daemon=True)
        for thread in (*self.readers, self.waiter):
            thread.start()

    def _read(self, stream, buffer: bytearray, is_stdout: bool) -> None:
        for chunk in iter(lambda: stream.read1(65536), b""):
            with self.lock:
                buffer += chunk
                self._update()
        if is_stdout:
            with self.lock:
                self.eof_received = True
                self._update()

    def _wait(self) -> None:
        status = self.proc.wait()
        for reader in self.readers:
            reader.join()
        with self.lock:
            self.status = status if status >= 0 else -1  # sshd sends exit-signal, paramiko then says -1
            self._update()

    def _update(self) -> None:
        wanted = bool(self.out or self.err or self.eof_received or self.status is not None or self.closed)
        if wanted and not self.event_set:
            os.write(self.event_w, b"!")
        elif not wanted and self.event_set:
            os.read(self.event_r, 1)
        self.event_set = wanted

    def fileno(self) -> int:
        return self.event_r

    def recv_ready(self) -> bool:
        return bool(self.out)

    def recv_stderr_ready(self) -> bool:
        return bool(self.err)

    def _take(self, buffer: bytearray, size: int) -> bytes:
        with self.lock:
            size = min(size, self.chunk or size)
            data = bytes(buffer[:size])
            del buffer[:size]
            self._update()
            return data

    def recv(self, size: int) -> bytes:
        return self._take(self.out, size)

    def recv_stderr(self, size: int) -> bytes:
        return self._take(self.err, size)

    def exit_status_ready(self) -> bool:
        return self.status is not None

    def recv_exit_status(self) -> int:
        while self.status is None:
            time.sleep(0.01)
        return self.status

    def sendall(self, data: bytes) -> None:
        if self.closed:
            raise OSError("Socket is closed")
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def shutdown_write(self) -> None:
        self.proc.stdin.close()

    def close(self) -> None:
        self.closed = True
        try:
            self.proc.stdin.close()
        except OSError:
            pass

    def kill(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            for thread in (*self.readers, self.waiter):
                thread.join(timeout=5)  # before the event pipe closes under them
            for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
                try:
                    stream.close()
                except OSError:
                    pass
        for fd in (self.event_r, self.event_w):
            try:
                os.close(fd)
            except OSError:
                pass


class LocalSFTP:
    """paramiko.SFTPClient calls the push uses, on the local file system; counts uploads."""

    def __init__(self, transport: "LocalTransport") -> None:
        self.transport = transport

    def __enter__(self) -> "LocalSFTP":
        self.transport.sftp_sessions += 1
        return self

    def __exit__(self, *exc) -> None:
        pass

    def stat(self, path: str) -> os.stat_result:
        return os.stat(path)

    def mkdir(self, path: str, mode: int = 0o777) -> None:
        os.mkdir(path, mode)

    def chmod(self, path: str, mode: int) -> None:
        os.chmod(path, mode)

    def putfo(self, handle, path: str) -> None:
        Path(path).write_bytes(handle.read())
        self.transport.uploads.append(path)

    def posix_rename(self, old: str, new: str) -> None:
        os.rename(old, new)

    def listdir(self, path: str) -> list[str]:
        return os.listdir(path)

    def remove(self, path: str) -> None:
        os.unlink(path)


class LocalTransport:
    def __init__(self, chunk: int | None = None) -> None:
        self.chunk = chunk
        self.channels: list[LocalChannel] = []
        self.uploads: list[str] = []
        self.sftp_sessions = 0
        self.open_timeouts: list[float | None] = []

    def open_session(self, timeout: float | None = None) -> LocalChannel:
        self.open_timeouts.append(timeout)
        channel = LocalChannel(self.chunk)
        self.channels.append(channel)
        return channel


class LocalClient:
    def __init__(self, transport: LocalTransport) -> None:
        self.transport = transport

    def get_transport(self) -> LocalTransport:
        return self.transport

    def open_sftp(self) -> LocalSFTP:
        return LocalSFTP(self.transport)


class LocalGuestSSH:
    """Stands in for harness.guest.ssh.GuestSSH: a name, a connected client, and run()."""

    def __init__(self, vm: str = "vm-under-test", chunk: int | None = None) -> None:
        self.vm = vm
        self.transport = LocalTransport(chunk)
        self.client = LocalClient(self.transport)

    def run(self, command: str, timeout: float = 30.0, check: bool = False):
        return subprocess.run(["/bin/sh", "-c", command], capture_output=True, timeout=timeout, check=check)

    def kill_all(self) -> None:
        for channel in self.transport.channels:
            channel.kill()


@pytest.fixture
def remote_dir():
    # World-traversable, unlike pytest's tmp_path, so an agent run as another user can read it.
    directory = tempfile.mkdtemp(prefix="socklab-agent-test-")
    os.chmod(directory, 0o755)
    yield directory
    stop_agent_servers(Path(directory))
    shutil.rmtree(directory, ignore_errors=True)


def stop_agent_servers(directory: Path) -> list[int]:
    """SIGTERM the agent servers (agent.py --serve) the shells started for ``directory``; their pids.

    Found by command line, not pid file: a server whose pid file a newer version removed is
    still running until its next look, and one started by a fallback may not have written it yet.
    """
    stopped = []
    deadline = time.monotonic() + 0.3  # a server a shell started a moment ago shows up late
    while time.monotonic() < deadline:
        for proc in Path("/proc").iterdir():
            try:
                words = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"--serve" in words and any(word.startswith(str(directory).encode()) for word in words):
                try:
                    os.kill(int(proc.name), signal.SIGTERM)
                    stopped.append(int(proc.name))
                except (OSError, ValueError):
                    pass
        time.sleep(0.1)
    return stopped


@pytest.fixture
def ssh():
    guest = LocalGuestSSH()
    yield guest
    guest.kill_all()


def local_agent(ssh, remote_dir: str, **options) -> Agent:
    options.setdefault("python", sys.executable)
    return Agent(ssh, user=options.pop("user", "root"), remote_dir=f"{remote_dir}/run", **options)


def fake_agent_source(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "fake_agent.py"
    path.write_text(textwrap.dedent(body))
    return path


# -- start and push ---------------------------------------------------------------------------------

def test_start_pushes_once_per_connection_and_again_when_the_content_changes(ssh, remote_dir, tmp_path):
    first = local_agent(ssh, remote_dir).start()
    assert first.hello["protocol"] == 1 and first.hello["uid"] == os.getuid()
    assert len(ssh.transport.uploads) == 1
    pushed = Path(ssh.transport.uploads[0]).with_suffix("")  # the staging name ends in .part
    assert pushed.parent == Path(remote_dir) / "run"
    second = local_agent(ssh, remote_dir).start()
    assert len(ssh.transport.uploads) == 1 and ssh.transport.sftp_sessions == 1  # known: not even a stat
    assert first.hello["pid"] != second.hello["pid"]

    other = LocalGuestSSH("another-connection")
    try:
        local_agent(other, remote_dir).start().close()
        # The guest already holds this version: the exec line found it, and no SFTP session was opened.
        assert other.transport.uploads == [] and other.transport.sftp_sessions == 0
    finally:
        other.kill_all()

    # The first start left the old version's server starting in the background: wait for its pid
    # file, or the push below could come before the server wrote it, and there would be nothing to remove.
    old_pid = Path(remote_dir) / "run" / f"{agent_mod.agent_module(GUEST_AGENT.read_bytes())}.serve" / "pid"
    deadline = time.monotonic() + 30
    while not old_pid.exists():
        assert time.monotonic() < deadline, "the old version's agent server never wrote its pid file"
        time.sleep(0.02)
    changed = tmp_path / "agent.py"
    changed.write_bytes(GUEST_AGENT.read_bytes() + b"\n# changed\n")
    third = local_agent(ssh, remote_dir, source=changed).start()
    assert len(ssh.transport.uploads) == 2
    # Only the newest version stays, with its compiled code; the agents started from the old file keep running.
    # Servers' directories are not counted: the third start's server may still be claiming its own
    # (agent.py's AgentServer.claim(): X.serve.PID, then a rename to X.serve; seen once in a full suite).
    run = Path(remote_dir) / "run"
    newest = agent_mod.agent_module(changed.read_bytes())
    assert sorted(p.name for p in run.iterdir() if ".serve" not in p.name) == ["__pycache__", f"{newest}.py"]
    # The old version's server lost its pid file, so it stops at its next look (SERVE_CHECK_S). One of
    # the old version's servers that was still starting may claim just now; it finds its module gone and
    # lets go at once (agent.py's AgentServer.claim()).
    old_pids = lambda: list(run.glob(f"{agent_mod.agent_module(GUEST_AGENT.read_bytes())}.serve/pid"))  # noqa: E731
    deadline = time.monotonic() + 5
    while old_pids() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not old_pids()
    assert [p.name.split(".")[0] for p in (run / "__pycache__").iterdir()] == [newest]
    assert first.call("socket", family=2, type=1).ret == 3
    assert oct(run.stat().st_mode & 0o777) == "0o755"
    assert oct((run / "__pycache__").stat().st_mode & 0o777) == "0o755"
    for agent in (first, second, third):
        agent.close()


def test_command_lines_for_root_and_other_users(ssh):
    root = Agent(ssh, "server").direct_command("/run/socklab/agent/agent_x.py")
    words = shlex.split(root)
    assert words[:5] == ["exec", "/usr/bin/python3", "-I", "-S", "-c"]
    assert words[5] == agent_mod.LOADER
    assert words[6:] == ["/run/socklab/agent", "agent_x", "--block-ms", "2000"]
    assert agent_mod.REMOTE_DIR == "/run/socklab/agent"
    student = Agent(ssh, "server", "student", block_ms=500).direct_command("/run/socklab/agent/agent_x.py")
    assert "id -u student" in student and "id -g student" in student
    assert 'exec setpriv --reuid="$uid" --regid="$gid" --init-groups --reset-env /usr/bin/python3 -I -S -c' in student
    assert student.endswith("agent_x --block-ms 500")


def test_the_exec_line_asks_the_server_and_falls_back_to_the_direct_line(ssh):
    line = Agent(ssh, "server", "student", block_ms=500).command("/run/socklab/agent/agent_x.py")
    assert line.startswith("z=/run/socklab/agent/agent_x.serve; ")
    assert 'echo "$$ student 500 $f" 1<>"$z/requests"' in line
    assert "/usr/bin/python3 -I -S -B -c" in line  # the server never writes the compiled agent
    assert "/run/socklab/agent agent_x --serve </dev/null >/dev/null 2>&1 &" in line
    assert line.endswith(Agent(ssh, "server", "student", block_ms=500).direct_command("/run/socklab/agent/agent_x.py"))


def test_the_host_and_the_guest_agree_on_the_servers_names_and_descriptors():
    guest = agent_module_loaded()
    assert (guest.SERVE_SUFFIX, guest.SESSION_FDS) == (agent_mod.SERVE_SUFFIX, agent_mod.SESSION_FDS)
    assert guest.serve_dir("/run/socklab/agent/agent_x.py") == "/run/socklab/agent/agent_x.serve"


def agent_module_loaded():
    import importlib.util

    spec = importlib.util.spec_from_file_location("socklab_agent_constants", GUEST_AGENT)
    guest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(guest)
    return guest


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="the agent server runs as root, as in the guest")


def wait_for_server(remote_dir: str, timeout: float = 20.0) -> int:
    pid_files = Path(remote_dir, "run").glob
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pid_file in pid_files("agent_*.serve/pid"):
            try:
                pid = int(pid_file.read_text())
            except (OSError, ValueError):
                continue
            return pid
        time.sleep(0.05)
    raise AssertionError("no agent server started")


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


@needs_root
def test_the_first_agent_starts_the_server_and_the_next_are_its_children(ssh, remote_dir):
    first = local_agent(ssh, remote_dir).start()
    server = wait_for_server(remote_dir)
    assert parent_of(first.hello["pid"]) != server  # the first ran directly, and started the server
    serve = next(Path(remote_dir, "run").glob("agent_*.serve"))
    assert oct(serve.stat().st_mode & 0o777) == "0o700" and oct((serve / "requests").stat().st_mode & 0o777) == "0o600"
    second = local_agent(ssh, remote_dir, block_ms=700).start()
    assert parent_of(second.hello["pid"]) == server
    # A fresh agent's descriptors: the scenario's first socket is fd 3 and the session's pipes are its stdio.
    assert second.call("socket", family="AF_INET", type="SOCK_STREAM").ret == 3
    assert Path(f"/proc/{second.hello['pid']}/cwd").resolve() == Path.cwd().resolve()
    assert second.close() == 0 and first.close() == 0
    assert not list(serve.glob("done.*"))  # each shell removed its FIFO


@needs_root
def test_start_server_returns_once_the_server_answers_and_the_next_agent_is_its_child(ssh, remote_dir):
    agent = local_agent(ssh, remote_dir)
    agent.start_server(timeout=20)
    assert not agent.running  # its own agent is closed: only the server stays, as lab.up saves it
    served = local_agent(ssh, remote_dir).start()  # no waiting: start_server saw the pid file and the FIFO
    assert parent_of(served.hello["pid"]) == wait_for_server(remote_dir, timeout=0.1)
    assert served.close() == 0


@needs_root
def test_a_served_agent_that_is_killed_is_named_with_the_signal(ssh, remote_dir):
    local_agent(ssh, remote_dir).start().close()
    wait_for_server(remote_dir)
    agent = local_agent(ssh, remote_dir).start()
    os.kill(agent.hello["pid"], signal.SIGKILL)
    with pytest.raises(AgentDied, match=r"died during socket\(.*\(exit status 137\)"):
        agent.call("socket", family="AF_INET", type="SOCK_STREAM")


@needs_root
def test_an_agent_killed_with_its_server_is_named_without_a_made_up_status(ssh, remote_dir):
    local_agent(ssh, remote_dir).start().close()
    server = wait_for_server(remote_dir)
    agent = local_agent(ssh, remote_dir).start()
    assert parent_of(agent.hello["pid"]) == server
    os.kill(server, signal.SIGKILL)  # as `pkill -KILL -f agent_<hash>` kills both
    os.kill(agent.hello["pid"], signal.SIGKILL)
    with pytest.raises(AgentDied, match=r"died during socket\(.*it exited before answering; agent stderr") as died:
        agent.call("socket", family="AF_INET", type="SOCK_STREAM")
    assert "exit status" not in str(died.value)


@needs_root
def test_a_request_to_an_agent_that_already_exited_says_so(ssh, remote_dir):
    """The write of the request fails (broken pipe) after the agent's exit reached the channel: still 'exited'."""
    local_agent(ssh, remote_dir).start().close()
    server = wait_for_server(remote_dir)
    agent = local_agent(ssh, remote_dir).start()
    os.kill(server, signal.SIGKILL)
    os.kill(agent.hello["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while not agent._channel.exit_status_ready():  # the exec line noticed: its status is in
        assert time.monotonic() < deadline, "the exec line never ended"
        time.sleep(0.02)
    with pytest.raises(AgentDied, match=r"died during socket\(.*\): it exited before answering; agent stderr"):
        agent.call("socket", family="AF_INET", type="SOCK_STREAM")


@needs_root
def test_a_served_agent_as_another_user_is_that_user_with_no_capabilities(ssh, remote_dir):
    # The system's Python, as in the guest: nobody cannot read an interpreter under /root.
    local_agent(ssh, remote_dir, python="/usr/bin/python3").start().close()
    server = wait_for_server(remote_dir)
    with local_agent(ssh, remote_dir, user="nobody", python="/usr/bin/python3") as agent:
        assert parent_of(agent.hello["pid"]) == server
        nobody = pwd.getpwnam("nobody")
        assert (agent.hello["uid"], agent.hello["euid"], agent.hello["gid"]) == (nobody.pw_uid,) * 2 + (nobody.pw_gid,)
        assert int(agent.hello["cap_eff"], 16) == 0 and int(agent.hello["cap_prm"], 16) == 0
        assert agent.hello["groups"] == os.getgrouplist("nobody", nobody.pw_gid)
        # Dumpable again after the uid change: its /proc files are the user's, as for a program it exec'd.
        assert Path(f"/proc/{agent.hello['pid']}/status").stat().st_uid == nobody.pw_uid


@needs_root
def test_a_killed_server_is_replaced_and_the_agent_meanwhile_runs_directly(ssh, remote_dir):
    local_agent(ssh, remote_dir).start().close()
    server = wait_for_server(remote_dir)
    os.kill(server, signal.SIGKILL)  # no clean-up: its directory and pid file stay
    while Path(f"/proc/{server}").exists() and Path(f"/proc/{server}/stat").read_text().split()[2] != "Z":
        time.sleep(0.05)
    meanwhile = local_agent(ssh, remote_dir).start()
    assert meanwhile.call("socket", family="AF_INET", type="SOCK_STREAM").ret == 3
    deadline = time.monotonic() + 20
    while (replacement := wait_for_server(remote_dir)) == server and time.monotonic() < deadline:
        time.sleep(0.05)
    assert replacement != server
    later = local_agent(ssh, remote_dir).start()
    assert parent_of(later.hello["pid"]) == replacement
    assert later.close() == 0 and meanwhile.close() == 0


def test_the_agent_runs_as_a_module_and_keeps_its_compiled_code(ssh, remote_dir):
    """The second start reads the compiled agent from __pycache__ instead of compiling 2,000 lines again."""
    first = local_agent(ssh, remote_dir).start()
    first.close()
    cache = Path(remote_dir) / "run" / "__pycache__"
    compiled = list(cache.iterdir())
    assert [p.name.split(".")[0] for p in compiled] == [agent_mod.agent_module(GUEST_AGENT.read_bytes())]
    written = compiled[0].stat().st_mtime_ns
    second = local_agent(ssh, remote_dir).start()
    assert second.call("socket", family=2, type=1).ret == 3
    second.close()
    assert compiled[0].stat().st_mtime_ns == written  # read, not written again


# -- steps ------------------------------------------------------------------------------------------

def test_steps_round_trip_with_constant_names_and_structured_replies(remote_dir):
    ssh = LocalGuestSSH(chunk=5)  # every reply arrives in 5-byte pieces
    try:
        with local_agent(ssh, remote_dir) as agent:
            fd = agent.call("socket", family="AF_INET", type="SOCK_STREAM", protocol=0)
            assert isinstance(fd, AgentReply) and (fd.ret, fd.errno, fd.vm, fd.op) == (3, None, "vm-under-test", "socket")
            assert fd.t_ns > 0 and fd.dt_ns >= 0 and fd.rtt_ns > fd.dt_ns
            assert agent.call("bind", fd=3, addr=("127.0.0.1", 0)).ok
            assert agent.call("listen", fd=3, backlog=-1).ret == 0
            name = agent.call("getsockname", fd=3).ret
            assert isinstance(name, tuple) and name[0] == "127.0.0.1"
            client = agent.call("socket", family="AF_INET", type="SOCK_STREAM|SOCK_NONBLOCK").ret
            assert agent.call("connect", fd=client, addr=name).errno == "EINPROGRESS"
            assert agent.call("poll", fds=[(client, "POLLOUT")], timeout_ms=2000).ret == {client: 4}
            accepted = agent.call("accept4", fd=3, flags="SOCK_CLOEXEC")
            assert accepted.extra["peer"][0] == "127.0.0.1" and isinstance(accepted.extra["peer"], tuple)
            assert agent.call("send", fd=client, data=b"\x00hi\xff").ret == 4
            agent.call("wait_readable", fd=accepted.ret, timeout_ms=2000)
            received = agent.call("recv", fd=accepted.ret, length=16)
            assert received.data == b"\x00hi\xff"
            refused = agent.call("accept", fd=client)
            assert (refused.ret, refused.errno, refused.ok) == (-1, "EINVAL", False)
            with pytest.raises(dataclasses.FrozenInstanceError):
                refused.ret = 0  # type: ignore[misc]
    finally:
        ssh.kill_all()


def test_large_requests_and_replies_cross_intact(remote_dir):
    ssh = LocalGuestSSH(chunk=4093)
    try:
        with local_agent(ssh, remote_dir) as agent:
            lfd = agent.call("socket", family="AF_INET", type="SOCK_STREAM").ret
            agent.call("bind", fd=lfd, addr=("127.0.0.1", 0))
            agent.call("listen", fd=lfd, backlog=1)
            port = agent.call("getsockname", fd=lfd).ret[1]
            cfd = agent.call("socket", family="AF_INET", type="SOCK_STREAM").ret
            agent.call("connect", fd=cfd, addr=("127.0.0.1", port))
            afd = agent.call("accept", fd=lfd).ret
            payload = os.urandom(400_000)
            sent = agent.call("send", fd=cfd, data=payload, flags="MSG_DONTWAIT").ret
            assert sent > 100_000
            got = b""
            while len(got) < sent:
                got += agent.call("recv", fd=afd, length=1 << 20, flags="MSG_DONTWAIT").data
            assert got == payload[:sent]
    finally:
        ssh.kill_all()


def test_an_unknown_op_raises_naming_the_vm_and_the_step(ssh, remote_dir):
    with local_agent(ssh, remote_dir) as agent:
        with pytest.raises(AgentRequestError) as caught:
            agent.call("bindd", fd=3, addr=("127.0.0.1", 0))
        text = str(caught.value)
        assert "vm-under-test" in text and "bindd(fd=3, addr=('127.0.0.1', 0))" in text and "unknown op" in text
        reply = agent.request("bindd", {"fd": 3}, check=False)
        assert reply.errno == "ENOSYS" and "unknown op" in reply.error and not reply.ok
        assert agent.call("socket", family=2, type=1).ret == 3  # the session goes on
    assert isinstance(caught.value, LabError)


def test_an_unknown_constant_name_is_refused_before_sending(ssh, remote_dir):
    with local_agent(ssh, remote_dir) as agent:
        with pytest.raises(AgentRequestError, match="SOCK_STREEM"):
            agent.call("socket", family="AF_INET", type="SOCK_STREEM")
        assert agent.call("socket", family="AF_INET", type="SOCK_DGRAM").ret == 3


def test_a_timeout_names_the_step_and_the_late_reply_is_skipped(ssh, remote_dir):
    with local_agent(ssh, remote_dir) as agent:
        started = time.monotonic()
        with pytest.raises(AgentTimeout) as caught:
            agent.request("sleep", {"seconds": 1}, timeout=0.2)
        assert time.monotonic() - started < 0.9
        assert "vm-under-test" in str(caught.value) and "sleep(seconds=1)" in str(caught.value)
        assert "0.2 s" in str(caught.value)
        assert agent.call("socket", family=2, type=2).ret == 3  # the sleep's reply came first and was dropped


def test_a_stopped_vm_is_reported_while_the_agent_waits_not_after_the_step_timeout(ssh, remote_dir):
    """The watch is asked every WATCH_INTERVAL s of silence; a fault ends the wait at once, the agent is dropped."""
    looks = []

    def watch():
        looks.append(time.monotonic())
        return "QEMU of vm-under-test (pid 42) is stopped (process state T)" if len(looks) >= 2 else None

    with local_agent(ssh, remote_dir, watch=watch) as agent:
        started = time.monotonic()
        with pytest.raises(AgentGuestStopped, match="cannot answer sleep.*process state T"):
            agent.request("sleep", {"seconds": 30}, timeout=60)
        took = time.monotonic() - started
        assert 2 * agent_mod.WATCH_INTERVAL <= took < 2 * agent_mod.WATCH_INTERVAL + 1.5
        assert not agent.running


def test_every_channel_the_agent_opens_has_a_bound(ssh, remote_dir):
    with local_agent(ssh, remote_dir) as agent:
        agent.call("socket", family=2, type=2)
    # Two execs: the first found no agent file, the push followed, then the agent ran.
    assert ssh.client.get_transport().open_timeouts == [agent_mod.SSH_CHANNEL_OPEN] * 2


def test_a_full_guest_file_system_is_named_when_the_agent_cannot_be_copied(ssh, remote_dir, monkeypatch):
    """SFTP says only "size mismatch" for a full tmpfs; the error says which file system is full."""
    from types import SimpleNamespace

    def full(self, handle, path):
        Path(path).write_bytes(b"")
        raise OSError("size mismatch in put!  0 != 46810")

    monkeypatch.setattr(LocalSFTP, "putfo", full)
    ssh.run = lambda command, timeout=30.0, check=False: SimpleNamespace(
        stdout="Filesystem 1024-blocks Used Available Capacity Mounted on\ntmpfs 240000 240000 0 100% /run\n")
    with pytest.raises(agent_mod.AgentPushError, match=r"size mismatch in put.*; the guest's /run is full \(0 KiB free\)"):
        local_agent(ssh, remote_dir).start()


def test_a_copy_that_fails_with_room_to_spare_blames_no_disk(ssh, remote_dir, monkeypatch):
    from types import SimpleNamespace

    def broken(self, handle, path):
        raise OSError("Failure")

    monkeypatch.setattr(LocalSFTP, "putfo", broken)
    ssh.run = lambda command, timeout=30.0, check=False: SimpleNamespace(stdout="tmpfs 240000 10 239990 1% /run\n")
    with pytest.raises(agent_mod.AgentPushError) as caught:
        local_agent(ssh, remote_dir).start()
    assert str(caught.value).endswith("Failure")


def test_step_timeouts_stretch_for_steps_that_wait(ssh):
    agent = Agent(ssh, timeout=10.0, block_ms=2000)
    assert agent.step_timeout("bind", {}) == 10.0
    assert agent.step_timeout("sleep", {"seconds": 30}) == 35.0
    assert agent.step_timeout("poll", {"fds": [3], "timeout_ms": 20000}) == 25.0
    assert agent.step_timeout("accept", {"fd": 3, "block_ms": 60000}) == 65.0


# -- failures ---------------------------------------------------------------------------------------

def test_agent_death_mid_step_names_the_step_and_shows_stderr(ssh, remote_dir, tmp_path):
    source = fake_agent_source(tmp_path, """
        import sys
        print('{"hello": {"protocol": 1, "pid": 1}}', flush=True)
        sys.stdin.readline()
        sys.stderr.write("Traceback: simulated crash inside bind\\n")
        sys.exit(3)
    """)
    agent = local_agent(ssh, remote_dir, source=source).start()
    with pytest.raises(AgentDied) as caught:
        agent.call("bind", fd=3, addr=("198.51.100.2", 7000))
    text = str(caught.value)
    assert "vm-under-test" in text and "bind(fd=3, addr=('198.51.100.2', 7000))" in text
    assert "simulated crash inside bind" in text and "exit status 3" in text
    assert not agent.running
    with pytest.raises(AgentDied, match="not running"):
        agent.call("close", fd=3)


def test_a_killed_agent_is_reported_with_the_step_it_was_running(ssh, remote_dir):
    agent = local_agent(ssh, remote_dir).start()
    threading.Timer(0.3, lambda: ssh.transport.channels[-1].proc.kill()).start()
    with pytest.raises(AgentDied, match=r"sleep\(seconds=20\)"):
        agent.call("sleep", seconds=20)


def test_garbage_on_stdout_is_a_death_not_a_hang(ssh, remote_dir, tmp_path):
    source = fake_agent_source(tmp_path, """
        import sys, time
        print('{"hello": {"protocol": 1}}', flush=True)
        sys.stdin.readline()
        print("Segmentation fault (core dumped)", flush=True)
        time.sleep(30)
    """)
    agent = local_agent(ssh, remote_dir, source=source).start()
    with pytest.raises(AgentDied, match="not JSON.*Segmentation fault"):
        agent.call("listen", fd=3, backlog=1)


def test_an_agent_that_cannot_start_reports_why(ssh, remote_dir):
    agent = local_agent(ssh, remote_dir, python="/nonexistent/python3")
    with pytest.raises(AgentDied) as caught:
        agent.start()
    assert "vm-under-test" in str(caught.value) and "/nonexistent/python3" in str(caught.value)


def test_a_wrong_greeting_is_refused(ssh, remote_dir, tmp_path):
    source = fake_agent_source(tmp_path, """
        import sys
        print('{"hello": {"protocol": 99}}', flush=True)
        sys.stdin.read()
    """)
    with pytest.raises(AgentDied, match="protocol 1 hello"):
        local_agent(ssh, remote_dir, source=source).start()


def test_close_ends_the_agent_which_closes_its_sockets(ssh, remote_dir):
    agent = local_agent(ssh, remote_dir).start()
    agent.call("socket", family=2, type=1)
    agent.call("socket", family=2, type=2)
    assert agent.close() == 0
    assert 'cleanup {"closed": [3, 4]' in agent.stderr_tail
    assert agent.close() == 0  # twice is fine
    with pytest.raises(AgentDied, match="not running"):
        agent.call("socket", family=2, type=1)


def test_reset_keeps_the_agent_and_frees_the_numbers(ssh, remote_dir):
    with local_agent(ssh, remote_dir) as agent:
        agent.call("socket", family=2, type=1)
        assert agent.reset().extra["closed"] == [3]
        assert agent.call("socket", family=2, type=1).ret == 3
        assert agent.reset(keep_tracing=True).extra["closed"] == [3]  # the agent takes {"tracing": "keep"}
        assert agent.call("socket", family=2, type=1).ret == 3


# -- another user -----------------------------------------------------------------------------------

@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None or not Path("/usr/bin/python3").exists(),
                    reason="needs root, setpriv and /usr/bin/python3")
def test_an_agent_as_another_user_has_no_capabilities(ssh, remote_dir):
    with local_agent(ssh, remote_dir, user="nobody", python="/usr/bin/python3") as agent:
        assert agent.hello["uid"] == agent.hello["euid"] != 0
        assert int(agent.hello["cap_eff"], 16) == 0 and int(agent.hello["cap_prm"], 16) == 0
        fd = agent.call("socket", family="AF_INET", type="SOCK_STREAM").ret
        if int(Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text()) <= 80:
            pytest.skip("this host lets everyone bind port 80")
        reply = agent.call("bind", fd=fd, addr=("127.0.0.1", 80))
        assert (reply.ret, reply.errno, reply.user) == (-1, "EACCES", "nobody")


# -- the model's entry point ------------------------------------------------------------------------

def test_one_step_list_drives_the_model_and_the_agent_alike(ssh, remote_dir):
    from harness.model import Network, Step
    from harness.model import run_steps as run_on_model

    steps = [
        Step("h", "socket", {"family": "AF_INET", "type": "SOCK_DGRAM"}, save="udp"),
        Step("h", "listen", {"fd": "$udp", "backlog": 5}),
        Step("h", "socket", {"family": "AF_INET", "type": "SOCK_STREAM|SOCK_NONBLOCK"}, save="tcp"),
        Step("h", "bind", {"fd": "$tcp", "addr": ("127.0.0.1", 0), "addrlen": 8}),
        Step("h", "accept", {"fd": "$tcp"}),
        Step("h", "getpeername", {"fd": "$tcp"}),
        Step("h", "shutdown", {"fd": "$tcp", "how": 7}),
        Step("h", "setsockopt", {"fd": "$tcp", "level": "SOL_SOCKET", "optname": "SO_ZEROCOPY", "value": 1}),
        Step("h", "close", {"fd": "$udp"}),
        Step("h", "close", {"fd": "$udp"}),
    ]
    modelled = run_on_model({"h": Network().add_host("h", addrs=["198.51.100.9"])}, steps)
    real = AgentHost(ssh, python=sys.executable, remote_dir=f"{remote_dir}/run")
    try:
        replies = run_on_model({"h": real}, steps)  # one runner: the agent host is just another Caller
        with pytest.raises(LookupError, match="names host 'elsewhere'; there are: h"):
            run_on_model({"h": real}, [Step("elsewhere", "socket", {"family": 2, "type": 1})])
    finally:
        real.close()
    assert [(r.ret, r.errno) for r in replies] == [(m.ret, m.errno) for m in modelled]
    assert [r.errno for r in replies] == [None, "EOPNOTSUPP", None, "EINVAL", "EINVAL", "ENOTCONN", "EINVAL",
                                          None, None, "EBADF"]


# -- pieces -----------------------------------------------------------------------------------------

def test_encode_args_resolves_names_and_wraps_bytes():
    encoded = encode_args("setsockopt", {"fd": 3, "level": "SOL_SOCKET", "optname": "SO_REUSEADDR", "value": 1})
    assert encoded == {"fd": 3, "level": 1, "optname": 2, "value": 1}
    assert encode_args("send", {"fd": 3, "data": b"\x01", "flags": "MSG_ZEROCOPY|MSG_DONTWAIT"}) == {
        "fd": 3, "data": {"$b64": "AQ=="}, "flags": 0x4000040}
    assert encode_args("bind", {"fd": 3, "addr": {"family": "AF_INET6", "host": "::1", "port": 1}})["addr"] == {
        "family": 10, "host": "::1", "port": 1}


def test_decode_reply_restores_bytes_tuples_and_int_keys():
    reply = decode_reply({"id": 4, "op": "poll", "ret": {"3": 1}, "errno": None, "t_ns": 5, "dt_ns": 1,
                          "extra": {"ready": 1}}, "server", "root", 99)
    assert reply.ret == {3: 1} and reply.rtt_ns == 99 and reply.vm == "server"
    recv = decode_reply({"id": 5, "op": "recv", "ret": 2, "errno": None, "t_ns": 6, "dt_ns": 1,
                         "extra": {"data": {"$b64": "aGk="}, "addr": ["127.0.0.1", 9]}}, "server", "root", 1)
    assert recv.data == b"hi" and recv.extra["addr"] == ("127.0.0.1", 9)
    blocked = decode_reply({"id": 6, "op": "accept", "ret": None, "errno": None, "t_ns": 7, "dt_ns": 2,
                            "extra": {}, "blocked": True}, "server", "root", 1)
    assert blocked.blocked and not blocked.ok and str(blocked) == "server/root accept: blocks"


def test_describe_step_is_bounded():
    assert describe_step("bind", {"fd": 3}) == "bind(fd=3)"
    assert len(describe_step("send", {"data": b"x" * 10_000})) == 300
    # A batch is named by its ops, not by the repr of every step.
    assert describe_step("batch", {"steps": [{"op": "socket", "args": {}}, {"op": "bind"}]}) == \
        "batch(2 steps: socket, bind)"
    assert len(describe_step("batch", {"steps": [{"op": "getsockopt"}] * 5000})) == 300


def test_measure_latency_times_all_three_paths(remote_dir):
    ssh = LocalGuestSSH("server")

    class LocalLab:
        def ssh(self, name):
            assert name == "server"
            return ssh

        def ssh_argv(self, name):
            return [sys.executable, "-c", "pass"]

    try:
        report = measure_latency(LocalLab(), "server", n=5, n_ssh_process=2, python=sys.executable,
                                 remote_dir=f"{remote_dir}/run")
    finally:
        ssh.kill_all()
    assert (report.agent_step.n, report.paramiko_exec.n, report.ssh_process.n) == (5, 5, 2)
    for row in (report.agent_step, report.paramiko_exec, report.ssh_process):
        assert 0 < row.min_ms <= row.median_ms <= row.max_ms
    assert "agent step" in report.table() and "new ssh process" in report.table()


# -- batches ----------------------------------------------------------------------------------------

def test_a_batch_runs_a_program_in_one_round_trip_with_references_loops_and_settling(ssh, remote_dir):
    with local_agent(ssh, remote_dir) as agent:
        sent_before = agent._next_id
        replies = agent.batch([
            {"op": "socket", "args": {"family": "AF_INET", "type": "SOCK_STREAM"}, "save": "l"},
            {"op": "bind", "args": {"fd": {"$ref": "l", "fd": True}, "addr": ["127.0.0.1", 0]}},
            {"op": "listen", "args": {"fd": {"$ref": "l", "fd": True}, "backlog": 4}},
            {"op": "getsockname", "args": {"fd": {"$ref": "l", "fd": True}}, "save": "where"},
            {"op": "socket", "args": {"family": "AF_INET", "type": "SOCK_STREAM|SOCK_NONBLOCK"}, "save": "c"},
            {"op": "connect", "args": {"fd": {"$ref": "c", "fd": True},
                                       "addr": ["127.0.0.1", {"$ref": "where", "path": ["port"]}]}},
            {"op": "accept4", "args": {"fd": {"$ref": "l", "fd": True}, "flags": "SOCK_NONBLOCK"}, "save": "a",
             "await": {"errno": None}, "settle_ms": 2000},
            {"op": "send", "args": {"fd": {"$ref": "c", "fd": True}, "length": 65536, "flags": "MSG_DONTWAIT"},
             "until": "EAGAIN", "max": 1000},
            {"op": "recv", "args": {"fd": {"$ref": "nobody", "fd": True}}},
            {"op": "listen", "args": {"fd": 3, "backlog": {"$ref": "nothing"}}},
            {"op": "no_such_op", "args": {}},
        ])
        assert agent._next_id == sent_before + 1  # eleven steps, one request
        assert [r.op for r in replies][:3] == ["socket", "bind", "listen"] and replies[2].ok
        port = replies[3].ret[1]
        assert port > 0 and replies[5].errno == "EINPROGRESS"
        assert replies[6].ok and replies[6].ret > replies[4].ret
        loop = replies[7].ret
        assert loop["stopped"] == "EAGAIN" and loop["calls"] >= 1 and loop["total"] > 65536
        assert replies[8].errno == "EBADF"  # an unset descriptor is -1, as in C
        assert replies[9].errno == "UNSET" and replies[9].extra["unset"] == "nothing"
        assert replies[10].errno == "ENOSYS" and replies[10].error


def test_settling_retries_only_transient_answers_and_only_until_the_deadline(ssh, remote_dir):
    with local_agent(ssh, remote_dir) as agent:
        replies = agent.batch([
            {"op": "socket", "args": {"family": "AF_INET", "type": "SOCK_STREAM|SOCK_NONBLOCK"}, "save": "l"},
            {"op": "bind", "args": {"fd": {"$ref": "l", "fd": True}, "addr": ["127.0.0.1", 0]}},
            {"op": "listen", "args": {"fd": {"$ref": "l", "fd": True}, "backlog": 4}},
            # Nobody connects: the kernel keeps saying EAGAIN, the model's "a connection" never comes.
            {"op": "accept", "args": {"fd": {"$ref": "l", "fd": True}}, "await": {"errno": None}, "settle_ms": 50},
            # EINVAL is no "not yet" answer: it is reported at once, not retried.
            {"op": "accept", "args": {"fd": 0}, "await": {"errno": None}, "settle_ms": 1000},
            {"op": "poll", "args": {"fds": [{"$ref": "l", "fd": True}], "events": "POLLIN"},
             "await": {"revents": [1]}, "settle_ms": 50},
        ])
        assert replies[3].errno == "EAGAIN" and replies[3].extra["settled"] >= 5
        assert replies[4].errno in ("ENOTSOCK", "EBADF") and "settled" not in replies[4].extra
        assert replies[5].ret == {replies[0].ret: 0} and replies[5].extra["settled"] >= 5
