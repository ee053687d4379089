"""A lab's life: ``up`` boots its topology's VMs (cold or from snapshots), ``down`` removes every trace of it.

One lock file keeps two socklab commands from changing the same lab at once,
another one serializes the commands that drive its guests. One checkout runs
several labs side by side, one per lab name (``--name``, default ``default``):
each has its own state, lock, netns, taps and ports, and its QEMUs are
recognised by their ``-uuid`` (``harness/vm/owner.py``), so no lab's ``down``
or cleanup ever touches another lab's processes.

Neighbours: ``state`` (what is on disk), ``topology`` (what to boot),
``diagnose`` (what went wrong); below them ``vm``, ``guest``, ``image`` and
``host``.
"""

from __future__ import annotations

import functools
import os
import re
import secrets
import shutil
import logging
import signal
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from harness import progress
from harness.deadline import SNAPSHOT_RESTORE, SSH_CONNECT
from harness.errors import GuestUnreachable, LabError, SSHError, SSHRefused
from harness.guest.ssh import GuestSSH
from harness.host import accel as accel_mod
from harness.host import deps as hostdeps
from harness.host import net
from harness.host.net import SEGMENT_MODES
from harness.image import build as image
from harness.image import kernel as kernel_mod
from harness.lab import diagnose, lock
from harness.lab.state import LabState, VMState, keep_log, lab_key, read_state, write_state
from harness.lab.topology import Topology, topology
from harness.paths import DEFAULT_LAB, Paths
from harness.vm import owner, qemu, vmstate
from harness.vm.console import GuestConsole, log_tail

# A resumed guest answers within a second or two; past this the saved state is broken.
RESTORE_TIMEOUT = SNAPSHOT_RESTORE
# What the guest's rc prints on the serial console once its NICs have their addresses
# (harness/image/recipes/rootfs/etc/socklab/rc), and how often the console log is read for it.
READY_LINE = "ready for sshd"
CONSOLE_POLL = 0.02
# How long lab.up's threads wait at a time for a peer or a wake before they look at ``abandon`` again.
WAIT_SLICE = 0.02
# sizeof(sockaddr_un.sun_path), NUL included: QEMU's QMP and console sockets live in the run dir.
SUN_PATH_MAX = 108


def _wake_perl() -> str:
    """Perl over ``$seed``, ``$sec``, ``$nsec`` and ``@peers``: what waking a restored guest does.

    Two restores of one snapshot start with the same crng state: mixing in host
    randomness and forcing a reseed (RNDRESEEDCRNG, ``_IO('R', 7)``) makes them
    independent. The clock is set with clock_settime (x86_64 syscall 227), and each
    peer's sshd port must accept a TCP connection across the segment. It prints the
    lab NIC's offloads for the status (``offloads_perl``). Everything is perl builtins,
    no modules: perl-base is in every Debian, and under TCG each exec and each library
    loaded costs translation time. The neighbour cache is left as saved: the peers'
    addresses and MACs are fixed per role (``net.mac_address``), so its entries still
    hold, and jiffies, which its timers count, do not jump on a restore.
    """
    return (
        'open(my $f, ">", "/dev/urandom") or die "urandom: $!\\n"; '
        'syswrite($f, pack("H*", $seed)) or die "urandom: $!\\n"; '
        'ioctl($f, 0x5207, 0) or die "reseed: $!\\n"; close $f; '
        'my $ts = pack("qq", $sec, $nsec); syscall(227, 0, $ts) == 0 or die "clock_settime: $!\\n"; '
        'for my $peer (@peers) { '
        'socket(my $s, 2, 1, 0) or die "socket: $!\\n"; '
        'local $SIG{ALRM} = sub { die "$peer:22 did not answer in 5 s\\n" }; alarm 5; '
        'connect($s, pack("S n C4 x8", 2, 22, split(/[.]/, $peer))) or die "$peer:22: $!\\n"; '
        'alarm 0; close $s; } '
        + offloads_perl("lab0")
    )


def _wake_words(seed_hex: str, now: float, peers: list[str]) -> tuple[int, int]:
    if not re.fullmatch(r"[0-9a-f]{2,}", seed_hex) or not all(re.fullmatch(r"[0-9.]+", p) for p in peers):
        raise ValueError("a wake takes a hex seed and dotted IPv4 peers")
    seconds = int(now)
    return seconds, min(int((now - seconds) * 1e9), 999_999_999)


def wake_command(seed_hex: str, now: float, peers: list[str]) -> str:
    """The wake (``_wake_perl``) as one shell command, in one round trip and one exec on SSH.

    Used when a restored guest's serial wake (``wake_listener_command``) did not answer.
    """
    seconds, nanoseconds = _wake_words(seed_hex, now, peers)
    quoted = ", ".join(f'"{p}"' for p in peers)
    script = (f'my ($seed, $sec, $nsec) = ("{seed_hex}", {seconds}, {nanoseconds}); my @peers = ({quoted}); '
              + _wake_perl())
    return f"perl -e '{script}'"  # one simple command: the login shell execs perl without a fork


log = logging.getLogger(__name__)

# A restored guest's listener answers in a fraction of a second; past this the wake goes over SSH.
# It includes the peers' TCP connects, which the listener gives 5 s each before it says it failed.
SERIAL_WAKE_TIMEOUT = 8.0
WAKE_TTY = "/dev/ttyS1"  # the guest's second serial port: QEMU's ``wake`` chardev (qemu.VMSpec.wake_socket)
WAKE_NAME = "socklab-wake"  # the listener's process title
# What a saved guest keeps running for its restores (vmstate.SavedVM.running).
AGENT_SERVER, WAKE_LISTENER = "agent-server", "wake-listener"


def wake_line(seed_hex: str, now: float, peers: list[str]) -> bytes:
    """What the host writes to a restored guest's wake port: ``wake SEED SEC NSEC PEER...``."""
    seconds, nanoseconds = _wake_words(seed_hex, now, peers)
    return " ".join(["wake", seed_hex, str(seconds), str(nanoseconds), *peers]).encode() + b"\n"


def wake_listener_command(tty: str = WAKE_TTY) -> str:
    """A root process, started before a snapshot is saved, that wakes the restored guest from its serial port.

    It waits on ``tty`` (root's alone, 0600) for a ``wake_line``, does the wake and answers
    ``offloads SG CSUM`` and ``woken``, then exits; a line it cannot use gets ``wake failed: ...``
    and it waits on. So a restored guest needs no exec to wake: the host writes the line as soon
    as every guest runs, while its SSH login goes on beside it.
    """
    if not re.fullmatch(r"/dev/[A-Za-z0-9/]+", tty):
        raise ValueError(f"not a tty path: {tty!r}")
    script = (
        f'$0 = "{WAKE_NAME}"; open(my $t, "+<", "{tty}") or die "{tty}: $!\\n"; select($t); $| = 1; '
        'while (my $line = <$t>) { $line =~ s/[\\r\\n]+$//; '
        'my ($word, $seed, $sec, $nsec, @peers) = split / /, $line; '
        'unless (defined $nsec && $word eq "wake" && $seed =~ /^[0-9a-f]{2,}$/ && $sec =~ /^[0-9]+$/ '
        '&& $nsec =~ /^[0-9]+$/ && !grep { !/^[0-9.]+$/ } @peers) { print "wake failed: not a wake line\\n"; next; } '
        f'if (eval {{ {_wake_perl()} 1 }}) {{ print "woken\\n"; last; }} print "wake failed: $@"; }}'
    )
    # raw: no echo, no line editing, no CR/LF translation; setsid -f: out of the SSH session that starts it.
    return f"stty -F {tty} raw -echo && setsid -f perl -e '{script}' </dev/null >/dev/null 2>&1"


# SIOCETHTOOL (include/uapi/linux/sockios.h) with ETHTOOL_GSG and ETHTOOL_GTXCSUM
# (include/uapi/linux/ethtool.h): the two features `ethtool -k` shows as scatter-gather and
# tx-checksumming, which decide whether MSG_ZEROCOPY completes without copying.
SIOCETHTOOL, ETHTOOL_GSG, ETHTOOL_GTXCSUM = 0x8946, 0x18, 0x16


def offloads_perl(nic: str) -> str:
    """Perl that prints ``offloads <sg> <csum>`` (1 or 0) for ``nic``: what the status table shows.

    Part of the wake, so a restored lab's status needs no ``ethtool -k`` of its own. A
    struct ifreq is the name in 16 bytes and a pointer to the struct ethtool_value
    ({u32 cmd; u32 data}) the kernel fills in, padded to 40 bytes.
    """
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,15}", nic):
        raise ValueError(f"not an interface name: {nic!r}")
    return (
        f'my @on; for my $cmd ({ETHTOOL_GSG}, {ETHTOOL_GTXCSUM}) {{ '
        'socket(my $e, 2, 2, 0) or die "socket: $!\n"; my $value = pack("LL", $cmd, 0); '
        f'my $ifr = pack("a16 P8 x16", "{nic}", $value); '
        f'ioctl($e, {SIOCETHTOOL:#x}, $ifr) or die "ethtool {nic}: $!\n"; '
        'push @on, (unpack("LL", $value))[1] ? 1 : 0; close $e; } print "offloads @on\n";'
    )


def check_up_args(topology_name: str | Path, accel: str, segment: str, boot_timeout: float) -> Topology:
    """Reject bad ``up`` arguments before anything is built or started."""
    topo = topology(topology_name)
    if accel not in accel_mod.ACCELS:
        raise LabError(f"unknown accelerator {accel!r}; use one of: {', '.join(accel_mod.ACCELS)}")
    if segment not in SEGMENT_MODES:
        raise LabError(f"unknown segment mode {segment!r}; use one of: {', '.join(SEGMENT_MODES)}")
    if not boot_timeout > 0:
        raise LabError(f"--timeout must be a positive number of seconds, not {boot_timeout}")
    return topo


class Lab:
    """One lab of one socklab install. ``up`` boots it, ``down`` removes every trace of it."""

    def __init__(self, paths: Paths | None = None, name: str = DEFAULT_LAB) -> None:
        self.paths = paths or Paths.default()
        self.name = name
        self.dir = self.paths.lab_dir(name)
        self.key = lab_key(self.paths, name)
        self.id = self.key[:6]
        self.run_dir = self.dir / "run"
        self.state_file = self.run_dir / "lab.json"
        self.logs = self.dir / "logs"
        self._ssh: dict[str, GuestSSH] = {}
        self._lost: set[str] = set()  # VMs whose kept connection broke and could not be made again
        self._boots: dict[str, kernel_mod.Boot] = {}
        self._woken_offloads: dict[str, tuple[str, str]] = {}
        self.woken_by: dict[str, str] = {}  # how lab.up woke each restored VM: "serial", or "ssh" when that failed

    # -- state ---------------------------------------------------------------

    def load(self) -> LabState | None:
        """The lab's state, None when no lab runs; a damaged state file is a LabError naming it."""
        return read_state(self.state_file)

    def save(self, state: LabState) -> None:
        self.paths.ensure_private(self.run_dir)
        write_state(self.state_file, state)

    def require(self) -> LabState:
        state = self.load()
        if state is None:
            raise LabError("no lab is running: start one with `invoke lab.up`")
        return state

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the lab lock; a second socklab command changing the lab is told who has it."""
        self.paths.ensure_private(self.dir)
        with lock.held(self.dir / "lab.lock"):
            yield

    @contextmanager
    def using(self) -> Iterator[None]:
        """Drive this lab's guests alone: a second check, run or grade waits, and says whom it waits for."""
        self.paths.ensure_private(self.dir)
        with lock.held(self.dir / "use.lock", wait=True, what=f"using lab {self.name!r}", say=progress.say):
            yield

    def alive(self, state: LabState) -> dict[str, bool]:
        return {vm.name: self.owned(vm) for vm in state.vms}

    @staticmethod
    def owned(vm: VMState) -> bool:
        """Whether the QEMU of ``vm`` runs: its pid, its -uuid as a whole argument and its start time all match."""
        if not vm.pid:
            return False
        if vm.uuid:
            return owner.owns(vm.pid, vm.uuid, vm.start_ticks)
        return qemu.is_running(vm.pid, vm.name)  # a state file written before VMs had UUIDs

    def qemu_pids(self) -> list[int]:
        """Every live QEMU this lab started, found by the lab key its UUIDs begin with (state file or not)."""
        return owner.lab_qemus(self.key)

    def paused(self, vm: VMState) -> str | None:
        """Why ``vm``'s guest does not run although its QEMU is alive; None if it runs (``diagnose.paused``)."""
        return diagnose.paused(self, vm)

    def guest_paused(self, name: str) -> str | None:
        """``paused`` for VM ``name`` of the running lab; None when it runs or the lab is gone."""
        try:
            state = self.load()
            return self.paused(state.vm(name)) if state is not None else None
        except LabError:
            return None

    def vm_fault(self, name: str, settle: float = 3.0) -> str | None:
        """Why VM ``name`` cannot be used, as a sentence; None if its QEMU runs and SSH works (``diagnose.vm_fault``)."""
        return diagnose.vm_fault(self, name, settle)

    def segment_faults(self, probe_timeout: float = 2.0) -> list[str]:
        """What is wrong with the lab segment, one sentence per fault; [] if it carries traffic."""
        return diagnose.segment_faults(self, probe_timeout)

    def name_flag(self) -> str:
        """`` --name NAME`` for commands quoted to the user; empty for the default lab."""
        return "" if self.name == DEFAULT_LAB else f" --name {self.name}"

    def kept_connection(self, name: str) -> GuestSSH | None:
        """The SSH connection to ``name`` this object keeps, if any (not checked, not made)."""
        return self._ssh.get(name)

    def lost_connection(self, name: str) -> bool:
        """Whether ``ssh()`` found its kept connection to ``name`` broken and has not connected again since."""
        return name in self._lost

    # -- up ------------------------------------------------------------------

    def boots(self, topo: Topology, kernel: str = "bookworm", kernel_image: Path | None = None,
              modules: Path | None = None) -> dict[str, kernel_mod.Boot]:
        """What each VM of ``topo`` boots; every image and user kernel checked before anything starts."""
        boots: dict[str, kernel_mod.Boot] = {}
        for name in topo.vms:
            recipe = image.resolve(self.paths.images, topo.kernel_of(name, kernel))
            img = image.find(self.paths, recipe.name)
            if kernel_image is not None:
                boots[name] = kernel_mod.prepare(self.paths.home, kernel_image, modules, img, recipe.initrd_modules)
            else:
                boots[name] = kernel_mod.Boot.of_image(img)
        return boots

    def up(self, topology_name: str | Path = "default", accel: str = "auto", segment: str = "auto",
           boot_timeout: float = 120.0, cold: bool = False, kernel: str = "bookworm",
           kernel_image: Path | None = None, modules: Path | None = None) -> tuple[LabState, bool]:
        """Boot the lab unless it already runs. Returns (state, started_now)."""
        topo = check_up_args(topology_name, accel, segment, boot_timeout)
        # Every kernel, image and module tree checked before anything is stopped or started.
        boots = self.boots(topo, kernel, kernel_image, modules)
        with self.locked():
            existing = self.load()
            if existing is not None:
                if existing.ready and all(self.alive(existing).values()):
                    return existing, False
                progress.say("a previous lab did not finish or has died; cleaning it up first")
                self._down_locked(existing)
            hostdeps.ensure(hostdeps.LAB_TOOLS, say=progress.say)
            first = boots[topo.vms[0]]
            state = LabState(lab_id=self.id, topology=topo.ref, name=self.name, image=str(first.image.directory),
                             host_key=first.image.host_key, owner_pid=os.getpid())
            try:
                self._up_locked(state, topo, boots, accel, segment, boot_timeout, cold)
            except BaseException:
                # Ctrl-C, a guest that never answers, a QEMU that would not start:
                # whatever was started so far is stopped before the error goes up.
                self._down_locked(self.load() or state, quiet=True)
                raise
            return state, True

    def _up_locked(self, state: LabState, topo: Topology, boots: dict[str, kernel_mod.Boot], accel: str,
                   segment: str, boot_timeout: float, cold: bool) -> None:
        with progress.step("image digests"):
            for img in {boot.image.directory: boot.image for boot in boots.values()}.values():
                damaged = img.damaged()
                if damaged:
                    raise LabError(f"cached image {img.directory.name} is damaged ({', '.join(damaged)} changed since "
                                   f"it was built); rebuild it with `invoke images.build --recipe {img.recipe or 'bookworm'} --force`")
        first = boots[topo.vms[0]]
        choice = accel_mod.choose(accel, first.kernel, self.paths.home / "accel-probe.json")
        state.accel, state.accel_reason = choice.accel, choice.reason
        progress.say(f"accelerator: [bold]{choice.accel}[/] — {choice.reason}")
        state.segment, state.segment_reason = self._segment_mode(segment, topo)
        progress.say(f"lab segment: [bold]{state.segment}[/] — {state.segment_reason}")

        plan = self._plan(state, topo, boots)
        # Snapshots are kept with the image each VM boots, keyed by its kernel and initrd too.
        stores = {spec.name: vmstate.SavedVMStore(boots[spec.name].image.directory) for spec in plan}
        keys = {spec.name: vmstate.snapshot_key({**boots[spec.name].image.sha256, **boots[spec.name].sha256}, spec,
                                                 vmstate.qemu_version()) for spec in plan}
        for store in {str(store.root): store for store in stores.values()}.values():
            for leftover in store.remove_interrupted():
                progress.say(f"removed a half-saved snapshot {leftover.name} (its socklab was killed while saving it)")
        snapshots = {} if cold else self._usable_snapshots(stores, keys)
        if snapshots:
            try:
                self._boot(state, topo, plan, snapshots, time.monotonic() + RESTORE_TIMEOUT)
                state.boot_mode = "restored from snapshot"
            except LabError as exc:
                progress.say(f"[yellow]warning:[/] restoring the snapshot failed ({exc}); discarding it, booting cold")
                for name, key in keys.items():
                    stores[name].discard(key)
                self._down_locked(state, quiet=True)
                state.vms.clear()
                snapshots = {}
        if not snapshots:
            self._boot(state, topo, plan, {}, time.monotonic() + boot_timeout)
            state.boot_mode = "cold boot"
            if not cold:
                # Before the lab is marked ready: a socklab killed mid-save leaves a lab the next
                # `lab.up` cleans away, never a "ready" one with a guest paused in postmigrate.
                self._save_snapshots(state, stores, keys)
        for vm in state.vms:
            vm.snapshot = keys[vm.name]
        self._configure_nics(state, topo)
        state.ready = True
        self.save(state)

    def _configure_nics(self, state: LabState, topo: Topology) -> None:
        """Give each guest's lab0 the MTU, offloads and netem its topology asks for (after boot and restore alike)."""
        tuned = [guest for guest in topo.guests if guest.lab0.tuned]
        if not tuned:
            return
        with progress.step(f"configure lab0 on {', '.join(guest.name for guest in tuned)}"):
            def configure(vm: VMState) -> None:
                commands = topo.guest(vm.name).lab0.guest_commands()
                if commands:
                    self.ssh(vm.name).run(" && ".join(commands), timeout=30, check=True)

            try:
                self._in_parallel(configure, [vm for vm in state.vms if topo.guest(vm.name).lab0.tuned],
                                  threading.Event())
            except SSHError as exc:
                raise LabError(f"could not configure lab0 as topology {topo.name} asks: {exc}") from exc

    def _segment_mode(self, segment: str, topo: Topology) -> tuple[str, str]:
        taps_ok, why = net.can_use_taps()
        if segment == "tap" and not taps_ok:
            raise LabError(f"--segment tap, but {why}")
        if segment == "tap" or (segment == "auto" and taps_ok):
            return "tap", "tap + bridge in netns, vnet_hdr: guest has scatter-gather and checksum offload"
        if len(topo.vms) > 2:
            raise LabError(f"the socket segment joins two VMs only; topology {topo.name} has {len(topo.vms)}: "
                           "run as root for taps")
        return "socket", (f"QEMU socket netdev over 127.0.0.1 ({why if not taps_ok else 'requested'}): "
                          "no offloads, so MSG_ZEROCOPY sends of one segment or less complete COPIED")

    def _plan(self, state: LabState, topo: Topology, boots: dict[str, kernel_mod.Boot]) -> list[qemu.VMSpec]:
        """Each VM's spec, without the host-side details (ports, sockets) a boot fills in."""
        specs = []
        for index, guest in enumerate(topo.guests):
            name = guest.name
            boot = boots[name]
            lab_nic = qemu.LabNic(mode=state.segment, mac=net.mac_address(0x5A, index),
                                  ifname=f"sl{self.id}{index}" if state.segment == "tap" else "")
            specs.append(qemu.VMSpec(
                name=name, run_dir=self.run_dir, kernel=boot.kernel, initrd=boot.initrd,
                overlay=self.run_dir / f"{name}.qcow2", ssh_port=0, mgmt_mac=net.mac_address(0, index),
                lab_ip=guest.lab0.address, lab_nic=lab_nic, accel=state.accel, memory_mib=guest.memory_mib,
                cpus=guest.cpus, sandbox=True,
                modules_disk=boot.modules_disk,
            ))
        for spec in specs:
            for sock in (spec.qmp_socket, spec.console_socket, spec.wake_socket):
                if len(os.fsencode(sock)) >= SUN_PATH_MAX:
                    raise LabError(f"{sock} is {len(os.fsencode(sock))} bytes, and a UNIX socket path must be under "
                                   f"{SUN_PATH_MAX}: point SOCKLAB_HOME at a shorter directory (or clone nearer /)")
        self._boots = boots
        return specs

    def _usable_snapshots(self, stores: dict[str, vmstate.SavedVMStore],
                          keys: dict[str, str]) -> dict[str, vmstate.SavedVM]:
        """Every VM's snapshot if all are valid; a damaged one is discarded with a warning."""
        found = {}
        for name, key in keys.items():
            snap = stores[name].get(key)
            problem = snap.problem()
            if problem is None:
                found[name] = snap
            elif problem != "missing":
                progress.say(f"[yellow]warning:[/] snapshot of {name} unusable ({problem}); it will be replaced")
                stores[name].discard(key)
        return found if len(found) == len(keys) else {}

    def _boot(self, state: LabState, topo: Topology, plan: list[qemu.VMSpec],
              snapshots: dict[str, vmstate.SavedVM], deadline: float) -> None:
        """Start every VM (cold, or resuming its snapshot) and wait until all answer on SSH."""
        self.paths.ensure_private(self.run_dir)
        segment = None
        if state.segment == "tap":
            state.netns = f"socklab-{self.id}"
            segment = net.TapSegment(state.netns)
            self.save(state)
            segment.create()
        socket_port = net.free_port() if state.segment == "socket" else 0
        started = time.monotonic()
        state.started_at = time.time()
        how = "start" if snapshots else "boot"
        with progress.step(f"{how} {len(plan)} QEMU ({state.accel}{', loading their snapshots' if snapshots else ''})"):
            # In socket mode the listening side (the first VM) must exist before the others connect.
            for index, spec in enumerate(plan):
                planned_nic = spec.lab_nic
                if planned_nic is None:  # the plan above gives every VM its lab NIC
                    raise LabError(f"{spec.name}: planned without a lab NIC")
                lab_nic = replace(planned_nic, listen_port=socket_port if index == 0 else 0,
                                  connect_port=socket_port if index > 0 else 0) if state.segment == "socket" else planned_nic
                boot = self._boots[spec.name]
                vm = VMState(name=spec.name, index=index, ssh_port=0, lab_ip=spec.lab_ip, mgmt_mac=spec.mgmt_mac,
                             lab_mac=planned_nic.mac, tap=planned_nic.ifname, overlay=str(spec.overlay),
                             image=str(boot.image.directory), kernel=boot.release,
                             kernel_image=boot.source if boot.custom else "", host_key=boot.image.host_key)
                state.vms.append(vm)
                self.save(state)
                snap = snapshots.get(spec.name)
                if snap is not None:
                    qemu.create_overlay(snap.disk, spec.overlay, base_format="qcow2")
                else:
                    qemu.create_overlay(boot.image.rootfs, spec.overlay)
                self._start_vm(state, vm, replace(spec, lab_nic=lab_nic, incoming=snap.state if snap else None))
                if segment is not None:
                    segment.attach(vm.tap)
        what = "resume, wait for SSH, reseed, set clocks, check the segment on" if snapshots else "wait for SSH on"
        with progress.step(f"{what} {', '.join(topo.vms)}") as step:
            listening = {name for name, snap in snapshots.items() if WAKE_LISTENER in snap.running}
            ssh_ready = self._wait_ssh(state, deadline, step, restored=bool(snapshots), listening=listening)
        state.boot_seconds = round(ssh_ready - started, 2)

    def _start_vm(self, state: LabState, vm: VMState, spec: qemu.VMSpec) -> None:
        """Start one QEMU, choosing a new SSH port if another process took ours in the meantime."""
        for attempt in range(3):
            vm.ssh_port = net.free_port()
            # Recorded before QEMU exists: a crash between its start and the next save still leaves it findable.
            vm.uuid = owner.new_vm_uuid(self.key)
            spec = replace(spec, ssh_port=vm.ssh_port, uuid=vm.uuid)
            vm.qmp, vm.console, vm.console_log = str(spec.qmp_socket), str(spec.console_socket), str(spec.console_log)
            self.save(state)
            try:
                vm.pid = qemu.start(spec)
            except LabError as exc:
                if "host forwarding" in str(exc) and attempt < 2:
                    continue
                raise
            vm.start_ticks = owner.start_ticks(vm.pid)
            self.save(state)
            return

    def _save_snapshots(self, state: LabState, stores: dict[str, vmstate.SavedVMStore],
                        keys: dict[str, str]) -> None:
        """Save every VM's ready state for the next ``lab.up``; a failure only costs the next boot its speed."""
        with progress.step("save ready snapshots for the next lab.up") as step:
            step.update("starting the agent servers and wake listeners")
            running = self._prepare_snapshot(state)
            self.close()  # no half-open SSH connections inside the saved state
            try:
                for vm in state.vms:
                    step.update(f"saving {vm.name}")
                    stores[vm.name].save(keys[vm.name], Path(vm.qmp), Path(vm.overlay), running[vm.name])
                    qemu.qmp_command(Path(vm.qmp), "cont")
            except (LabError, OSError) as exc:
                for vm in state.vms:
                    try:
                        qemu.qmp_command(Path(vm.qmp), "cont")
                    except Exception:  # noqa: BLE001 - resuming what we paused is best effort here
                        pass
                progress.say(f"[yellow]warning:[/] could not save snapshots ({exc}); the next lab.up boots cold")

    def _prepare_snapshot(self, state: LabState) -> dict[str, set[str]]:
        """What each guest keeps running in its saved state (docs/performance.md): its agent server and its wake listener.

        A restored guest's first agent is then a fork of a Python that has imported the agent
        already, not a Python start, an import and a server start of its own: about 2 s of TCG CPU
        less for a restored lab's first check. And the restored guest is woken over its serial
        port (``wake_listener_command``) instead of by an exec on SSH. A guest that cannot start
        either is saved without it (a warning): the restored lab starts its server on first use,
        and is woken over SSH.
        """
        from harness.guest.client import Agent

        running: dict[str, set[str]] = {vm.name: set() for vm in state.vms}

        def prepare(vm: VMState) -> None:
            try:
                Agent(self.ssh(vm.name), vm.name, timeout=60).start_server()
                running[vm.name].add(AGENT_SERVER)
                self.ssh(vm.name).run(
                    f"{wake_listener_command()} && i=0; until pgrep -f '^{WAKE_NAME}$' >/dev/null; do i=$((i+1)); "
                    "[ $i -ge 100 ] && echo 'the wake listener did not start' >&2 && exit 1; sleep 0.1; done",
                    timeout=30, check=True)
                running[vm.name].add(WAKE_LISTENER)
            except LabError as exc:  # an agent that would not start, SSH lost
                progress.say(f"[yellow]warning:[/] {vm.name}'s snapshot lacks its agent server or wake listener "
                             f"({exc}); a lab restored from it is slower to wake and to start its first agent")

        self._in_parallel(prepare, state.vms, threading.Event())
        return running

    def _wait_ssh(self, state: LabState, deadline: float, step: progress.Stage, restored: bool = False,
                  listening: frozenset[str] | set[str] = frozenset()) -> float:
        """Connect to every guest at once; return when the last one answered SSH (a monotonic time).

        A cold guest is first waited for on its console. Probing a guest whose
        NICs are not up yet costs more than it finds: user networking drops the
        SYN, and the attempt sits out its timeout while sshd starts listening.
        The guest's rc prints a ready line once its addresses are set
        (READY_LINE); from then on an attempt either reaches sshd or is refused
        at once.

        A restored guest is past that line. Each one is resumed as soon as its
        own state is loaded and connected to at once. As soon as every guest
        runs, the host writes each one's wake line to its serial port, where
        the listener its snapshot kept (``listening``, ``wake_listener_command``)
        wakes it. Such a guest is not logged in to: its sshd ran when it was
        saved, so its banner on the forward is the answer, and the first
        command logs in (``ssh()``). A guest that does not answer on its serial
        port is logged in to and woken over SSH (``wake_command``).
        """
        self.woken_by.clear()
        abandon = threading.Event()
        resumed: list[str] = []
        all_running = threading.Event()
        lock = threading.Lock()
        answered: list[float] = []

        def serial_wake(vm: VMState) -> None:
            while not all_running.wait(WAIT_SLICE):  # its peers must run too: the wake connects to each of them
                if abandon.is_set() or time.monotonic() > deadline:
                    return
            if not abandon.is_set():
                self._serial_wake(state, vm, min(SERIAL_WAKE_TIMEOUT, max(0.0, deadline - time.monotonic())))

        def reach(guest: GuestSSH, vm: VMState, guest_up: bool, login: bool) -> None:
            try:
                self._connect_watching(guest, vm, deadline - time.monotonic(), abandon, guest_up=guest_up, login=login)
            except SSHError as exc:
                raise GuestUnreachable(f"{vm.name} never became reachable over SSH ({exc}); "
                                       f"console's last lines:\n{log_tail(Path(vm.console_log))}") from exc

        def connect(vm: VMState) -> None:
            waker = None
            if restored:
                qemu.resume_incoming(Path(vm.qmp))
                with lock:
                    resumed.append(vm.name)
                    if len(resumed) == len(state.vms):
                        all_running.set()
                if vm.name in listening:  # its snapshot kept a wake listener on ttyS1
                    waker = threading.Thread(target=serial_wake, args=(vm,), name=f"socklab-wake-{vm.name}",
                                             daemon=True)
                    waker.start()
            guest_up = restored or self._console_ready(vm, deadline, abandon, step)
            guest = GuestSSH(vm.name, vm.ssh_port, self.paths.client_key, vm.host_key or state.host_key)
            if waker is not None:
                # Its sshd ran when it was saved, and the serial port wakes it: the banner says sshd
                # answers. The first command logs in (`ssh()`): in the `invoke lab.up` command, a login
                # here would be thrown away when it ends; in process, it would only come earlier.
                reach(guest, vm, guest_up, login=False)
                while waker.is_alive() and time.monotonic() < deadline and not abandon.is_set():
                    waker.join(WAIT_SLICE)  # in slices: a Ctrl-C or a failed peer must not wait out the wake
                if abandon.is_set():
                    return
                if self.woken_by.get(vm.name) == "serial":
                    answered.append(time.monotonic())  # answering and woken
                    return
            reach(guest, vm, guest_up, login=True)
            # The lab may be being stopped meanwhile (Ctrl-C, another VM failed): no connection may outlive it.
            if not abandon.is_set():
                self._ssh[vm.name] = guest
            if abandon.is_set():
                if self._ssh.get(vm.name) is guest:
                    del self._ssh[vm.name]
                guest.close()
                return
            if restored:  # not woken over its serial port: over SSH, now
                while not all_running.wait(WAIT_SLICE):  # its peers must run too: the wake connects to each of them
                    if abandon.is_set():
                        return
                    if time.monotonic() > deadline:
                        raise LabError(f"{vm.name}: the other restored guests did not start running in time")
                self._wake(state, vm)
            answered.append(time.monotonic())  # a restored guest is ready once woken, by either way

        self._in_parallel(connect, state.vms, abandon)
        step.update("all guests answer")
        return max(answered)

    def _serial_wake(self, state: LabState, vm: VMState, timeout: float) -> None:
        """Wake a resumed guest through its wake listener (``wake_listener_command``) on ttyS1; on success
        ``woken_by[vm]`` is "serial". Anything else is logged and left to ``_wake`` over SSH."""
        peers = [peer.address for peer in state.vms if peer.name != vm.name]
        path = Path(vm.qmp).with_suffix(".wake")  # qemu.VMSpec.wake_socket
        deadline = time.monotonic() + timeout
        answer = b""
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(timeout)
                sock.connect(str(path))
                sock.sendall(wake_line(secrets.token_hex(32), time.time(), peers))
                while not answer.endswith((b"woken\n",)) and b"wake failed" not in answer:
                    sock.settimeout(max(0.01, deadline - time.monotonic()))
                    chunk = sock.recv(4096)
                    if not chunk:
                        break
                    answer += chunk
        except OSError as exc:
            log.debug("%s: no serial wake (%s: %s); waking over SSH", vm.name, type(exc).__name__, exc)
            return
        if not answer.endswith(b"woken\n"):
            log.debug("%s: the serial wake answered %r; waking over SSH", vm.name, answer[-300:])
            return
        self._note_offloads(vm, answer.decode(errors="replace"))
        self.woken_by[vm.name] = "serial"
        log.debug("%s: woken over ttyS1 in %.3f s", vm.name, timeout - (deadline - time.monotonic()))

    def _wake(self, state: LabState, vm: VMState) -> None:
        """A resumed guest wakes with the clock and crng of the moment it was saved: fix them, and check the segment."""
        peers = [peer.address for peer in state.vms if peer.name != vm.name]
        try:
            woke = self._ssh[vm.name].run(wake_command(secrets.token_hex(32), time.time(), peers), timeout=15,
                                          check=True)
        except SSHError as exc:
            raise LabError(f"restored guests cannot reach each other: {exc}") from exc
        self._note_offloads(vm, woke.stdout)
        self.woken_by[vm.name] = "ssh"

    def _note_offloads(self, vm: VMState, output: str) -> None:
        for line in output.splitlines():
            words = line.split()
            if words[:1] == ["offloads"] and len(words) == 3:
                sg, csum = ("on" if word == "1" else "off" for word in words[1:])
                self._woken_offloads[vm.name] = (sg, csum)

    def woken_offloads(self, name: str) -> tuple[str, str] | None:
        """(scatter-gather, tx-checksumming) of VM ``name``'s lab NIC as its wake read them, once; else None."""
        return self._woken_offloads.pop(name, None)

    @staticmethod
    def _in_parallel(work, vms: list[VMState], abandon: threading.Event) -> None:
        """``work(vm)`` for every VM at once; the first error (or Ctrl-C) goes up without waiting for the rest.

        Waiting would keep a Ctrl-C from stopping anything until every guest
        had answered or timed out: the other threads are told to give up
        (``abandon``) and end by themselves once ``up`` has stopped the VMs.
        """
        pool = ThreadPoolExecutor(max_workers=len(vms), thread_name_prefix="socklab-up")
        try:
            futures = [pool.submit(work, vm) for vm in vms]
            # The first to fail, whichever VM it is: a later VM's error must not wait for an earlier VM's work.
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            for future in [*done, *futures]:
                future.result()
        except BaseException:
            abandon.set()
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown()

    def _console_ready(self, vm: VMState, deadline: float, abandon: threading.Event, step: progress.Stage) -> bool:
        """Wait for the guest's ready line on its console log; False if QEMU exited or the deadline passed first."""
        wanted = f"socklab: {vm.name} {READY_LINE}".encode()
        log_path = Path(vm.console_log)
        while time.monotonic() < deadline and not abandon.is_set() and self.owned(vm):
            try:
                if wanted in log_path.read_bytes():
                    step.update(f"{vm.name}: NICs up, waiting for sshd")
                    return True
            except OSError:
                pass  # QEMU creates the log as it starts
            time.sleep(CONSOLE_POLL)
        return False

    def _connect_watching(self, guest: GuestSSH, vm: VMState, timeout: float,
                          abandon: threading.Event | None = None, guest_up: bool = False, login: bool = True) -> None:
        """Connect (or, without ``login``, wait for sshd's banner) while checking QEMU is still alive,
        so a crashed guest fails fast, not at the deadline."""
        deadline = time.monotonic() + timeout
        abandon = abandon or threading.Event()
        while True:
            if abandon.is_set():
                raise SSHError(f"{vm.name}: gave up waiting for SSH (lab.up was interrupted or failed)")
            if not self.owned(vm):
                raise SSHError(f"QEMU of {vm.name} (pid {vm.pid}) exited")
            attempt = min(2.0, max(0.5, deadline - time.monotonic()))
            try:
                if login:
                    guest.connect(timeout=attempt, guest_up=guest_up)
                else:
                    guest.wait_answering(timeout=attempt)
            except SSHError:
                if time.monotonic() >= deadline:
                    raise
                continue
            if abandon.is_set():
                guest.close()
                continue
            return

    # -- using a running lab -------------------------------------------------

    def ssh(self, name: str, timeout: float = SSH_CONNECT) -> GuestSSH:
        """A connected SSH session to VM ``name`` (kept for reuse; made again if it broke).

        A VM whose QEMU is gone is reported at once, with its console's last
        lines, instead of after ``timeout`` seconds of connection attempts.
        """
        state = self.require()
        vm = state.vm(name)
        guest = self._ssh.pop(name, None)
        if guest is not None and guest.port == vm.ssh_port:
            try:
                guest.client  # noqa: B018 - raises when the connection is gone: sshd restarted, the guest rebooted
                self._ssh[name] = guest
                return guest
            except SSHError:
                self._lost.add(name)
        if guest is not None:  # broken, or to a VM of an earlier lab
            guest.close()  # also closes the stats shell kept on the connection
        if not self.owned(vm):
            raise GuestUnreachable(self.vm_fault(name, settle=0) or f"QEMU of {name} (pid {vm.pid}) is not running")
        paused = self.paused(vm)
        if paused:
            raise GuestUnreachable(paused)
        guest = GuestSSH(vm.name, vm.ssh_port, self.paths.client_key, vm.host_key or state.host_key)
        try:
            # A ready lab's guests are up (lab.up saw each answer): a silent forward is sshd busy, not a boot.
            self._connect_watching(guest, vm, timeout, guest_up=state.ready)
        except SSHRefused as exc:
            raise GuestUnreachable(f"{exc}{self._discard_restored(state, vm)}") from exc
        except SSHError as exc:
            fault = self.vm_fault(name)
            raise GuestUnreachable(f"{exc}" + (f"\n{fault}" if fault else "")) from exc
        self._ssh[name] = guest
        self._lost.discard(name)
        return guest

    def _discard_restored(self, state: LabState, vm: VMState) -> str:
        """After a refused login to ``vm``: if it was restored, discard its snapshot and say so ("" otherwise).

        A restored guest is not logged in to by ``lab.up`` (``_wait_ssh``), so the
        first command is where a snapshot that no longer takes the pinned keys
        shows. The next ``lab.up`` must boot cold rather than restore it again.
        """
        if state.boot_mode != "restored from snapshot" or not vm.snapshot or not vm.image:
            return ""
        vmstate.SavedVMStore(Path(vm.image)).discard(vm.snapshot)
        log.warning("%s: login refused after a restore; discarded snapshot %s", vm.name, vm.snapshot)
        return (f"\n{vm.name} was restored from a snapshot, which is now discarded: "
                f"`invoke lab.down{self.name_flag()}` and `invoke lab.up{self.name_flag()}` boot it cold")

    def ssh_argv(self, name: str) -> list[str]:
        """An OpenSSH command line for an interactive session, with the host key pinned."""
        state = self.require()
        vm = state.vm(name)
        known_hosts = self.run_dir / "known_hosts"
        fd = os.open(known_hosts, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(f"[127.0.0.1]:{vm.ssh_port} {vm.host_key or state.host_key}\n")
        return [
            "ssh", "-p", str(vm.ssh_port), "-i", str(self.paths.client_key),
            "-o", f"UserKnownHostsFile={known_hosts}", "-o", "StrictHostKeyChecking=yes",
            "-o", "IdentitiesOnly=yes", "-o", "LogLevel=ERROR", "root@127.0.0.1",
        ]

    def console(self, name: str) -> GuestConsole:
        vm = self.require().vm(name)
        return GuestConsole(vm.name, Path(vm.console), Path(vm.console_log))

    def close(self) -> None:
        for guest in self._ssh.values():
            guest.close()  # also closes the stats shell kept on the connection
        self._ssh.clear()

    # -- down ----------------------------------------------------------------

    def down(self) -> list[str]:
        """Stop every VM, remove taps, netns, overlays and state. Safe to call any time, twice."""
        with self.locked():
            try:
                state = self.load()
            except LabError as exc:
                # Still stop what can be found: QEMUs using the run directory, the lab's netns and taps.
                progress.say(f"{exc.args[0].split('; run `invoke lab.down`')[0]}; cleaning up by what can be found")
                state = None
            return self._down_locked(state)

    def _down_locked(self, state: LabState | None, quiet: bool = False) -> list[str]:
        self.close()
        done: list[str] = []
        netns = f"socklab-{self.id}"
        if state is not None:
            for vm in state.vms:
                if vm.pid:
                    how = qemu.stop(vm.name, vm.pid, Path(vm.qmp or self.run_dir / f"{vm.name}.qmp"),
                                    alive=functools.partial(self.owned, vm))
                    done.append(f"{vm.name}: {how}")
        # QEMUs of this lab that the state file does not know (it was lost, or socklab died before saving a pid):
        # their -uuid starts with this lab's key, which no other lab's does.
        for pid in self.qemu_pids():
            try:
                os.kill(pid, signal.SIGKILL)
                done.append(f"pid {pid}: killed (not in state)")
            except ProcessLookupError:
                pass
        segment = net.TapSegment(netns)
        if os.geteuid() == 0 and segment.exists():
            segment.destroy()
            done.append(f"netns {netns}: deleted")
        if os.geteuid() == 0:
            for index in range(8):
                net.delete_tap(f"sl{self.id}{index}")
        if self.run_dir.exists():
            logs = self.paths.ensure_private(self.logs)
            for log in self.run_dir.glob("*.console.log"):
                keep_log(log, logs)
            shutil.rmtree(self.run_dir)
            done.append("state, overlays and sockets: removed")
        if not quiet:
            for line in done:
                progress.say(line)
        return done


