"""Collect a VM's stats with ONE shell command over SSH, split its output into sections, parse each.

The command runs every tool once, between markers that carry a per-snapshot
nonce, so no socket name or counter can forge a section boundary:

    @@socklab-stats <nonce> begin <section>@@
    <stdout of the tool>
    @@socklab-stats <nonce> status <exit status>@@
    [@@socklab-stats <nonce> stderr@@
     <stderr of the tool>]
    …
    @@socklab-stats <nonce> done@@

Under TCG every exec of a dynamically linked tool costs 25-90 ms in the guest
(ld.so and libc start-up, emulated, see ``SHELL_COMMAND``), so the command execs as few as it can:
one ``ss`` for all sockets, one ``ethtool -k '*'`` for the features of every
device, one ``ethtool -S`` per NIC (it has no wildcard), and one static
busybox ``grep -H`` for every procfs file, sysctls included. By default it
runs in a shell kept open on the VM's SSH connection, which saves the ~110 ms
sshd spends starting bash and sh for a new session.
"""

from __future__ import annotations

import dataclasses

import re
import secrets
import select
import shlex
import threading
import time
import weakref
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import paramiko

from ..deadline import SSH_CHANNEL_OPEN, STATS_COLLECT
from ..errors import SSHError
from ..guest.ssh import transport_of
from . import procnet
from .errors import Origin, StatsCommandFailed, StatsError, StatsFormatError, StatsToolMissing, StatsTruncatedError
from .ethtool import FEATURES_COMMAND, parse_ethtool_features, parse_ethtool_stats, stats_command
from .snapshot import EMPTY, FrozenDict, LabSnapshot, Nic, Snapshot
from .ss import SS_COMMAND, parse_ss
from .sysctl import SYSCTLS, parse_sysctls

if TYPE_CHECKING:
    from harness.lab.lifecycle import Lab
    from harness.guest.ssh import GuestSSH

BOOT_ID = "/proc/sys/kernel/random/boot_id"
PROCFS_FILES: tuple[str, ...] = (
    BOOT_ID, procnet.NETSTAT, procnet.SNMP, procnet.SOCKSTAT, procnet.SOCKSTAT6,
    *(spec.path for spec in SYSCTLS),
)
# busybox is statically linked: one exec costs ~5 ms under TCG where coreutils cat costs ~30 ms.
PROCFS_COMMAND = "busybox grep -H '' " + " ".join(PROCFS_FILES)
DEFAULT_TIMEOUT = STATS_COLLECT
# QEMU 7.2's TCG finds translated code by virtual address; with ASLR every exec maps ld.so and the
# libraries somewhere new and all their code is translated again. The stats shell, and so every tool
# it runs, has ASLR off (setarch -R, inherited across exec; nothing else in the guest changes), so
# the next snapshot reuses the translations: an exec costs about half as much. Plain sh if setarch
# is missing.
SHELL_COMMAND = 'command -v setarch >/dev/null 2>&1 && exec setarch "$(uname -m)" -R /bin/sh; exec /bin/sh'
_NIC_NAME = re.compile(r"^[A-Za-z0-9_.@-]{1,15}$")  # IFNAMSIZ - 1; nothing the shell would expand
ETHTOOL_NO_STATS = 94  # EOPNOTSUPP: the driver has no get_ethtool_stats (bridges, loopback)

# LC_ALL=C: ss prints rtt and rates with %g, which a locale would give a decimal comma.
_PRELUDE = r"""export LC_ALL=C
e=${TMPDIR:-/tmp}/.socklab-stats.$$.err
trap 'rm -f "$e"' EXIT  # once, when the shell ends: the cost of a coreutils exec does not matter
m() { printf '@@socklab-stats %s %s@@\n' "$N" "$*"; }
sec() {
  m begin "$1"; shift
  "$@" </dev/null 2>"$e"
  m status $?
  if [ -s "$e" ]; then
    m stderr
    while IFS= read -r l || [ -n "$l" ]; do printf '%s\n' "$l"; done <"$e"
  fi
}
"""

_ALL_NICS = r"""for d in /sys/class/net/*; do
  [ -e "$d/ifindex" ] || continue  # bonding_masters is a file there, not a device
  n=${d##*/}
  [ "$n" = lo ] && continue  # the loopback driver has no counters for ethtool -S
  sec "ethtool-S $n" ethtool -S "$n"
done
"""


def build_command(nonce: str, nics: Sequence[str] | None = None) -> str:
    """The one shell command (POSIX sh) that prints every section; ``nics=None`` means every NIC but lo."""
    if not re.fullmatch(r"[0-9a-f]{8,64}", nonce):
        raise ValueError(f"nonce must be hex, got {nonce!r}")
    parts = [f"N={nonce}\n", _PRELUDE, f"sec ss {SS_COMMAND}\n", f"sec ethtool-k {FEATURES_COMMAND}\n"]
    if nics is None:
        parts.append(_ALL_NICS)
    else:
        for nic in nics:
            if not _NIC_NAME.match(nic):
                raise StatsError(f"{nic!r} is not an interface name")
            parts.append(f"sec 'ethtool-S {nic}' ethtool -S {nic}\n")
    parts.append(f"sec procfs {PROCFS_COMMAND}\n")
    parts.append("m done\n")
    return "".join(parts)


def one_shot_command(command: str) -> str:
    """``command`` for a fresh SSH session, under setarch -R like the kept-open shell when the guest has it."""
    return (f'if command -v setarch >/dev/null 2>&1; then exec setarch "$(uname -m)" -R /bin/sh -c '
            f'{shlex.quote(command)}; fi\n{command}')


def done_marker(nonce: str) -> str:
    return f"@@socklab-stats {nonce} done@@\n"


@dataclass(frozen=True)
class Section:
    """What one tool printed: stdout, exit status, stderr."""

    name: str
    command: str
    stdout: str
    status: int
    stderr: str


def section_command(name: str) -> str:
    if name == "ss":
        return SS_COMMAND
    if name == "ethtool-k":
        return FEATURES_COMMAND
    if name.startswith("ethtool-S "):
        return stats_command(name.split(" ", 1)[1])
    if name == "procfs":
        return PROCFS_COMMAND
    return name


def split_sections(text: str, nonce: str, vm: str) -> dict[str, Section]:
    """The sections of the command's output, checked for completeness and cut lines."""
    marker = re.compile(r"@@socklab-stats " + re.escape(nonce) + r" (begin|status|stderr|done)(?: ([^\n]*?))?@@\n")
    whole = Origin(vm, "the stats command")
    sections: dict[str, Section] = {}
    position = 0
    current: dict[str, Any] | None = None  # name, stdout, stderr: str; status: int
    done = False

    def line_number(offset: int) -> int:
        return text.count("\n", 0, offset) + 1

    def finish() -> None:
        if current is not None:
            if "status" not in current:
                raise StatsTruncatedError(Origin(vm, section_command(current["name"])), 0, "",
                                          "the output stops inside this section (no status marker)")
            sections[current["name"]] = Section(current["name"], section_command(current["name"]),
                                                current.get("stdout", ""), current["status"], current.get("stderr", ""))

    for match in marker.finditer(text):
        between = text[position:match.start()]
        kind, argument = match.group(1), match.group(2) or ""
        if current is None and between:
            raise StatsFormatError(whole, 1, between.split("\n")[0], "output before the first section marker")
        if current is not None and "status" not in current:
            # The tool's stdout: every line of it must end in a newline, or it was cut.
            if between and not between.endswith("\n"):
                last = between.rsplit("\n", 1)[-1]
                origin = Origin(vm, section_command(current["name"]))
                raise StatsTruncatedError(origin, between.count("\n") + 1, last, "the last line has no newline")
            current["stdout"] = between
        elif current is not None:
            current["stderr"] = current.get("stderr", "") + between
        if kind == "begin":
            finish()
            if argument in sections:
                raise StatsFormatError(whole, line_number(match.start()), match.group(0).strip(),
                                       f"section {argument!r} appears twice")
            current = {"name": argument}
        elif current is None:
            raise StatsFormatError(whole, line_number(match.start()), match.group(0).strip(),
                                   f"'{kind}' marker outside a section")
        elif kind == "status":
            if not argument.isdigit() or "status" in current:
                raise StatsFormatError(whole, line_number(match.start()), match.group(0).strip(), "bad status marker")
            current["status"] = int(argument)
        elif kind == "stderr":
            if "status" not in current:
                raise StatsFormatError(whole, line_number(match.start()), match.group(0).strip(),
                                       "stderr marker before the status marker")
        elif kind == "done":
            finish()
            current = None
            done = True
            position = match.end()
            break
        position = match.end()
    if not done:
        tail = text[position:].rstrip("\n").rsplit("\n", 1)[-1]
        where = f" inside section {current['name']!r}" if current else ""
        raise StatsTruncatedError(whole, line_number(len(text)), tail, f"the output stops{where} before its end marker")
    if text[position:].strip():
        raise StatsFormatError(whole, line_number(position), text[position:].split("\n")[0],
                               "output after the end marker")
    for required in ("ss", "ethtool-k", "procfs"):
        if required not in sections:
            raise StatsFormatError(whole, 0, "", f"no {required!r} section in the output")
    return sections


def _check_status(section: Section, vm: str) -> None:
    if section.status == 0:
        return
    stderr = section.stderr.strip()
    if section.status in (126, 127):  # the shell could not find, or could not run, the program
        tool = section.command.split()[0]
        raise StatsToolMissing(f"{vm}: `{section.command}` failed: {tool} is not installed in the guest "
                               f"(exit {section.status}: {stderr or 'no message'})")
    raise StatsCommandFailed(f"{vm}: `{section.command}` exited {section.status}: {stderr or 'no message on stderr'}")


def _summarise_stderr(text: str) -> str:
    """Repeated stderr lines once each with a count (ss -e repeats its cgroup warning per socket)."""
    counts = Counter(line for line in text.splitlines() if line.strip())
    return "\n".join(line if n == 1 else f"{line} (×{n})" for line, n in counts.items())


def parse_output(text: str, nonce: str, vm: str, taken_at: float = 0.0, round_trip_ms: float = 0.0) -> Snapshot:
    """A ``Snapshot`` from the full output of ``build_command(nonce)`` run on ``vm``."""
    sections = split_sections(text, nonce, vm)
    warnings: dict[str, str] = {}
    stats: dict[str, Section] = {}
    for name, section in sections.items():
        if name.startswith("ethtool-S ") and section.status == ETHTOOL_NO_STATS and "no stats available" in section.stderr:
            warnings[section.command] = _summarise_stderr(section.stderr)
            continue  # the driver has none: the NIC is kept, with counters_collected False
        _check_status(section, vm)
        if section.stderr.strip():
            warnings[section.command] = _summarise_stderr(section.stderr)
        if name.startswith("ethtool-S "):
            stats[name.split(" ", 1)[1]] = section

    sockets = parse_ss(sections["ss"].stdout, Origin(vm, SS_COMMAND))
    features = parse_ethtool_features(sections["ethtool-k"].stdout, Origin(vm, FEATURES_COMMAND))
    nics: dict[str, Nic] = {}
    for name in [*features, *(n for n in stats if n not in features)]:
        nic_counters, queues = (parse_ethtool_stats(stats[name].stdout, Origin(vm, stats_command(name)))
                                if name in stats else (EMPTY, ()))
        nics[name] = Nic(name, nic_counters, queues, features.get(name, EMPTY), counters_collected=name in stats)

    procfs = procnet.split_grep_h(sections["procfs"].stdout, PROCFS_FILES, Origin(vm, PROCFS_COMMAND))

    def origin_for(path: str) -> Origin:
        return procnet.file_origin(vm, path)

    counters: dict[str, int] = {}
    for path in (procnet.NETSTAT, procnet.SNMP):
        for key, value in procnet.parse_mib(procfs[path], origin_for(path), procnet.REQUIRED_GROUPS[path]).items():
            if key in counters:
                raise StatsFormatError(origin_for(path), 0, key, f"counter {key} also appears in another file")
            counters[key] = value
    sockstat = {**procnet.parse_sockstat(procfs[procnet.SOCKSTAT], origin_for(procnet.SOCKSTAT)),
                **procnet.parse_sockstat(procfs[procnet.SOCKSTAT6], origin_for(procnet.SOCKSTAT6))}
    boot_id = procfs[BOOT_ID].strip()
    if not re.fullmatch(r"[0-9a-f-]{36}", boot_id):
        raise StatsFormatError(origin_for(BOOT_ID), 1, boot_id, "not a boot id (UUID)")
    return Snapshot(
        vm=vm, boot_id=boot_id, taken_at=taken_at, round_trip_ms=round_trip_ms, sockets=sockets,
        nics=FrozenDict(nics), counters=FrozenDict(counters), sockstat=FrozenDict(sockstat),
        sysctls=parse_sysctls(procfs, origin_for), stderr=FrozenDict(warnings),
    )


# -- running it ---------------------------------------------------------------


class _StatsShell:
    """A ``sh`` kept running on one SSH connection; each snapshot is one write and one read on it."""

    def __init__(self, ssh: "GuestSSH") -> None:
        self.ssh = ssh
        self.lock = threading.Lock()
        self.channel: paramiko.Channel | None = None
        self.client: paramiko.SSHClient | None = None
        self.pid = 0

    def _open(self, timeout: float) -> paramiko.Channel:
        client = self.ssh.client  # raises SSHError when the connection is gone
        if self.channel is not None and self.client is client and not self.channel.closed \
                and not self.channel.exit_status_ready():
            return self.channel
        self.close()
        try:
            channel = transport_of(client).open_session(timeout=SSH_CHANNEL_OPEN)
            channel.exec_command(SHELL_COMMAND)
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise SSHError(f"{self.ssh.vm}: cannot start the stats shell: {exc}") from exc
        self.channel, self.client = channel, client
        # sshd makes the session's shell a process-group leader: its pid lets a timeout kill the group.
        try:
            first = self._read_until(b"\n", "echo $$\n", timeout)
            if not first.strip().isdigit():
                raise StatsError(f"{self.ssh.vm}: the stats shell did not start: {first[:200]!r}")
        except BaseException:
            self.close()
            raise
        self.pid = int(first)
        return channel

    def _read_until(self, end: bytes, command: str, timeout: float) -> str:
        channel = self.channel
        if channel is None:  # callers start the shell first
            raise StatsError(f"{self.ssh.vm}: the stats shell is not running")
        out, err = bytearray(), bytearray()
        deadline = time.monotonic() + timeout
        try:
            channel.sendall(command.encode())
        except (OSError, EOFError) as exc:
            # The shell died before it read the command (it could not start): say why, from its stderr.
            while not channel.exit_status_ready() and time.monotonic() < deadline:
                select.select([channel], [], [], 0.1)
            while channel.recv_stderr_ready():
                err += channel.recv_stderr(65536)
            status = channel.recv_exit_status() if channel.exit_status_ready() else "?"
            raise StatsError(f"{self.ssh.vm}: the stats shell exited ({status}) before reading its command "
                             f"({exc}): {bytes(err).decode(errors='replace').strip()[-300:]}") from exc
        while not out.endswith(end):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise StatsError(f"{self.ssh.vm}: the stats command did not finish within {timeout:.0f} s "
                                 f"(got {len(out)} bytes)")
            select.select([channel], [], [], min(remaining, 0.5))
            while channel.recv_ready():
                out += channel.recv(65536)
            while channel.recv_stderr_ready():
                err += channel.recv_stderr(65536)
            if channel.exit_status_ready() and not channel.recv_ready():
                raise StatsError(f"{self.ssh.vm}: the stats shell exited ({channel.recv_exit_status()}) "
                                 f"mid-command: {bytes(err).decode(errors='replace').strip()[-300:]}")
        if err:
            raise StatsError(f"{self.ssh.vm}: the stats shell wrote to stderr: "
                             f"{bytes(err).decode(errors='replace').strip()[-300:]}")
        return out.decode(errors="replace")

    def run(self, command: str, end: str, timeout: float) -> str:
        with self.lock:
            self._open(timeout)
            try:
                return self._read_until(end.encode(), command, timeout)
            except BaseException:
                self._kill()  # a half-read channel cannot be reused, and its tools must not linger
                self.close()
                raise

    def _kill(self) -> None:
        """Kill the shell's process group (it and whatever tool hangs) over a separate session."""
        if not self.pid or self.client is None:
            return
        try:
            channel = transport_of(self.client).open_session(timeout=SSH_CHANNEL_OPEN)
            channel.exec_command(f"kill -KILL -{self.pid} 2>/dev/null || kill -KILL {self.pid}")
            deadline = time.monotonic() + 5
            while not channel.exit_status_ready() and time.monotonic() < deadline:
                time.sleep(0.05)
            channel.close()
        except (paramiko.SSHException, OSError, EOFError):
            pass

    def close(self) -> None:
        if self.channel is not None:
            try:
                self.channel.close()
            except (paramiko.SSHException, OSError, EOFError):
                pass
        self.channel, self.client, self.pid = None, None, 0


_shells: "weakref.WeakKeyDictionary[GuestSSH, _StatsShell]" = weakref.WeakKeyDictionary()
_shells_lock = threading.Lock()


def _shell_for(ssh: "GuestSSH") -> _StatsShell:
    with _shells_lock:
        shell = _shells.get(ssh)
        if shell is None:
            shell = _shells[ssh] = _StatsShell(ssh)
            connection = weakref.ref(ssh)

            def closed() -> None:
                owner = connection()
                if owner is not None:
                    close_shell(owner)

            ssh.on_close(closed)
        return shell


def close_shell(ssh: "GuestSSH") -> None:
    """Stop the kept-open stats shell of this connection, if any (``GuestSSH.close`` calls this through ``on_close``)."""
    with _shells_lock:
        shell = _shells.pop(ssh, None)
    if shell is not None:
        with shell.lock:
            shell.close()


def collect(ssh: "GuestSSH", vm: str | None = None, *, nics: Sequence[str] | None = None,
            timeout: float = DEFAULT_TIMEOUT, reuse_shell: bool = True) -> Snapshot:
    """One ``Snapshot`` of the VM behind ``ssh``, in one SSH round trip.

    ``nics`` limits ``ethtool -S`` to those NICs (default: every one but lo);
    features are read for all. ``reuse_shell=False`` runs the command in a new
    SSH session instead of the kept-open shell (slower by one sshd start-up).
    """
    vm = vm or ssh.vm
    nonce = secrets.token_hex(8)
    command = build_command(nonce, nics)
    started = time.perf_counter()
    if reuse_shell:
        output = _shell_for(ssh).run(command, done_marker(nonce), timeout)
    else:
        result = ssh.run(one_shot_command(command), timeout=timeout)
        if not result.ok and done_marker(nonce) not in result.stdout:
            raise StatsCommandFailed(f"{vm}: the stats command exited {result.exit_status}: "
                                     f"{result.stderr.strip()[-300:] or 'no message'}")
        output = result.stdout
    round_trip_ms = (time.perf_counter() - started) * 1000
    snapshot = parse_output(output, nonce, vm, taken_at=time.time(), round_trip_ms=round_trip_ms)
    return dataclasses.replace(snapshot, raw=output)


def collect_many(lab: "Lab", names: Sequence[str] | None = None, **options: Any) -> LabSnapshot:
    """Snapshots of several VMs (default: all of the lab's) taken in parallel, one thread per VM."""
    names = list(names) if names is not None else [vm.name for vm in lab.require().vms]
    if not names:
        raise StatsError("collect_many: no VMs named")
    guests = {name: lab.ssh(name) for name in names}  # Lab.ssh caches connections; not thread-safe
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=len(names), thread_name_prefix="socklab-stats") as pool:
        futures = {name: pool.submit(collect, guests[name], name, **options) for name in names}
        snapshots = {name: future.result() for name, future in futures.items()}
    return LabSnapshot(snapshots, (time.perf_counter() - started) * 1000)
