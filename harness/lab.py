"""A lab: a topology of guests on one segment, brought up, inspected and torn down.

Everything a lab starts is written to its state file (``run/lab.json``, 0600)
the moment it exists, so ``down`` can always find and remove it: after a
failure, after Ctrl-C, or from another process after a crash. One lock file
keeps two socklab commands from changing the same lab at once.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import secrets
import shutil
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from . import accel as accel_mod
from . import hostdeps, image, net, progress, qemu, snapshot
from .console import GuestConsole, log_tail
from .errors import GuestUnreachable, LabError, SSHError
from .paths import Paths
from .ssh import GuestSSH

STATE_VERSION = 1
# A resumed guest answers within a second or two; past this the snapshot is broken.
RESTORE_TIMEOUT = 20.0
SEGMENT_MODES = ("auto", "tap", "socket")


@dataclass(frozen=True)
class Topology:
    """Which VMs a lab has; the n-th VM gets 198.51.100.n on the lab segment."""

    name: str
    vms: tuple[str, ...]
    memory_mib: int = 512


TOPOLOGIES = {
    "default": Topology("default", ("client", "server")),
    "single": Topology("single", ("server",)),
}


def topology(name: str) -> Topology:
    try:
        return TOPOLOGIES[name]
    except KeyError:
        raise LabError(f"unknown topology {name!r}; known: {', '.join(TOPOLOGIES)}") from None


def check_up_args(topology_name: str, accel: str, segment: str, boot_timeout: float) -> Topology:
    """Reject bad ``up`` arguments before anything is built or started."""
    topo = topology(topology_name)
    if accel not in accel_mod.ACCELS:
        raise LabError(f"unknown accelerator {accel!r}; use one of: {', '.join(accel_mod.ACCELS)}")
    if segment not in SEGMENT_MODES:
        raise LabError(f"unknown segment mode {segment!r}; use one of: {', '.join(SEGMENT_MODES)}")
    if not boot_timeout > 0:
        raise LabError(f"--timeout must be a positive number of seconds, not {boot_timeout}")
    return topo


@dataclass
class VMState:
    """One guest as started: what ``down`` needs to stop it and ``ssh`` needs to reach it."""

    name: str
    index: int
    ssh_port: int
    lab_ip: str
    mgmt_mac: str
    lab_mac: str
    tap: str = ""
    pid: int = 0
    overlay: str = ""
    qmp: str = ""
    console: str = ""
    console_log: str = ""

    @property
    def console_path(self) -> Path:
        return Path(self.console)

    @property
    def address(self) -> str:
        """The lab-segment address without its prefix length."""
        return self.lab_ip.split("/")[0]


@dataclass
class LabState:
    """The running lab, as written to ``run/lab.json``."""

    lab_id: str
    topology: str
    accel: str = ""
    accel_reason: str = ""
    segment: str = ""
    segment_reason: str = ""
    netns: str = ""
    image: str = ""
    host_key: str = ""
    started_at: float = 0.0
    boot_seconds: float = 0.0
    boot_mode: str = ""
    ready: bool = False
    owner_pid: int = 0
    vms: list[VMState] = field(default_factory=list)
    version: int = STATE_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "LabState":
        data = json.loads(text)
        if data.get("version") != STATE_VERSION:
            raise LabError(f"lab state has version {data.get('version')}, this socklab writes {STATE_VERSION}")
        vms = [VMState(**vm) for vm in data.pop("vms", [])]
        return cls(**data, vms=vms)

    def vm(self, name: str) -> VMState:
        for vm in self.vms:
            if vm.name == name:
                return vm
        raise LabError(f"no VM named {name!r} in this lab; it has: {', '.join(v.name for v in self.vms)}")


def lab_id(paths: Paths) -> str:
    """Short, stable per install: names the netns and taps so two checkouts never collide."""
    return hashlib.sha256(str(paths.home.resolve()).encode()).hexdigest()[:6]


class Lab:
    """The lab of one socklab install. ``up`` boots it, ``down`` removes every trace of it."""

    def __init__(self, paths: Paths | None = None) -> None:
        self.paths = paths or Paths.default()
        self.id = lab_id(self.paths)
        self.run_dir = self.paths.run
        self.state_file = self.run_dir / "lab.json"
        self._ssh: dict[str, GuestSSH] = {}

    # -- state ---------------------------------------------------------------

    def load(self) -> LabState | None:
        try:
            return LabState.from_json(self.state_file.read_text())
        except FileNotFoundError:
            return None
        except (ValueError, TypeError) as exc:
            raise LabError(f"{self.state_file}: unreadable lab state ({exc}); run `invoke lab.down` to clear it") from exc

    def save(self, state: LabState) -> None:
        self.paths.ensure_private(self.run_dir)
        tmp = self.state_file.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(state.to_json())
        tmp.replace(self.state_file)

    def require(self) -> LabState:
        state = self.load()
        if state is None:
            raise LabError("no lab is running: start one with `invoke lab.up`")
        return state

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the lab lock; a second socklab command changing the lab is told who has it."""
        self.paths.ensure_private(self.paths.home)
        lock_path = self.paths.home / "lab.lock"
        with open(lock_path, "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                raise LabError(f"another socklab command is changing this lab ({holder}); wait for it or stop it") from None
            handle.seek(0)
            handle.truncate()
            handle.write(f"pid {os.getpid()}")
            handle.flush()
            try:
                yield
            finally:
                handle.truncate(0)

    def alive(self, state: LabState) -> dict[str, bool]:
        return {vm.name: bool(vm.pid) and qemu.is_running(vm.pid, vm.name) for vm in state.vms}

    # -- up ------------------------------------------------------------------

    def up(self, topology_name: str = "default", accel: str = "auto", segment: str = "auto",
           boot_timeout: float = 120.0, cold: bool = False) -> tuple[LabState, bool]:
        """Boot the lab unless it already runs. Returns (state, started_now)."""
        topo = check_up_args(topology_name, accel, segment, boot_timeout)
        with self.locked():
            existing = self.load()
            if existing is not None:
                if existing.ready and all(self.alive(existing).values()):
                    return existing, False
                progress.say("a previous lab did not finish or has died; cleaning it up first")
                self._down_locked(existing)
            hostdeps.ensure(hostdeps.LAB_TOOLS, say=progress.say)
            img = image.find(self.paths)
            state = LabState(lab_id=self.id, topology=topo.name, image=str(img.directory), host_key=img.host_key,
                             owner_pid=os.getpid())
            try:
                self._up_locked(state, topo, img, accel, segment, boot_timeout, cold)
            except BaseException:
                # Ctrl-C, a guest that never answers, a QEMU that would not start:
                # whatever was started so far is stopped before the error goes up.
                self._down_locked(self.load() or state, quiet=True)
                raise
            return state, True

    def _up_locked(self, state: LabState, topo: Topology, img: image.Image, accel: str, segment: str,
                   boot_timeout: float, cold: bool) -> None:
        with progress.step("image digests"):
            damaged = img.damaged()
            if damaged:
                raise LabError(f"cached image {img.directory.name} is damaged ({', '.join(damaged)} changed since it "
                               "was built); rebuild it with `invoke images.build --force`")
        choice = accel_mod.choose(accel, img.kernel, self.paths.home / "accel-probe.json")
        state.accel, state.accel_reason = choice.accel, choice.reason
        progress.say(f"accelerator: [bold]{choice.accel}[/] — {choice.reason}")
        state.segment, state.segment_reason = self._segment_mode(segment, topo)
        progress.say(f"lab segment: [bold]{state.segment}[/] — {state.segment_reason}")

        plan = self._plan(state, topo, img)
        store = snapshot.SnapshotStore(img.directory)
        keys = {spec.name: snapshot.snapshot_key(img.sha256, spec, snapshot.qemu_version()) for spec in plan}
        snapshots = {} if cold else self._usable_snapshots(store, keys)
        if snapshots:
            try:
                self._boot(state, topo, plan, snapshots, time.monotonic() + RESTORE_TIMEOUT)
                self._after_restore(state)
                state.boot_mode = "restored from snapshot"
            except LabError as exc:
                progress.say(f"[yellow]warning:[/] restoring the snapshot failed ({exc}); discarding it, booting cold")
                for key in keys.values():
                    store.discard(key)
                self._down_locked(state, quiet=True)
                state.vms.clear()
                snapshots = {}
        if not snapshots:
            self._boot(state, topo, plan, {}, time.monotonic() + boot_timeout)
            state.boot_mode = "cold boot"
        state.ready = True
        self.save(state)
        if not snapshots and not cold:
            self._save_snapshots(state, store, keys)

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
                          "no offloads, so MSG_ZEROCOPY completions report COPIED")

    def _plan(self, state: LabState, topo: Topology, img: image.Image) -> list[qemu.VMSpec]:
        """Each VM's spec, without the host-side details (ports, sockets) a boot fills in."""
        specs = []
        for index, name in enumerate(topo.vms):
            lab_nic = qemu.LabNic(mode=state.segment, mac=net.mac_address(0x5A, index),
                                  ifname=f"sl{self.id}{index}" if state.segment == "tap" else "")
            specs.append(qemu.VMSpec(
                name=name, run_dir=self.run_dir, kernel=img.kernel, initrd=img.initrd,
                overlay=self.run_dir / f"{name}.qcow2", ssh_port=0, mgmt_mac=net.mac_address(0, index),
                lab_ip=net.lab_address(index), lab_nic=lab_nic, accel=state.accel, memory_mib=topo.memory_mib,
            ))
        return specs

    def _usable_snapshots(self, store: snapshot.SnapshotStore, keys: dict[str, str]) -> dict[str, snapshot.Snapshot]:
        """Every VM's snapshot if all are valid; a damaged one is discarded with a warning."""
        found = {}
        for name, key in keys.items():
            snap = store.get(key)
            problem = snap.problem()
            if problem is None:
                found[name] = snap
            elif problem != "missing":
                progress.say(f"[yellow]warning:[/] snapshot of {name} unusable ({problem}); it will be replaced")
                store.discard(key)
        return found if len(found) == len(keys) else {}

    def _boot(self, state: LabState, topo: Topology, plan: list[qemu.VMSpec],
              snapshots: dict[str, snapshot.Snapshot], deadline: float) -> None:
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
        how = "resume" if snapshots else "boot"
        with progress.step(f"{how} {len(plan)} QEMU ({state.accel})"):
            # In socket mode the listening side (the first VM) must exist before the others connect.
            for index, spec in enumerate(plan):
                lab_nic = replace(spec.lab_nic, listen_port=socket_port if index == 0 else 0,
                                  connect_port=socket_port if index > 0 else 0) if state.segment == "socket" else spec.lab_nic
                vm = VMState(name=spec.name, index=index, ssh_port=0, lab_ip=spec.lab_ip, mgmt_mac=spec.mgmt_mac,
                             lab_mac=spec.lab_nic.mac, tap=spec.lab_nic.ifname, overlay=str(spec.overlay))
                state.vms.append(vm)
                self.save(state)
                snap = snapshots.get(spec.name)
                if snap is not None:
                    qemu.create_overlay(snap.disk, spec.overlay, base_format="qcow2")
                else:
                    qemu.create_overlay(Path(state.image) / image.ROOTFS, spec.overlay)
                self._start_vm(state, vm, replace(spec, lab_nic=lab_nic, incoming=snap.state if snap else None))
                if segment is not None:
                    segment.attach(vm.tap)
            for vm in state.vms if snapshots else ():
                qemu.resume_incoming(Path(vm.qmp))
        with progress.step(f"wait for SSH on {', '.join(topo.vms)}") as step:
            self._wait_ssh(state, deadline, step)
        state.boot_seconds = round(time.monotonic() - started, 2)

    def _start_vm(self, state: LabState, vm: VMState, spec: qemu.VMSpec) -> None:
        """Start one QEMU, choosing a new SSH port if another process took ours in the meantime."""
        for attempt in range(3):
            vm.ssh_port = net.free_port()
            spec = replace(spec, ssh_port=vm.ssh_port)
            vm.qmp, vm.console, vm.console_log = str(spec.qmp_socket), str(spec.console_socket), str(spec.console_log)
            try:
                vm.pid = qemu.start(spec)
            except LabError as exc:
                if "host forwarding" in str(exc) and attempt < 2:
                    continue
                raise
            self.save(state)
            return

    def _after_restore(self, state: LabState) -> None:
        """A resumed guest wakes with the clock and neighbours of the moment it was saved: fix and check."""
        with progress.step("reseed guest RNGs, set clocks, check the lab segment"):
            def fix(vm: VMState) -> None:
                # One round trip per guest: new randomness, the clock, no stale neighbours, every peer reached.
                # Two restores of one snapshot start with the same crng state; mixing in host
                # randomness and forcing a reseed (RNDRESEEDCRNG, _IO('R', 7)) makes them
                # independent. perl-base is in every Debian, and starts faster than python3.
                seed = secrets.token_hex(32)
                reseed = (f"perl -e 'open(my $f, \">\", \"/dev/urandom\") or die $!; "
                          f"syswrite($f, pack(\"H*\", \"{seed}\")); ioctl($f, 0x5207, 0) or die \"reseed: $!\"'")
                peers = " && ".join(f"timeout 5 bash -c '</dev/tcp/{peer.address}/22'"
                                    for peer in state.vms if peer.name != vm.name) or "true"
                self._ssh[vm.name].run(f"{reseed} && date -u -s @{time.time():.6f} >/dev/null && "
                                       f"ip neigh flush dev lab0 && {peers}", timeout=15, check=True)

            with ThreadPoolExecutor(max_workers=len(state.vms)) as pool:
                for future in [pool.submit(fix, vm) for vm in state.vms]:
                    try:
                        future.result()
                    except SSHError as exc:
                        raise LabError(f"restored guests cannot reach each other: {exc}") from exc

    def _save_snapshots(self, state: LabState, store: snapshot.SnapshotStore, keys: dict[str, str]) -> None:
        """Save every VM's ready state for the next ``lab.up``; a failure only costs the next boot its speed."""
        with progress.step("save ready snapshots for the next lab.up") as step:
            self.close()  # no half-open SSH connections inside the saved state
            try:
                for vm in state.vms:
                    step.update(f"saving {vm.name}")
                    store.save(keys[vm.name], Path(vm.qmp), Path(vm.overlay))
                    qemu.qmp_command(Path(vm.qmp), "cont")
            except (LabError, OSError) as exc:
                for vm in state.vms:
                    try:
                        qemu.qmp_command(Path(vm.qmp), "cont")
                    except Exception:  # noqa: BLE001 - resuming what we paused is best effort here
                        pass
                progress.say(f"[yellow]warning:[/] could not save snapshots ({exc}); the next lab.up boots cold")

    def _wait_ssh(self, state: LabState, deadline: float, step: progress.Step) -> None:
        def connect(vm: VMState) -> None:
            remaining = deadline - time.monotonic()
            guest = GuestSSH(vm.name, vm.ssh_port, self.paths.client_key, state.host_key)
            try:
                self._connect_watching(guest, vm, remaining)
            except SSHError as exc:
                raise GuestUnreachable(f"{vm.name} never became reachable over SSH ({exc}); "
                                       f"console's last lines:\n{log_tail(Path(vm.console_log))}") from exc
            self._ssh[vm.name] = guest

        with ThreadPoolExecutor(max_workers=len(state.vms)) as pool:
            for future in [pool.submit(connect, vm) for vm in state.vms]:
                future.result()
        step.update("all guests answer")

    def _connect_watching(self, guest: GuestSSH, vm: VMState, timeout: float) -> None:
        """Connect while checking QEMU is still alive, so a crashed guest fails fast, not at the deadline."""
        deadline = time.monotonic() + timeout
        while True:
            if not qemu.is_running(vm.pid, vm.name):
                raise SSHError(f"QEMU of {vm.name} (pid {vm.pid}) exited during boot")
            try:
                guest.connect(timeout=min(5.0, max(0.5, deadline - time.monotonic())))
                return
            except SSHError:
                if time.monotonic() >= deadline:
                    raise

    # -- using a running lab -------------------------------------------------

    def ssh(self, name: str, timeout: float = 30.0) -> GuestSSH:
        """A connected SSH session to VM ``name`` (kept for reuse)."""
        state = self.require()
        vm = state.vm(name)
        guest = self._ssh.get(name)
        if guest is None or guest.port != vm.ssh_port:
            guest = GuestSSH(vm.name, vm.ssh_port, self.paths.client_key, state.host_key).connect(timeout)
            self._ssh[name] = guest
        return guest

    def ssh_argv(self, name: str) -> list[str]:
        """An OpenSSH command line for an interactive session, with the host key pinned."""
        state = self.require()
        vm = state.vm(name)
        known_hosts = self.run_dir / "known_hosts"
        fd = os.open(known_hosts, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(f"[127.0.0.1]:{vm.ssh_port} {state.host_key}\n")
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
            guest.close()
        self._ssh.clear()

    # -- down ----------------------------------------------------------------

    def down(self) -> list[str]:
        """Stop every VM, remove taps, netns, overlays and state. Safe to call any time, twice."""
        with self.locked():
            return self._down_locked(self.load())

    def _down_locked(self, state: LabState | None, quiet: bool = False) -> list[str]:
        self.close()
        done: list[str] = []
        netns = f"socklab-{self.id}"
        if state is not None:
            for vm in state.vms:
                if vm.pid:
                    how = qemu.stop(vm.name, vm.pid, Path(vm.qmp or self.run_dir / f"{vm.name}.qmp"))
                    done.append(f"{vm.name}: {how}")
            netns = state.netns or netns
        # QEMUs of this lab that the state file does not know (killed mid-save).
        for pid in _qemu_pids_using(self.run_dir):
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
            logs = self.paths.home / "logs"
            logs.mkdir(exist_ok=True, mode=0o700)
            for log in self.run_dir.glob("*.console.log"):
                shutil.move(str(log), logs / log.name)
            shutil.rmtree(self.run_dir)
            done.append("state, overlays and sockets: removed")
        if not quiet:
            for line in done:
                progress.say(line)
        return done


def _qemu_pids_using(run_dir: Path) -> list[int]:
    """Pids of QEMU processes whose command line points into ``run_dir``."""
    marker = str(run_dir).encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if cmdline.startswith(qemu.QEMU.encode()) and marker in cmdline:
            pids.append(int(entry.name))
    return pids
