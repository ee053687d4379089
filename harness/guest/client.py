"""Host side of the guest agent: push it, keep it running on one SSH channel, call socket ops step by step."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import select
import shlex
import statistics
import subprocess
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import paramiko

from harness.deadline import AGENT_REPLY, AGENT_START, SSH_CHANNEL_OPEN, WATCH_INTERVAL
from harness.errors import LabError
from harness.guest.ssh import transport_of
from harness.log import truncate

if TYPE_CHECKING:
    from harness.lab.lifecycle import Lab
    from harness.guest.ssh import GuestSSH

GUEST_AGENT = Path(__file__).resolve().parent / "inside" / "agent.py"
log = logging.getLogger(__name__)
REMOTE_DIR = "/run/socklab/agent"  # tmpfs: a rebooted guest starts without a stale agent
GUEST_PYTHON = "/usr/bin/python3"
DEFAULT_TIMEOUT = AGENT_REPLY
DEFAULT_BLOCK_MS = 2000

START_TIMEOUT = AGENT_START
STDERR_TAIL_BYTES = 16 << 10
PROTOCOL = 1

# The agent runs as a module, not as a script: Python caches a module's compiled code (in
# REMOTE_DIR/__pycache__, written by the first root agent), and compiling 2,000 lines costs
# a TCG guest about a third of a second at every start. -S skips site, which the agent,
# stdlib only, never needs.
LOADER = ("import sys; sys.path.insert(0, sys.argv[1]); agent = __import__(sys.argv[2]); "
          "sys.argv = [agent.__file__, *sys.argv[3:]]; sys.exit(agent.main())")
PYCACHE = "__pycache__"
SERVE_SUFFIX = ".serve"  # agent.py's serve_dir(): the agent server's directory beside its module
SESSION_FDS = (7, 8, 9)  # agent.py's SESSION_FDS: where the exec line keeps stdin, stdout, stderr for the server
SERVED_STATUS_UNKNOWN = 255  # the exec line's exit status when the server that forked the agent is gone too
MISSING_STATUS = 97  # the exec line's exit status when the guest lacks this agent version
SERVE_ACK_TIMEOUT = 10  # s for the server to fork (ms when well); past it the shell runs the agent directly

# Arguments that carry C integer constants; names such as "SOCK_STREAM|SOCK_NONBLOCK" are
# resolved here, on the host, so the guest only ever sees numbers.
CONSTANT_ARGS = frozenset({
    "family", "type", "protocol", "backlog", "flags", "how", "level", "optname", "events", "cmd", "arg",
})

# Which VMs already hold which agent versions, per SSH transport (a reconnect or a reboot
# brings a new transport, and the next start() checks the guest again).
_pushed: "weakref.WeakKeyDictionary[Any, set[str]]" = weakref.WeakKeyDictionary()


class AgentError(LabError):
    """The guest agent could not run a step; the message names the VM and the step."""


class AgentDied(AgentError):
    """The agent process ended (or its SSH channel closed) before answering."""


class AgentTimeout(AgentError):
    """The agent did not answer a step in time."""


class AgentPushError(AgentError):
    """The agent could not be copied into the guest (a full file system, most often)."""


class AgentGuestStopped(AgentError):
    """The agent cannot answer because its VM does not run (a paused guest, a stopped QEMU)."""


class AgentRequestError(AgentError):
    """The agent refused a request: unknown op, or arguments it cannot turn into a system call."""


@dataclass(frozen=True)
class AgentReply:
    """One step's outcome on a real kernel, shaped like the model's ``Result``.

    ``t_ns`` is the guest's CLOCK_MONOTONIC when the system call started and ``dt_ns`` how
    long it took. Guest clocks of different VMs are not comparable with each other, so
    ``host_ns`` (the host's CLOCK_MONOTONIC when the request went out) orders steps across
    VMs, and ``rtt_ns`` is the host-measured round trip of the whole step.
    """

    id: int
    op: str
    ret: Any
    errno: str | None
    t_ns: int
    dt_ns: int
    extra: Mapping[str, Any] = field(default_factory=dict)
    vm: str = ""
    user: str = "root"
    rtt_ns: int = 0
    host_ns: int = 0
    blocked: bool = False
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.errno is None and not self.blocked and self.error is None

    @property
    def data(self) -> bytes | None:
        """Bytes a recv step read (None for other ops)."""
        return self.extra.get("data")

    def __str__(self) -> str:
        if self.blocked:
            head = "blocks"
        elif self.errno is not None:
            head = f"-1 {self.errno}"
        else:
            head = repr(self.ret)
        return f"{self.vm}/{self.user} {self.op}: {head}"


@dataclass(frozen=True)
class LatencyStats:
    """Median, fastest and slowest of ``n`` timed round trips, in milliseconds."""

    what: str
    n: int
    median_ms: float
    min_ms: float
    max_ms: float
    samples_ms: tuple[float, ...] = ()

    @classmethod
    def of(cls, what: str, samples_ns: list[int]) -> "LatencyStats":
        ms = [sample / 1e6 for sample in samples_ns]
        return cls(what, len(ms), round(statistics.median(ms), 3), round(min(ms), 3), round(max(ms), 3), tuple(ms))


@dataclass(frozen=True)
class LatencyReport:
    """The three ways to run one thing in a guest, side by side."""

    vm: str
    agent_step: LatencyStats
    paramiko_exec: LatencyStats
    ssh_process: LatencyStats

    def table(self) -> str:
        rows = [self.agent_step, self.paramiko_exec, self.ssh_process]
        lines = [f"{'round trip on ' + self.vm:<42} {'n':>4} {'median ms':>10} {'min ms':>9} {'max ms':>9}"]
        lines += [f"{row.what:<42} {row.n:>4} {row.median_ms:>10.2f} {row.min_ms:>9.2f} {row.max_ms:>9.2f}"
                  for row in rows]
        return "\n".join(lines)


# -- encoding -------------------------------------------------------------------------------------

def _resolve_constant(value: Any, name: str, op: str) -> Any:
    if not isinstance(value, str):
        return value
    from harness.model.constants import resolve  # the model's constant table is the one both sides share

    try:
        return resolve(value)
    except ValueError as exc:
        raise AgentRequestError(f"{op}: argument {name}={value!r}: {exc}") from None


def encode_args(op: str, args: Mapping[str, Any]) -> dict[str, Any]:
    """Step arguments as JSON for the agent: constant names resolved, bytes as {"$b64": ...}."""
    encoded: dict[str, Any] = {}
    for name, value in args.items():
        if name in CONSTANT_ARGS or (name == "value" and op == "setsockopt"):
            value = _resolve_constant(value, name, op)
        elif name == "addr" and isinstance(value, Mapping) and "family" in value:
            value = {**value, "family": _resolve_constant(value["family"], "addr.family", op)}
        elif name == "fds" and isinstance(value, (list, tuple)):
            value = [[item[0], _resolve_constant(item[1], "events", op)]
                     if isinstance(item, (list, tuple)) and len(item) == 2 else item for item in value]
        encoded[name] = _to_json(value)
    return encoded


def _to_json(value: Any) -> Any:
    if type(value) in _JSON_SCALARS:
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"$b64": base64.b64encode(bytes(value)).decode()}
    if isinstance(value, (list, tuple)):
        return [_to_json(item) for item in value]
    if isinstance(value, Mapping):
        return {key: _to_json(item) for key, item in value.items()}
    return value


_JSON_SCALARS = frozenset({int, str, float, bool, type(None)})


def _from_json(value: Any) -> Any:
    """{"$b64": ...} back to bytes, addresses (lists) to tuples as the model returns them."""
    if isinstance(value, dict):
        if set(value) == {"$b64"}:
            return base64.b64decode(value["$b64"])
        return {key: _from_json(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_from_json(item) for item in value]
    return value


def _address(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def decode_reply(message: Mapping[str, Any], vm: str, user: str, rtt_ns: int, host_ns: int = 0) -> AgentReply:
    op = message.get("op") or ""
    ret = _from_json(message.get("ret"))
    extra = _from_json(message.get("extra") or {})
    if op in ("getsockname", "getpeername"):
        ret = _address(ret)
    elif op in ("poll", "epoll_wait") and isinstance(ret, dict):
        ret = {int(fd): revents for fd, revents in ret.items()}
    for key in ("peer", "addr"):
        if key in extra:
            extra[key] = _address(extra[key])
    return AgentReply(
        id=message.get("id") or 0, op=op, ret=ret, errno=message.get("errno"),
        t_ns=message.get("t_ns") or 0, dt_ns=message.get("dt_ns") or 0, extra=extra, vm=vm, user=user,
        rtt_ns=rtt_ns, host_ns=host_ns, blocked=bool(message.get("blocked")), error=message.get("error"),
    )


def describe_step(op: str, args: Mapping[str, Any], limit: int = 300) -> str:
    steps = args.get("steps") if op == "batch" else None
    if isinstance(steps, list):
        # A batch by its ops, not the repr of every step (which the limit would cut anyway).
        ops = ", ".join(str(step.get("op")) for step in steps[:limit // 4] if isinstance(step, Mapping))
        text = f"batch({len(steps)} steps: {ops})"
        return text if len(text) <= limit else text[:limit - 1] + "…"
    text = f"{op}({', '.join(f'{key}={value!r}' for key, value in args.items())})"
    return text if len(text) <= limit else text[:limit - 1] + "…"


def agent_digest(source: bytes) -> str:
    return hashlib.sha256(source).hexdigest()[:16]


def agent_module(source: bytes) -> str:
    """The module name a version of the agent has in the guest: one per content, so versions never mix."""
    return f"agent_{agent_digest(source)}"


# -- the client -----------------------------------------------------------------------------------

class Agent:
    """One guest agent process on ``vm``, running as ``user``, driven over one SSH exec channel.

    ``start()`` copies ``harness/guest/inside/agent.py`` into the guest (only when the guest lacks
    that content hash) and runs it as root or, through ``setpriv``, as another user; then
    ``call("bind", fd=3, addr=("198.51.100.2", 7000))`` costs one JSON line each way on the
    SSH connection that is already open. Op and argument names are the reference model's.
    Steps are sequential by design: one thread drives an Agent at a time.
    """

    def __init__(self, ssh: "GuestSSH", vm: str | None = None, user: str = "root", *,
                 timeout: float = DEFAULT_TIMEOUT, block_ms: int = DEFAULT_BLOCK_MS,
                 remote_dir: str = REMOTE_DIR, python: str = GUEST_PYTHON,
                 start_timeout: float = START_TIMEOUT, source: Path = GUEST_AGENT,
                 watch: Callable[[], str | None] | None = None) -> None:
        self.ssh = ssh
        # Asked every WATCH_INTERVAL s of silence: why the VM cannot answer (paused, stopped), or None.
        self.watch = watch
        self.vm: str = vm if vm else getattr(ssh, "vm", "guest")
        self.user = user
        self.timeout = timeout
        self.block_ms = block_ms
        self.remote_dir = remote_dir.rstrip("/") or "/"
        self.python = python
        self.start_timeout = start_timeout
        self.source = source
        self.hello: dict[str, Any] = {}
        self._channel: Any = None
        self._pending = bytearray()
        self._stderr = bytearray()
        self._next_id = 0
        self._dead: str | None = None
        self.exit_status: int | None = None

    # -- life cycle ----------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._channel is not None and self._dead is None

    def start(self) -> "Agent":
        """Push the agent if this guest lacks this version, run it, and wait for its hello line."""
        if self.running:
            return self
        source = self.source.read_bytes()
        remote = f"{self.remote_dir}/{agent_module(source)}.py"
        client = self.ssh.client
        transport = client.get_transport()
        # Not pushed on this connection yet: the exec line itself looks for the file, and an SFTP
        # session (a process in the guest) is opened only when it is missing.
        unsure = transport is None or remote not in _pushed.get(transport, ())
        while True:
            message = self._exec(client, remote, guard=unsure)
            if message is not None:
                break
            self._push(client, source, remote)
            unsure = False
        if transport is not None:
            _pushed.setdefault(transport, set()).add(remote)
        hello = message.get("hello")
        if not isinstance(hello, dict) or hello.get("protocol") != PROTOCOL:
            self.close()
            raise AgentDied(f"{self.vm}: the agent greeted with {message!r}, not a protocol {PROTOCOL} hello")
        self.hello = hello
        return self

    def _exec(self, client: Any, remote: str, guard: bool) -> dict[str, Any] | None:
        """Run the exec line and read the hello; None when ``guard`` found the agent file missing."""
        self._pending.clear()
        self._stderr.clear()
        self._dead = None
        self.exit_status = None
        line = self.command(remote)
        if guard:
            line = f"[ -s {shlex.quote(remote)} ] || exit {MISSING_STATUS}; {line}"
        try:
            channel = transport_of(client).open_session(timeout=SSH_CHANNEL_OPEN)
            channel.exec_command(line)
        except (OSError, EOFError, paramiko.SSHException) as exc:
            raise AgentDied(f"{self.vm}: cannot start the agent as {self.user}: SSH failed "
                            f"({type(exc).__name__}: {exc})") from exc
        self._channel = channel
        try:
            return self._read_message(time.monotonic() + self.start_timeout, "start-up")
        except AgentError:
            self._discard()
            if guard and self.exit_status == MISSING_STATUS and not self._stderr.strip():
                return None
            raise

    def command(self, remote: str) -> str:
        """The exec line, for root's shell (bash) in the guest: an agent from the agent server, else a fresh one.

        The server (``--serve`` in agent.py, which explains the exchange) forks the agent from a
        Python that has started already. When the shell finds no live server it starts one in the
        background for the next agent, and runs this one directly (``direct_command``).
        """
        serve = shlex.quote(f"{remote.removesuffix('.py')}{SERVE_SUFFIX}")
        stdin, stdout, stderr = SESSION_FDS
        return (
            f"z={serve}; f=\"$z/done.$$\"; "
            f"if [ -p \"$z/requests\" ] && read -r zp < \"$z/pid\" && read -r _ _ zs _ < \"/proc/$zp/stat\" "
            f"&& [ \"$zs\" != Z ] "
            f"&& mkfifo -m 600 \"$f\" 2>/dev/null; then "
            # The session's stdio for the server's child to open, whatever bash does to 0-2 meanwhile.
            f"exec {stdin}<&0 {stdout}>&1 {stderr}>&2 3<>\"$f\"; "
            f"echo \"$$ {shlex.quote(self.user)} {int(self.block_ms)} $f\" 1<>\"$z/requests\"; "
            f"if read -t {SERVE_ACK_TIMEOUT:g} -r -u 3 ack && [ \"$ack\" = started ]; then "
            f"exec 4<\"$f\" 3<&-; rm -f \"$f\"; read -r -u 4 st; exit \"${{st:-{SERVED_STATUS_UNKNOWN}}}\"; fi; "
            f"rm -f \"$f\"; exec 3<&- {stdin}<&- {stdout}>&- {stderr}>&-; fi; "
            # -B: the server starts beside this direct agent, and only the agent writes the compiled module.
            f"if [ \"${{EUID:-1}}\" = 0 ]; then ({self._python(remote, '--serve', write_bytecode=False)} "
            f"</dev/null >/dev/null 2>&1 &); fi; "
            f"{self.direct_command(remote)}"
        )

    def serve_directory(self) -> str:
        """The agent server's directory for this agent version (agent.py's serve_dir)."""
        return f"{self.remote_dir}/{agent_module(self.source.read_bytes())}{SERVE_SUFFIX}"

    def start_server(self, timeout: float = 30.0) -> None:
        """Leave this version's agent server running on the guest: one agent start, then wait for its pid file.

        The first agent start on a guest without a server starts one in the background (``command``);
        ``lab.up`` does this before it saves a snapshot, so a restored guest's first agent is a fork.
        """
        self.start()
        self.close()
        serve = shlex.quote(self.serve_directory())
        ticks = max(1, int(timeout * 10))
        self.ssh.run(f"i=0; until [ -p {serve}/requests ] && read -r p < {serve}/pid && [ -d /proc/\"$p\" ]; do "
                     f"i=$((i+1)); [ $i -ge {ticks} ] && echo 'no agent server after {timeout:g} s' >&2 && exit 1; "
                     "sleep 0.1; done", timeout=timeout + 10, check=True)

    def _python(self, remote: str, *options: str, write_bytecode: bool = True) -> str:
        """The guest's Python running the agent module ``remote`` (LOADER) with ``options``."""
        directory, _, name = remote.rpartition("/")
        flags = ["-I", "-S"] if write_bytecode else ["-I", "-S", "-B"]
        words = [self.python, *flags, "-c", LOADER, directory or "/", name.removesuffix(".py"), *options]
        return " ".join(shlex.quote(word) for word in words)

    def direct_command(self, remote: str) -> str:
        """A fresh agent, without the server: python as root, or through setpriv for another user."""
        run = self._python(remote, "--block-ms", str(int(self.block_ms)))
        if self.user == "root":
            return f"exec {run}"
        user = shlex.quote(self.user)
        return (f"uid=$(id -u {user}) && gid=$(id -g {user}) && "
                f"exec setpriv --reuid=\"$uid\" --regid=\"$gid\" --init-groups --reset-env {run}")

    def _push(self, client: Any, source: bytes, remote: str) -> None:
        transport = client.get_transport()
        known = _pushed.setdefault(transport, set()) if transport is not None else set()
        if remote in known:
            return
        try:
            with client.open_sftp() as sftp:
                try:
                    present = sftp.stat(remote).st_size == len(source)
                except OSError:
                    present = False
                if not present:
                    try:
                        sftp.stat(self.remote_dir)
                    except OSError:
                        try:
                            sftp.mkdir(self.remote_dir, 0o755)
                        except OSError:
                            # The VM's other agent, started at the same moment, made it first.
                            sftp.stat(self.remote_dir)
                        # World-readable, whatever sshd's umask: an agent run as student reads it too.
                        sftp.chmod(self.remote_dir, 0o755)
                    staging = f"{remote}.{time.monotonic_ns()}.part"
                    sftp.putfo(io.BytesIO(source), staging)
                    sftp.chmod(staging, 0o644)
                    sftp.posix_rename(staging, remote)  # concurrent starts never see half a file
                    self._make_cache_dir(sftp)
                    self._remove_old_versions(sftp, remote)
        except (OSError, EOFError, paramiko.SSHException) as exc:
            raise AgentPushError(f"{self.vm}: cannot copy the agent to {remote}: {exc}{self._space_left()}") from exc
        known.add(remote)

    def _space_left(self) -> str:
        """``; the guest's /run is full ...`` when the file system the agent goes to has no room, else ``""``.

        SFTP reports a full disk as a generic failure, or (paramiko's check
        after the copy) as a size mismatch; neither says why.
        """
        try:
            line = self.ssh.run(f"df -Pk {shlex.quote(self.remote_dir)} 2>/dev/null || df -Pk /run", timeout=5)
            fields = line.stdout.strip().splitlines()[-1].split()
            free_kib, mount = int(fields[3]), fields[5]
        except (LabError, OSError, EOFError, paramiko.SSHException, IndexError, ValueError):
            return ""
        if free_kib * 1024 >= 2 * self.source.stat().st_size:
            return ""
        return (f"; the guest's {mount} is full ({free_kib} KiB free): free space there, e.g. "
                f"`invoke lab.exec {self.vm} -- df -h {mount}`, or `invoke lab.down` and `lab.up` for a fresh guest")

    def _make_cache_dir(self, sftp: Any) -> None:
        """REMOTE_DIR/__pycache__, 0755 whatever the umask: root's agent writes the compiled agent, others read it."""
        cache = f"{self.remote_dir}/{PYCACHE}"
        try:
            sftp.mkdir(cache, 0o755)
        except OSError:
            pass  # there already, or made by the VM's other agent a moment ago
        try:
            sftp.chmod(cache, 0o755)
        except OSError:
            pass  # a user's agent cannot chmod root's directory; Python compiles in memory then

    def _remove_old_versions(self, sftp: Any, current: str) -> None:
        """Older agent files and their compiled code go; agents already running from them keep going."""
        keep = current.rsplit("/", 1)[-1].removesuffix(".py")
        try:
            names = sftp.listdir(self.remote_dir)
        except OSError:
            return
        # The modules first, then the servers' pid files: a server of an older version that claims its
        # directory in between finds its module gone and lets go (agent.py's AgentServer.claim()).
        for name in names:
            if name.startswith(("agent-", "agent_")) and name.endswith(".py") and name.removesuffix(".py") != keep:
                self._remove(sftp, f"{self.remote_dir}/{name}")
        for name in names:
            if name.startswith("agent_") and name.endswith(SERVE_SUFFIX) and name.removesuffix(SERVE_SUFFIX) != keep:
                # An older server: without its pid file it stops within SERVE_CHECK_S; its agents keep running.
                self._remove(sftp, f"{self.remote_dir}/{name}/pid")
        try:
            compiled = sftp.listdir(f"{self.remote_dir}/{PYCACHE}")
        except OSError:
            return
        for name in compiled:
            if name.startswith("agent_") and name.split(".", 1)[0] != keep:
                self._remove(sftp, f"{self.remote_dir}/{PYCACHE}/{name}")

    @staticmethod
    def _remove(sftp: Any, path: str) -> None:
        try:
            sftp.remove(path)
        except OSError:
            pass

    def close(self) -> int | None:
        """End the session: EOF on the agent's stdin makes it close every socket and exit."""
        channel = self._channel
        if channel is None:
            return self.exit_status
        try:
            if self._dead is None:
                channel.shutdown_write()
                deadline = time.monotonic() + 5.0
                while not channel.exit_status_ready() and time.monotonic() < deadline:
                    self._pump(min(0.2, max(0.0, deadline - time.monotonic())))
                if channel.exit_status_ready():
                    self.exit_status = channel.recv_exit_status()
                self._drain()
        except (OSError, EOFError):
            pass
        finally:
            self._discard()
        return self.exit_status

    def _discard(self) -> None:
        try:
            if self._channel is not None:
                self._channel.close()
        except (OSError, EOFError):
            pass
        self._channel = None
        if self._dead is None:
            self._dead = "closed"

    def __enter__(self) -> "Agent":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def stderr_tail(self) -> str:
        return bytes(self._stderr[-4096:]).decode(errors="replace")

    # -- steps ---------------------------------------------------------------------------------

    def call(self, op: str, /, **args: Any) -> AgentReply:
        """Run one step; raises AgentRequestError if the agent refused it, AgentDied/AgentTimeout on failure."""
        return self.request(op, args)

    def request(self, op: str, args: Mapping[str, Any] | None = None, *, timeout: float | None = None,
                check: bool = True) -> AgentReply:
        """Like ``call`` with the arguments as a mapping; ``check=False`` returns refusals as replies."""
        args = dict(args or {})
        return self._exchange(op, args, encode_args(op, args), timeout, check)

    def _exchange(self, op: str, args: Mapping[str, Any], wire: Mapping[str, Any], timeout: float | None,
                  check: bool) -> AgentReply:
        """Send ``op`` with ``wire`` (``args`` as encode_args made them) and wait for its reply."""
        step = describe_step(op, args)
        if self._channel is None or self._dead is not None:
            raise AgentDied(f"{self.vm}: the agent ({self.user}) is not running ({self._dead or 'never started'}); "
                            f"cannot run {step}")
        self._next_id += 1
        request_id = self._next_id
        try:
            line = json.dumps({"id": request_id, "op": op, "args": wire}, separators=(",", ":"))
        except (TypeError, ValueError) as exc:
            raise AgentRequestError(f"{self.vm}: cannot send {step} to the agent: {exc}") from None
        limit = self.step_timeout(op, args) if timeout is None else timeout
        sent_at = time.monotonic_ns()
        started = time.perf_counter_ns()
        log.debug("%s agent (%s) <- %s", self.vm, self.user, truncate(line))
        try:
            self._channel.sendall(line.encode() + b"\n")
        except (OSError, EOFError, paramiko.SSHException) as exc:
            self._died(step, self._write_failed(exc))
        deadline = time.monotonic() + limit
        while True:
            message = self._read_message(deadline, step, limit)
            if message.get("id") == request_id:
                break
            # A reply to a step that timed out earlier: that step is over for the caller.
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s agent (%s) -> %s in %.1f ms", self.vm, self.user,
                      truncate(json.dumps(message, separators=(",", ":"))), (time.perf_counter_ns() - started) / 1e6)
        reply = decode_reply(message, self.vm, self.user, time.perf_counter_ns() - started, sent_at)
        if reply.error is not None and check:
            raise AgentRequestError(f"{self.vm}: the agent ({self.user}) refused {step}: {reply.error}")
        return reply

    def batch(self, steps: Sequence[Mapping[str, Any]], *, block_ms: int | None = None,
              timeout: float | None = None) -> list[AgentReply]:
        """Run a whole program in one round trip; one reply per step, in order.

        Each step is ``{"op", "args", "save"?, "until"?, "max"?, "await"?, "settle_ms"?}`` (see the
        guest's ``Batch``); ``{"$ref": name, "path": [...], "fd": bool}`` in an argument stands for
        the result an earlier step of the same batch saved under ``name``.
        """
        encoded = []
        for step in steps:
            op = step["op"]
            entry = {key: value for key, value in step.items() if key != "args"}
            entry["args"] = encode_args(op, step.get("args") or {})
            encoded.append(entry)
        args: dict[str, Any] = {"steps": encoded}
        if block_ms is not None:
            args["block_ms"] = block_ms
        if timeout is None:
            per_step = (block_ms if block_ms is not None else self.block_ms) / 1000 * 0.05 + 0.02
            timeout = self.timeout + per_step * len(steps)
        started = time.perf_counter_ns()
        # The steps are encoded already: encode_args would only walk all of them again.
        reply = self._exchange("batch", args, args, timeout, True)
        rtt = time.perf_counter_ns() - started
        if not isinstance(reply.ret, list) or len(reply.ret) != len(steps):
            raise AgentError(f"{self.vm}: the agent ({self.user}) answered a batch of {len(steps)} steps with "
                             f"{type(reply.ret).__name__} of {len(reply.ret) if isinstance(reply.ret, list) else '?'}")
        return [decode_reply(message, self.vm, self.user, rtt, reply.host_ns) for message in reply.ret]

    def post(self, op: str, args: Mapping[str, Any] | None = None) -> None:
        """Send a request without waiting: the agent runs it before the next one, whose ``request``
        skips its reply. For a request whose outcome a later one reports (``trace_begin``, whose
        refusal ``trace_end`` repeats), it saves a round trip."""
        step = describe_step(op, dict(args or {}))
        if self._channel is None or self._dead is not None:
            raise AgentDied(f"{self.vm}: the agent ({self.user}) is not running ({self._dead or 'never started'}); "
                            f"cannot run {step}")
        self._next_id += 1
        line = json.dumps({"id": self._next_id, "op": op, "args": encode_args(op, dict(args or {}))},
                          separators=(",", ":"))
        log.debug("%s agent (%s) <- %s (no wait)", self.vm, self.user, truncate(line))
        try:
            self._channel.sendall(line.encode() + b"\n")
        except (OSError, EOFError, paramiko.SSHException) as exc:
            self._died(step, self._write_failed(exc))

    def reset(self, keep_tracing: bool = False) -> AgentReply:
        """Close every socket the session opened (and undo its sysctls) without ending the agent;
        ``keep_tracing`` leaves its VM's tracer armed (stopped) for the next program."""
        return self.call("reset", tracing="keep") if keep_tracing else self.call("reset")

    def step_timeout(self, op: str, args: Mapping[str, Any]) -> float:
        """The default timeout, stretched by whatever the step itself asks to wait for."""
        limit = self.timeout
        waited = 0.0
        if op == "sleep" and isinstance(args.get("seconds"), (int, float)):
            waited = float(args["seconds"])
        for key in ("timeout_ms", "timeout"):
            if op in ("poll", "epoll_wait", "wait_readable") and isinstance(args.get(key), int) and args[key] > 0:
                waited = max(waited, args[key] / 1000)
        block_ms = args.get("block_ms", self.block_ms)
        if isinstance(block_ms, int) and block_ms > 0:
            waited = max(waited, block_ms / 1000)
        return max(limit, waited + limit / 2)

    # -- the channel ---------------------------------------------------------------------------

    def _read_message(self, deadline: float, step: str, limit: float | None = None) -> dict[str, Any]:
        """The next complete JSON line from the agent's stdout.

        A guest that is paused or a QEMU that is stopped would only show up as
        a timeout, after the step's whole budget: ``watch`` looks every few
        seconds of silence and turns it into an error at once.
        """
        next_watch = time.monotonic() + WATCH_INTERVAL
        while True:
            newline = self._pending.find(b"\n")
            if newline >= 0:
                line = bytes(self._pending[:newline])
                del self._pending[:newline + 1]
                if not line.strip():
                    continue
                try:
                    message = json.loads(line)
                except ValueError:
                    self._died(step, f"it wrote a line that is not JSON: {line[:200]!r}", wait=False)
                if isinstance(message, dict):
                    return message
                self._died(step, f"it wrote {message!r} instead of a reply object", wait=False)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                waited = limit if limit is not None else self.start_timeout
                raise AgentTimeout(f"{self.vm}: the agent ({self.user}) did not answer {step} within {waited:g} s; "
                                   f"agent stderr: {self.stderr_tail.strip()[-800:] or '(empty)'}")
            got_output = self._pump(min(remaining, 0.5))
            if got_output:
                next_watch = time.monotonic() + WATCH_INTERVAL
            elif self.watch is not None and time.monotonic() >= next_watch:
                next_watch = time.monotonic() + WATCH_INTERVAL
                fault = self.watch()
                if fault:
                    self._dead = f"its VM stopped during {step}"
                    self._discard()
                    raise AgentGuestStopped(f"{self.vm}: the agent ({self.user}) cannot answer {step}: {fault}")
            if not got_output and self._ended():
                self._drain()
                if b"\n" in self._pending:
                    continue
                self._died(step, "it exited before answering")

    def _pump(self, wait: float) -> bool:
        """Wait up to ``wait`` s for the channel, then take what stdout and stderr hold; True if stdout grew."""
        channel = self._channel
        if not (channel.recv_ready() or channel.recv_stderr_ready()):
            select.select([channel], [], [], wait)
        grew = False
        while channel.recv_ready():
            chunk = channel.recv(1 << 16)
            if not chunk:
                break
            self._pending += chunk
            grew = True
        self._drain_stderr()
        return grew

    def _drain_stderr(self) -> None:
        # Read stderr every time: paramiko shares one window between both streams, so an
        # unread stderr could stall the replies.
        channel = self._channel
        while channel.recv_stderr_ready():
            self._stderr += channel.recv_stderr(1 << 16)
        if len(self._stderr) > STDERR_TAIL_BYTES:
            del self._stderr[:-STDERR_TAIL_BYTES]

    def _drain(self) -> None:
        channel = self._channel
        while channel.recv_ready():
            chunk = channel.recv(1 << 16)
            if not chunk:
                break
            self._pending += chunk
        self._drain_stderr()

    def _ended(self) -> bool:
        channel = self._channel
        return bool(channel.exit_status_ready() or channel.eof_received or channel.closed)

    def _write_failed(self, exc: BaseException) -> str:
        """Why a request could not be written: the agent ended (its side sent EOF or a status), or the SSH write failed."""
        channel = self._channel
        if channel.eof_received or channel.exit_status_ready():  # the guest's side: not a local close
            return "it exited before answering"
        return f"writing the request failed ({exc})"

    def _died(self, step: str, how: str, wait: bool = True) -> NoReturn:
        channel = self._channel
        status = None
        try:
            deadline = time.monotonic() + 1.0  # the exit status and last stderr trail the EOF
            while wait and not channel.exit_status_ready() and time.monotonic() < deadline:
                select.select([channel], [], [], 0.1)
                self._drain_stderr()
            self._drain_stderr()
            if channel.exit_status_ready():
                status = channel.recv_exit_status()
        except (OSError, EOFError):
            pass
        self.exit_status = status
        self._dead = f"died during {step}"
        self._discard()
        # -1: killed by a signal (sshd's exit-signal); SERVED_STATUS_UNKNOWN: the agent server went with it.
        status_text = "" if status is None or status < 0 or status == SERVED_STATUS_UNKNOWN else f" (exit status {status})"
        raise AgentDied(f"{self.vm}: the agent ({self.user}) died during {step}: {how}{status_text}; "
                        f"agent stderr: {self.stderr_tail.strip()[-1500:] or '(empty)'}")


class AgentHost:
    """A guest with the model ``Host``'s entry point: ``call(op, args, user)``, one agent per user."""

    def __init__(self, ssh: "GuestSSH", vm: str | None = None, **agent_options: Any) -> None:
        self.ssh = ssh
        self.vm: str = vm if vm else getattr(ssh, "vm", "guest")
        self.agent_options = agent_options
        self.agents: dict[str, Agent] = {}

    def agent(self, user: str = "root") -> Agent:
        agent = self.agents.get(user)
        if agent is None or not agent.running:
            agent = Agent(self.ssh, self.vm, user, **self.agent_options).start()
            self.agents[user] = agent
        return agent

    def call(self, op: str, args: Mapping[str, Any] | None = None, user: str = "root") -> AgentReply:
        return self.agent(user).request(op, args or {})

    def reset(self) -> None:
        for agent in self.agents.values():
            if agent.running:
                agent.reset()

    def close(self) -> None:
        for agent in self.agents.values():
            agent.close()
        self.agents.clear()


# -- latency ----------------------------------------------------------------------------------------

def _time_ns(run: Callable[[], object], n: int) -> list[int]:
    samples = []
    for _ in range(n):
        started = time.perf_counter_ns()
        run()
        samples.append(time.perf_counter_ns() - started)
    return samples


def measure_latency(lab: "Lab", vm: str = "server", n: int = 50, n_ssh_process: int | None = None,
                    warmup: int = 3, **agent_options: Any) -> LatencyReport:
    """Time one agent step, ``GuestSSH.run("true")`` on the kept connection, and a new ``ssh`` per command."""
    ssh = lab.ssh(vm)
    with Agent(ssh, vm, **agent_options) as agent:
        fd = agent.call("socket", family=2, type=1).ret
        step = lambda: agent.call("getsockopt", fd=fd, level=1, optname=3)  # noqa: E731  SO_TYPE
        _time_ns(step, warmup)
        agent_samples = _time_ns(step, n)

    def exec_true() -> None:
        ssh.run("true", timeout=30, check=True)

    _time_ns(exec_true, 1)
    exec_samples = _time_ns(exec_true, n)

    argv = lab.ssh_argv(vm) + ["-o", "BatchMode=yes", "true"]

    def spawn_true() -> None:
        result = subprocess.run(argv, capture_output=True, timeout=60, stdin=subprocess.DEVNULL)
        if result.returncode != 0:
            raise LabError(f"{vm}: `{shlex.join(argv)}` exited {result.returncode}: {result.stderr.decode()[-300:]}")

    spawn_samples = _time_ns(spawn_true, n if n_ssh_process is None else n_ssh_process)
    return LatencyReport(
        vm,
        LatencyStats.of("agent step (getsockopt) on one channel", agent_samples),
        LatencyStats.of('GuestSSH.run("true") on the kept connection', exec_samples),
        LatencyStats.of("new ssh process per command", spawn_samples),
    )

