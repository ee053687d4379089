"""The guest agent run locally as a subprocess, spoken to in raw JSON lines (traffic on 127.0.0.1 only)."""

from __future__ import annotations

import base64
import fcntl
import importlib.util
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.guest.client import GUEST_AGENT

MSG_ZEROCOPY = 0x4000000
MSG_ERRQUEUE = 0x2000
MSG_NOSIGNAL = 0x4000
SO_ZEROCOPY = 60
SO_EE_ORIGIN_ZEROCOPY = 5
SO_EE_CODE_ZEROCOPY_COPIED = 1


class GuestAgent:
    """The agent on pipes: one request line in, one reply line out."""

    def __init__(self, *extra_argv: str) -> None:
        self.proc = subprocess.Popen([sys.executable, str(GUEST_AGENT), *extra_argv], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.hello = json.loads(self.proc.stdout.readline())["hello"]
        self.next_id = 0

    def send_line(self, line: bytes) -> dict:
        self.proc.stdin.write(line)
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def call(self, op: str, **args) -> dict:
        self.next_id += 1
        reply = self.send_line(json.dumps({"id": self.next_id, "op": op, "args": args}).encode() + b"\n")
        assert reply["id"] == self.next_id and reply["op"] == op
        return reply

    def ok(self, op: str, **args):
        reply = self.call(op, **args)
        assert reply["errno"] is None and "error" not in reply, reply
        return reply["ret"]

    def finish(self) -> tuple[int, str]:
        """EOF on stdin: the agent cleans up and exits."""
        self.proc.stdin.close()
        status = self.proc.wait(timeout=10)
        return status, self.proc.stderr.read().decode()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            stream.close()


@pytest.fixture
def agent():
    guest = GuestAgent()
    yield guest
    guest.kill()


def listener(agent: GuestAgent, sock_type: int = socket.SOCK_STREAM) -> tuple[int, int]:
    fd = agent.ok("socket", family=socket.AF_INET, type=sock_type, protocol=0)
    agent.ok("bind", fd=fd, addr=["127.0.0.1", 0])
    agent.ok("listen", fd=fd, backlog=8)
    return fd, agent.ok("getsockname", fd=fd)[1]


def connected_pair(agent: GuestAgent) -> tuple[int, int, int]:
    """(listener, client, accepted) over 127.0.0.1."""
    lfd, port = listener(agent)
    cfd = agent.ok("socket", family=socket.AF_INET, type=socket.SOCK_STREAM)
    agent.ok("connect", fd=cfd, addr=["127.0.0.1", port])
    return lfd, cfd, agent.ok("accept", fd=lfd)


def b64(reply_data: dict) -> bytes:
    return base64.b64decode(reply_data["$b64"])


# -- greeting and numbering ------------------------------------------------------------------------

def test_hello_names_the_process_and_protocol(agent):
    assert agent.hello["protocol"] == 1
    assert agent.hello["pid"] == agent.proc.pid
    assert agent.hello["uid"] == os.getuid()
    assert agent.hello["cap_eff"] is not None


def test_first_socket_is_fd_3_and_the_protocol_pipes_sit_at_the_top(agent):
    assert agent.ok("socket", family=socket.AF_INET, type=socket.SOCK_STREAM) == 3
    fds = sorted(int(name) for name in os.listdir(f"/proc/{agent.proc.pid}/fd"))
    assert fds[:4] == [0, 1, 2, 3]
    assert os.readlink(f"/proc/{agent.proc.pid}/fd/0") == "/dev/null"
    assert min(fd for fd in fds if fd > 3) > 100  # the agent's own pipes, far from scenario numbers


def test_closing_fd_1_does_not_cut_the_reply_stream(agent):
    assert agent.ok("close", fd=1) == 0
    assert agent.ok("socket", family=socket.AF_INET, type=socket.SOCK_STREAM) == 1  # lowest free number
    assert agent.ok("getsockname", fd=1) == ["0.0.0.0", 0]


def test_the_agents_own_descriptors_look_closed(agent):
    own = max(int(name) for name in os.listdir(f"/proc/{agent.proc.pid}/fd"))
    reply = agent.call("close", fd=own)
    assert (reply["ret"], reply["errno"]) == (-1, "EBADF")
    assert "agent" in reply["extra"]
    assert agent.ok("socket", family=socket.AF_INET, type=socket.SOCK_DGRAM) == 3


# -- bind, listen, accept ------------------------------------------------------------------------------

def test_socket_bind_listen_on_an_ephemeral_loopback_port(agent):
    fd, port = listener(agent)
    assert 0 < port < 65536
    assert agent.ok("getsockname", fd=fd) == ["127.0.0.1", port]
    reply = agent.call("getpeername", fd=fd)
    assert (reply["ret"], reply["errno"]) == (-1, "ENOTCONN")


def test_short_and_oversized_addrlen_are_einval(agent):
    fd = agent.ok("socket", family=socket.AF_INET, type=socket.SOCK_STREAM)
    for addrlen in (8, 15, 129, -1):
        reply = agent.call("bind", fd=fd, addr=["127.0.0.1", 0], addrlen=addrlen)
        assert (reply["ret"], reply["errno"]) == (-1, "EINVAL"), addrlen
    assert agent.ok("bind", fd=fd, addr=["127.0.0.1", 0], addrlen=16) == 0


def test_negative_backlog_reaches_the_kernel_and_means_somaxconn(agent):
    fd = agent.ok("socket", family=socket.AF_INET, type=socket.SOCK_STREAM)
    agent.ok("bind", fd=fd, addr=["127.0.0.1", 0])
    assert agent.ok("listen", fd=fd, backlog=-1) == 0
    port = agent.ok("getsockname", fd=fd)[1]
    if shutil.which("ss") is None:
        pytest.skip("no ss here to read the listener's backlog")
    rows = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, check=True).stdout
    somaxconn = int(Path("/proc/sys/net/core/somaxconn").read_text())
    # __sys_listen(): (unsigned)backlog > somaxconn, so -1 becomes somaxconn; Python's listen() would give 0.
    assert rows.split()[2] == str(somaxconn), rows


def test_accept4_flags_are_visible_through_fcntl_and_plain_accept_adds_none(agent):
    lfd, port = listener(agent)
    for _ in range(2):
        cfd = agent.ok("socket", family=socket.AF_INET, type=socket.SOCK_STREAM)
        agent.ok("connect", fd=cfd, addr=["127.0.0.1", port])
    flagged = agent.call("accept4", fd=lfd, flags=socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    assert flagged["extra"]["peer"][0] == "127.0.0.1"
    assert agent.ok("fcntl_getfl", fd=flagged["ret"]) & os.O_NONBLOCK
    assert agent.ok("fcntl_getfd", fd=flagged["ret"]) == fcntl.FD_CLOEXEC
    plain = agent.ok("accept", fd=lfd)
    assert not agent.ok("fcntl_getfl", fd=plain) & os.O_NONBLOCK
    assert agent.ok("fcntl_getfd", fd=plain) == 0  # socket.accept() would have set FD_CLOEXEC


def test_empty_non_blocking_accept_is_eagain(agent):
    fd = agent.ok("socket", family=socket.AF_INET, type=socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    agent.ok("bind", fd=fd, addr=["127.0.0.1", 0])
    agent.ok("listen", fd=fd, backlog=4)
    reply = agent.call("accept", fd=fd)
    assert (reply["ret"], reply["errno"]) == (-1, "EAGAIN")


def test_a_blocking_accept_with_nothing_queued_is_reported_as_blocked(agent):
    lfd, _ = listener(agent)
    started = time.monotonic()
    reply = agent.call("accept", fd=lfd, block_ms=200)
    assert reply["blocked"] is True and reply["ret"] is None and reply["errno"] is None
    assert 0.15 < time.monotonic() - started < 5
    assert agent.ok("getsockname", fd=lfd)[0] == "127.0.0.1"  # the agent carries on


def test_udp_listen_is_eopnotsupp(agent):
    fd = agent.ok("socket", family=socket.AF_INET, type=socket.SOCK_DGRAM)
    reply = agent.call("listen", fd=fd, backlog=5)
    assert (reply["ret"], reply["errno"]) == (-1, "EOPNOTSUPP")


def test_non_blocking_connect_is_einprogress_then_writable(agent):
    _, port = listener(agent)
    fd = agent.ok("socket", family=socket.AF_INET, type=socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    reply = agent.call("connect", fd=fd, addr=["127.0.0.1", port])
    assert reply["errno"] in ("EINPROGRESS", None)
    revents = agent.ok("poll", fds=[fd], events=select.POLLOUT, timeout_ms=2000)
    assert revents[str(fd)] & select.POLLOUT
    assert agent.ok("getsockopt", fd=fd, level=socket.SOL_SOCKET, optname=socket.SO_ERROR) == 0


# -- data, options, zerocopy ------------------------------------------------------------------------

def test_send_and_recv_carry_bytes_as_base64(agent):
    _, cfd, afd = connected_pair(agent)
    assert agent.ok("send", fd=cfd, data="hello", flags=0) == 5
    assert agent.ok("send", fd=cfd, data={"$b64": base64.b64encode(b"\x00\xff").decode()}) == 2
    assert agent.ok("wait_readable", fd=afd, timeout_ms=2000) & 1
    reply = agent.call("recv", fd=afd, length=100, flags=0)
    assert reply["ret"] == 7 and b64(reply["extra"]["data"]) == b"hello\x00\xff"


def test_sendmsg_and_recvmsg_of_plain_data(agent):
    _, cfd, afd = connected_pair(agent)
    assert agent.ok("sendmsg", fd=cfd, length=3000, flags=0) == 3000
    agent.ok("wait_readable", fd=afd, timeout_ms=2000)
    reply = agent.call("recvmsg", fd=afd, length=3000, flags=socket.MSG_WAITALL)
    assert reply["ret"] == 3000 and b64(reply["extra"]["data"]) == bytes(3000)


def test_udp_sendto_and_recvfrom_report_addresses(agent):
    rx = agent.ok("socket", family=socket.AF_INET, type=socket.SOCK_DGRAM)
    agent.ok("bind", fd=rx, addr=["127.0.0.1", 0])
    port = agent.ok("getsockname", fd=rx)[1]
    tx = agent.ok("socket", family=socket.AF_INET, type=socket.SOCK_DGRAM)
    assert agent.ok("sendto", fd=tx, data="ping", addr=["127.0.0.1", port]) == 4
    reply = agent.call("recvfrom", fd=rx, length=64, flags=socket.MSG_DONTWAIT)
    assert reply["ret"] == 4 and reply["extra"]["addr"][0] == "127.0.0.1"


def test_setsockopt_getsockopt_ints_and_structs(agent):
    fd = agent.ok("socket", family=socket.AF_INET, type=socket.SOCK_STREAM)
    assert agent.ok("getsockopt", fd=fd, level=socket.SOL_SOCKET, optname=socket.SO_REUSEADDR) == 0
    agent.ok("setsockopt", fd=fd, level=socket.SOL_SOCKET, optname=socket.SO_REUSEADDR, value=1)
    assert agent.ok("getsockopt", fd=fd, level=socket.SOL_SOCKET, optname=socket.SO_REUSEADDR) == 1
    agent.ok("setsockopt", fd=fd, level=socket.SOL_SOCKET, optname=socket.SO_LINGER, value=[1, 5])
    reply = agent.call("getsockopt", fd=fd, level=socket.SOL_SOCKET, optname=socket.SO_LINGER, optlen=8)
    assert b64(reply["ret"]) == (1).to_bytes(4, "little") + (5).to_bytes(4, "little")
    short = agent.call("setsockopt", fd=fd, level=socket.SOL_SOCKET, optname=socket.SO_REUSEADDR, value=1, optlen=2)
    assert short["errno"] == "EINVAL"


def test_zerocopy_on_loopback_completes_with_code_copied(agent):
    _, cfd, afd = connected_pair(agent)
    assert agent.ok("setsockopt", fd=cfd, level=socket.SOL_SOCKET, optname=SO_ZEROCOPY, value=1) == 0
    for _ in range(2):
        assert agent.ok("send", fd=cfd, length=4096, flags=MSG_ZEROCOPY) == 4096
        agent.ok("recv", fd=afd, length=4096, flags=socket.MSG_WAITALL)
    completions = []
    deadline = time.monotonic() + 5
    # Completions of consecutive sends may arrive merged into one range (skb_zerocopy_notify_extend).
    while not any(c["hi"] == 1 for c in completions) and time.monotonic() < deadline:
        agent.ok("poll", fds=[[cfd, 0]], timeout_ms=200)  # POLLERR is always reported
        reply = agent.call("recvmsg", fd=cfd, length=0, flags=MSG_ERRQUEUE)
        if reply["errno"] is None:
            assert len(reply["ret"]) == 1  # one sock_extended_err per recvmsg
            completions += reply["ret"]
    assert {c["origin"] for c in completions} == {SO_EE_ORIGIN_ZEROCOPY}
    assert {c["code"] for c in completions} == {SO_EE_CODE_ZEROCOPY_COPIED}
    assert min(c["lo"] for c in completions) == 0 and max(c["hi"] for c in completions) == 1
    assert all(c["errno"] == 0 for c in completions)
    empty = agent.call("recvmsg", fd=cfd, length=0, flags=MSG_ERRQUEUE)
    assert (empty["ret"], empty["errno"]) == (-1, "EAGAIN")


def test_send_after_shutdown_reports_sigpipe_unless_msg_nosignal(agent):
    _, cfd, _ = connected_pair(agent)
    agent.ok("shutdown", fd=cfd, how=socket.SHUT_WR)
    reply = agent.call("send", fd=cfd, data="x")
    assert (reply["errno"], reply["extra"].get("signal")) == ("EPIPE", "SIGPIPE")
    quiet = agent.call("send", fd=cfd, data="x", flags=MSG_NOSIGNAL)
    assert quiet["errno"] == "EPIPE" and "signal" not in quiet["extra"]


def test_poll_answers_per_descriptor(agent):
    lfd, cfd, afd = connected_pair(agent)
    revents = agent.ok("poll", fds=[lfd, [cfd, select.POLLOUT], 999], events=select.POLLIN, timeout_ms=0)
    assert revents == {str(lfd): 0, str(cfd): select.POLLOUT, "999": select.POLLNVAL}


def test_fstat_and_readlink_name_the_sockfs_inode(agent):
    fd = agent.ok("socket", family=socket.AF_INET, type=socket.SOCK_STREAM)
    info = agent.ok("fstat", fd=fd)
    assert info["mode"] & 0o170000 == 0o140000  # S_IFSOCK
    assert agent.ok("readlink_fd", fd=fd) == f"socket:[{info['ino']}]" == info["link"]


def test_unix_addresses_paths_and_abstract_names(agent, tmp_path):
    fd = agent.ok("socket", family=socket.AF_UNIX, type=socket.SOCK_STREAM)
    assert agent.ok("getsockname", fd=fd) is None  # unnamed
    path = str(tmp_path / "s")
    agent.ok("bind", fd=fd, addr=path)
    assert agent.ok("getsockname", fd=fd) == path
    other = agent.ok("socket", family=socket.AF_UNIX, type=socket.SOCK_DGRAM)
    name = f"@socklab-test-{os.getpid()}"
    agent.ok("bind", fd=other, addr=name)
    assert agent.ok("getsockname", fd=other) == name


def test_ipv6_loopback_names_are_four_tuples(agent):
    fd = agent.call("socket", family=socket.AF_INET6, type=socket.SOCK_STREAM)["ret"]
    if agent.call("bind", fd=fd, addr=["::1", 0])["errno"]:
        pytest.skip("no IPv6 loopback here")
    host, port, flowinfo, scope = agent.ok("getsockname", fd=fd)
    assert (host, flowinfo, scope) == ("::1", 0, 0) and port > 0


def test_sysctl_get_reads_proc_sys_and_refuses_paths_outside_it(agent):
    assert agent.ok("sysctl_get", name="net.core.somaxconn") == int(Path("/proc/sys/net/core/somaxconn").read_text())
    assert isinstance(agent.ok("sysctl_get", name="net.ipv4.tcp_rmem"), list)
    reply = agent.call("sysctl_get", name="../../etc/passwd")
    assert reply["error"] and "sysctl" in reply["error"]


# -- bad input --------------------------------------------------------------------------------------

def test_unknown_op_names_the_op_and_the_session_goes_on(agent):
    reply = agent.call("bindd", fd=3)
    assert reply["errno"] == "ENOSYS" and "'bindd'" in reply["error"] and "bind" in reply["error"]
    assert agent.ok("socket", family=socket.AF_INET, type=socket.SOCK_STREAM) == 3


@pytest.mark.parametrize("op, args, words", [
    ("bind", {"fd": "three", "addr": ["127.0.0.1", 0]}, ["bind", "'fd'"]),
    ("bind", {"fd": 3}, ["bind", "'addr'"]),
    ("bind", {"fd": 3, "addr": ["127.0.0.1", 70000]}, ["bind", "70000"]),
    ("bind", {"fd": 3, "addr": ["not-an-ip", 1]}, ["bind", "not-an-ip"]),
    ("socket", {"family": "AF_INET", "type": 1}, ["socket", "'family'", "host resolves"]),
    ("send", {"fd": 3, "data": 5}, ["send", "'data'"]),
    ("poll", {"fds": 3}, ["poll", "'fds'"]),
    ("sleep", {"seconds": "long"}, ["sleep", "'seconds'"]),
])
def test_bad_arguments_get_an_error_naming_op_and_problem(agent, op, args, words):
    reply = agent.call(op, **args)
    assert reply["ret"] == -1 and reply["errno"] == "EINVAL"
    for word in words:
        assert word in reply["error"], reply["error"]


def test_lines_that_are_not_requests_get_errors_too(agent):
    assert "not JSON" in agent.send_line(b"{oops\n")["error"]
    assert "JSON object" in agent.send_line(b"[1, 2]\n")["error"]
    assert "'op'" in agent.send_line(b'{"id": 1}\n')["error"]
    assert agent.ok("socket", family=socket.AF_INET, type=socket.SOCK_DGRAM) == 3


@pytest.fixture
def guest_agent(monkeypatch):
    """agent.py imported in this process (its dataclasses look their module up in sys.modules)."""
    spec = importlib.util.spec_from_file_location("socklab_guest_agent", GUEST_AGENT)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


def test_the_op_list_covers_every_op_the_model_has(guest_agent):
    from harness.model.syscalls import SYSCALLS

    session = guest_agent.Session(set())
    brief = {"socket", "bind", "listen", "accept", "accept4", "connect", "close", "shutdown", "getsockname",
             "getpeername", "setsockopt", "getsockopt", "send", "sendmsg", "recv", "recvmsg", "poll", "fstat",
             "readlink_fd", "fcntl_getfl", "fcntl_getfd", "sleep", "sysctl_set", "sysctl_get", "wait_readable",
             "reset"}
    assert set(SYSCALLS) | brief <= set(session.handlers)


def test_a_session_uses_what_the_server_built_before_forking(guest_agent, monkeypatch):
    """The server builds libc's prototypes and the trace noise regex once; a forked session must not build its own."""
    assert not guest_agent._LIBC and not guest_agent._GLOB_REGEXES  # importing the module builds neither
    guest_agent.AgentServer.prepare()
    [libc], [noise] = guest_agent._LIBC, guest_agent._GLOB_REGEXES.values()
    monkeypatch.setattr(re, "compile", lambda *args, **kwargs: pytest.fail("a session compiled a regex"))
    monkeypatch.setattr(guest_agent.ctypes, "CDLL", lambda *args, **kwargs: pytest.fail("a session loaded libc again"))
    session = guest_agent.Session(set())
    assert session.libc is libc and session.tracing.tracer.noise is noise
    assert noise.fullmatch("_raw_spin_lock_bh") and not noise.fullmatch("inet_listen")


def test_the_server_prepares_before_it_serves_and_leaves_nothing_when_that_fails(guest_agent, monkeypatch, tmp_path):
    module_file = tmp_path / "agent_x.py"
    module_file.write_text("")
    server = guest_agent.AgentServer(str(module_file))
    monkeypatch.setattr(guest_agent.os, "setsid", lambda: None)  # the pytest worker stays in its session

    def prepare():
        assert Path(server.directory, "pid").read_text() == f"{os.getpid()}\n"  # claimed first
        raise MemoryError("no room for the regex")

    monkeypatch.setattr(guest_agent.AgentServer, "prepare", staticmethod(prepare))
    with pytest.raises(MemoryError, match="no room"):
        server.run()
    assert not os.path.exists(server.directory) and list(tmp_path.iterdir()) == [module_file]


def test_a_server_whose_module_was_removed_gives_its_claim_back(guest_agent, tmp_path):
    """A server of an old version that claims after a push removed its module leaves no pid file behind."""
    module_file = tmp_path / "agent_old.py"
    module_file.write_text("")
    directory = Path(guest_agent.serve_dir(str(module_file)))
    directory.mkdir()  # what the push leaves of the old server's directory: the FIFO, no pid file
    os.mkfifo(directory / "requests")
    module_file.unlink()
    assert guest_agent.AgentServer(str(module_file)).claim() is False
    assert list(tmp_path.iterdir()) == []
    module_file.write_text("")  # the version is there: the same claim holds
    server = guest_agent.AgentServer(str(module_file))
    assert server.claim() is True and server.owner() == os.getpid()


def test_a_sysctl_set_to_restore_at_exit_outlives_resets(guest_agent, monkeypatch, tmp_path):
    files = {name: tmp_path / name for name in ("modprobe", "somaxconn")}
    files["modprobe"].write_text("/sbin/modprobe\n")
    files["somaxconn"].write_text("4096\n")
    # /proc/sys/kernel/modprobe -> tmp_path/modprobe: the host's own sysctls stay untouched
    monkeypatch.setattr(guest_agent, "sysctl_path", lambda name: str(files[name.rsplit(".", 1)[-1]]))
    session = guest_agent.Session(set())
    set_ = session.handlers["sysctl_set"]
    assert set_({"name": "kernel.modprobe", "value": "\n", "restore": "exit"}).errno == 0
    assert set_({"name": "net.core.somaxconn", "value": 1}).errno == 0
    with pytest.raises(guest_agent.BadRequest, match="restore"):
        set_({"name": "net.core.somaxconn", "value": 2, "restore": "later"})
    assert [name.rsplit(".", 1)[-1] for name in session.handlers["reset"]({}).extra["sysctls_restored"]] == \
        ["somaxconn"]
    assert files["somaxconn"].read_text() == "4096\n" and files["modprobe"].read_text() == "\n"
    assert [name.rsplit(".", 1)[-1] for name in session.cleanup(final=True)["sysctls_restored"]] == ["modprobe"]
    assert files["modprobe"].read_text() == "/sbin/modprobe\n"


# -- the end of a session ---------------------------------------------------------------------------

def test_reset_closes_every_socket_and_keeps_the_agent(agent):
    lfd, cfd, afd = connected_pair(agent)
    reply = agent.call("reset")
    assert (reply["ret"], reply["errno"]) == (0, None)
    assert reply["extra"]["closed"] == sorted([lfd, cfd, afd])
    assert agent.call("reset")["extra"]["closed"] == []
    for fd in (lfd, cfd, afd):
        assert agent.call("fstat", fd=fd)["errno"] == "EBADF"
    assert agent.ok("socket", family=socket.AF_INET, type=socket.SOCK_STREAM) == 3


def test_eof_closes_sockets_and_removes_socket_files(tmp_path):
    guest = GuestAgent()
    try:
        lfd, port = listener(guest)
        unix_fd = guest.ok("socket", family=socket.AF_UNIX, type=socket.SOCK_STREAM)
        path = tmp_path / "agent.sock"
        guest.ok("bind", fd=unix_fd, addr=str(path))
        assert path.is_socket()
        status, stderr = guest.finish()
    finally:
        guest.kill()
    assert status == 0
    summary = json.loads(stderr.split("cleanup ", 1)[1])
    assert summary["closed"] == [lfd, unix_fd]
    assert summary["unlinked"] == [str(path)]
    assert not path.exists()
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_clean_up_too(signum):
    guest = GuestAgent()
    try:
        fd, _ = listener(guest)
        guest.proc.send_signal(signum)
        status = guest.proc.wait(timeout=10)
        stderr = guest.proc.stderr.read().decode()
    finally:
        guest.kill()
    assert status == 128 + signum
    assert json.loads(stderr.split("cleanup ", 1)[1])["closed"] == [fd]


def test_timestamps_are_monotonic_and_durations_small(agent):
    first = agent.call("socket", family=socket.AF_INET, type=socket.SOCK_STREAM)
    second = agent.call("close", fd=first["ret"])
    assert 0 < first["t_ns"] < second["t_ns"] <= time.monotonic_ns()
    assert 0 <= first["dt_ns"] < 1e9 and second["t_ns"] - first["t_ns"] >= first["dt_ns"]


def test_descriptors_a_library_opened_are_moved_out_of_the_scenarios_way():
    """As forky's libffi holds fd 3: after the move the first new descriptor is that number again."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import os
        from harness.guest.inside import agent
        first = os.open("/dev/null", os.O_RDONLY)          # stands in for libffi's own .so
        keep = tuple(os.dup2(0, fd) for fd in (900, 901, 902))
        moved = agent.move_stray_fds(keep, below=first + 1)
        again = os.open("/dev/null", os.O_RDONLY)
        print(first, again, sorted(moved)[0] > first)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == out[1] and out[2] == "True"


# -- a herd of epoll waiters -------------------------------------------------------------------------

EPOLLIN, EPOLLEXCLUSIVE = 0x1, 1 << 28


def _connect_from_outside(port: int) -> socket.socket:
    """A connection the agent did not make: this test process's, as the client VM's would be."""
    client = socket.create_connection(("127.0.0.1", port), timeout=5)
    time.sleep(0.2)
    return client


def _epoll_fds(pid: int) -> int:
    return sum(1 for name in os.listdir(f"/proc/{pid}/fd")
               if os.readlink(f"/proc/{pid}/fd/{name}") == "anon_inode:[eventpoll]")


@pytest.mark.parametrize("events, woken", [(EPOLLIN, 3), (EPOLLIN | EPOLLEXCLUSIVE, 1)])
def test_a_herd_counts_the_waiters_one_connection_wakes(agent, events, woken):
    """Shared wait-queue entries all wake for one connection; exclusive ones wake one waiter."""
    lfd, port = listener(agent)
    assert agent.ok("epoll_herd", fd=lfd, waiters=3, events=events, timeout=1000) == 0
    assert _epoll_fds(agent.proc.pid) == 3  # one epoll file per waiter, while they sleep
    with _connect_from_outside(port):
        reply = agent.call("epoll_herd_wakeups", fd=lfd)
    assert (reply["ret"], reply["errno"]) == (woken, None)
    assert reply["extra"]["waiters"] == 3 and reply["extra"]["timed_out"] == 0  # the rest were stopped, not timed out
    assert len(reply["extra"]["woken_after_ms"]) == woken
    assert _epoll_fds(agent.proc.pid) == 0


def test_a_herd_nothing_wakes_times_out_and_a_collected_herd_is_gone(agent):
    lfd, _port = listener(agent)
    agent.ok("epoll_herd", fd=lfd, waiters=2, timeout=50)
    time.sleep(0.2)
    assert agent.call("epoll_herd_wakeups", fd=lfd)["extra"]["timed_out"] == 2
    started = time.monotonic()
    agent.ok("epoll_herd", fd=lfd, waiters=2)  # 10 s unless collected: collecting wakes them at once
    assert agent.ok("epoll_herd_wakeups", fd=lfd) == 0 and time.monotonic() - started < 3
    agent.ok("epoll_herd", fd=lfd, waiters=2, timeout=50)
    assert agent.call("epoll_herd", fd=lfd, waiters=2)["errno"] == "EBUSY"
    assert agent.ok("epoll_herd_wakeups", fd=lfd) == 0
    assert agent.call("epoll_herd_wakeups", fd=lfd)["errno"] == "ENOENT"
    for bad in ({"waiters": 0}, {"waiters": 65}, {"waiters": 2, "timeout": 0}):
        reply = agent.call("epoll_herd", fd=lfd, **bad)
        assert reply["errno"] == "EINVAL" and "must be" in reply.get("error", str(reply)), reply


def test_the_block_guard_still_interrupts_the_main_thread_while_a_herd_sleeps(agent):
    """The waiters block every signal: SIGALRM must cut the agent's own blocking call, not a waiter's."""
    lfd, _port = listener(agent)
    idle, _ = listener(agent)
    agent.ok("epoll_herd", fd=lfd, waiters=4, timeout=3000)
    started = time.monotonic()
    reply = agent.call("accept", fd=idle, block_ms=300)
    assert reply.get("blocked") and time.monotonic() - started < 2.5, reply
    assert agent.ok("epoll_herd_wakeups", fd=lfd) == 0
    assert agent.finish()[0] == 0


# -- sendfile ----------------------------------------------------------------------------------------

def test_sendfile_sends_from_a_file_far_above_the_scenario_s_numbers(agent):
    """The agent's file (a memfd) is not a scenario descriptor: the next socket still gets the lowest number."""
    lfd, cfd, afd = connected_pair(agent)
    assert agent.ok("sendfile", fd=cfd, length=5000) == 5000
    assert agent.ok("sendfile", fd=cfd, length=100, offset=10) == 100
    assert agent.ok("sendfile", fd=cfd, length=0) == 0
    time.sleep(0.1)
    got = agent.ok("recv", fd=afd, length=65536, flags=socket.MSG_DONTWAIT)
    assert got == 5100
    own = [int(name) for name in os.listdir(f"/proc/{agent.proc.pid}/fd")
           if os.readlink(f"/proc/{agent.proc.pid}/fd/{name}").startswith("/memfd:socklab-sendfile")]
    assert len(own) == 1 and own[0] > 60
    assert agent.call("close", fd=own[0])["errno"] == "EBADF"  # one of the agent's own
    assert agent.ok("socket", family=socket.AF_INET, type=socket.SOCK_STREAM) == afd + 1


def test_sendfile_on_a_socket_that_is_not_connected_is_epipe(agent):
    fd = agent.ok("socket", family=socket.AF_INET, type=socket.SOCK_STREAM)
    reply = agent.call("sendfile", fd=fd, length=10)
    assert (reply["ret"], reply["errno"]) == (-1, "EPIPE")
    assert agent.call("sendfile", fd=fd, length=-1)["errno"] == "EINVAL"


# -- start-up -----------------------------------------------------------------------------------------

def _agent_run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-I", "-S", "-B", str(GUEST_AGENT), *argv], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=30)


def test_options_are_parsed_as_argparse_would_and_bad_ones_exit_2():
    shown = _agent_run("--help")
    assert shown.returncode == 0 and shown.stdout.startswith("usage: agent.py [--block-ms MS] | agent.py --serve")
    assert "--block-ms MS" in shown.stdout and "--serve" in shown.stdout
    for bad, said in ((["--bogus"], "unrecognized argument: --bogus"), (["--block-ms"], "--block-ms expects a value"),
                      (["--block-ms", "soon"], "--block-ms: not a whole number of milliseconds: 'soon'")):
        refused = _agent_run(*bad)
        assert refused.returncode == 2, bad
        assert refused.stderr.splitlines() == ["usage: agent.py [--block-ms MS] | agent.py --serve",
                                               f"agent.py: error: {said}"]
    spec = importlib.util.spec_from_file_location("socklab_agent_options", GUEST_AGENT)
    agent = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(agent)
    options = agent.parse_options(["--block-ms=250", "--tracefs", "/tmp/fake-tracefs"])
    assert (options.block_ms, options.tracefs, options.trace_state_dir) == (250, "/tmp/fake-tracefs",
                                                                            agent.TRACE_STATE_DIR)
    assert agent.parse_options([]).block_ms == agent.DEFAULT_BLOCK_MS
    assert agent.parse_options(["--serve"]).serve and not agent.parse_options([]).serve


def test_start_up_imports_none_of_the_slow_modules():
    """argparse, dataclasses, typing and traceback cost a TCG guest tens of milliseconds at every start."""
    # -X importtime lists every module the start imports; the agent answers one step, then EOF ends it.
    run = subprocess.run([sys.executable, "-I", "-S", "-B", "-X", "importtime", str(GUEST_AGENT)],
                         input=b'{"id": 1, "op": "socket", "args": {"family": 2, "type": 1}}\n',
                         capture_output=True, timeout=30)
    assert b'"ret":3' in run.stdout.replace(b" ", b"")
    imported = {line.rsplit("|", 1)[-1].strip() for line in run.stderr.decode().splitlines() if "|" in line}
    assert "socket" in imported and "ctypes" in imported
    assert imported & {"argparse", "dataclasses", "typing", "traceback", "inspect"} == set()
