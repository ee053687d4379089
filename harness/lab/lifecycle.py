"""A lab: a topology of guests on one segment, brought up, inspected and torn down.

Everything a lab starts is written to its state file (``run/lab.json``, 0600)
the moment it exists, so ``down`` can always find and remove it: after a
failure, after Ctrl-C, or from another process after a crash. One lock file
keeps two socklab commands from changing the same lab at once, another one
serializes the commands that drive its guests.

One checkout runs several labs side by side, one per lab name (``--name``,
default ``default``): each has its own state, lock, netns, taps and ports, and
its QEMUs are recognised by their ``-uuid`` (``harness/vm/owner.py``), so no
lab's ``down`` or cleanup ever touches another lab's processes.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from harness.host import accel as accel_mod
from harness import progress
from harness.host import deps as hostdeps
from harness.image import build as image
from harness.lab import lock
from harness.host import net
from harness.vm import owner
from harness.vm import qemu
from harness.vm import vmstate as snapshot
from harness.image import kernel as kernel_mod
from harness import load as textio
from harness.vm.console import GuestConsole, log_tail, panic_lines
from harness.deadline import QMP_PROBE, SNAPSHOT_RESTORE, SSH_CONNECT
from harness.errors import GuestUnreachable, LabError, SSHError
from harness.paths import DEFAULT_LAB, Paths
from harness.guest.ssh import GuestSSH

STATE_VERSION = 1
# A resumed guest answers within a second or two; past this the snapshot is broken.
RESTORE_TIMEOUT = SNAPSHOT_RESTORE
# Console logs of earlier labs kept in home/logs, per VM, beside the latest.
KEPT_LOGS = 5
SEGMENT_MODES = ("auto", "tap", "socket")


@dataclass(frozen=True)
class Topology:
    """Which VMs a lab has; the n-th VM gets 198.51.100.n on the lab segment.

    ``kernels`` pins a VM to a kernel series or recipe (``("server", "7.2")``);
    a VM not named there boots the kernel ``lab.up --kernel`` chose.
    """

    name: str
    vms: tuple[str, ...]
    memory_mib: int = 512
    kernels: tuple[tuple[str, str], ...] = ()

    def kernel_of(self, vm: str, default: str) -> str:
        return dict(self.kernels).get(vm, default)


TOPOLOGIES = {
    "default": Topology("default", ("client", "server")),
    "single": Topology("single", ("server",)),
    # An upgrade seen from both ends: an old client talking to a new server.
    "mixed": Topology("mixed", ("client", "server"), kernels=(("client", "6.1"), ("server", "7.2"))),
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
    # What it boots: the image entry (userland), the kernel's release, its host key.
    image: str = ""
    kernel: str = ""
    kernel_image: str = ""
    host_key: str = ""
    pid: int = 0
    overlay: str = ""
    qmp: str = ""
    console: str = ""
    console_log: str = ""
    # Who the QEMU is: its -uuid (set before it starts) and its start time in /proc (set right after).
    uuid: str = ""
    start_ticks: int = 0

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
    name: str = DEFAULT_LAB
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


def _check_field_types(state: LabState) -> None:
    """Every field of a loaded state has its declared type: ``down`` must not trip over a pid that is a string."""
    kinds = {"int": int, "str": str, "float": (int, float), "bool": bool}
    for record in [state, *state.vms]:
        for spec in fields(record):
            kind = kinds.get(str(spec.type))
            value = getattr(record, spec.name)
            if kind is not None and (not isinstance(value, kind) or (isinstance(value, bool) and kind is int)):
                raise ValueError(f"`{spec.name}` is {value!r}")
        if isinstance(record, LabState) and not all(isinstance(vm, VMState) for vm in record.vms):
            raise ValueError("`vms` is not a list of VMs")


def lab_key(paths: Paths, name: str = DEFAULT_LAB) -> str:
    """8 hex digits, stable per install and lab name; the first 6 name the netns and taps, all 8 start VM UUIDs.

    The lab named ``default`` keeps the key of a home alone, so its netns and
    taps are named as before lab names existed.
    """
    where = str(paths.home.resolve()) + ("" if name == DEFAULT_LAB else f"\0{name}")
    return hashlib.sha256(where.encode()).hexdigest()[:8]


def lab_id(paths: Paths, name: str = DEFAULT_LAB) -> str:
    """Short, stable per install and lab name: names the netns and taps so two labs never collide."""
    return lab_key(paths, name)[:6]


def lab_names(paths: Paths) -> list[str]:
    """The names of the labs this install has state for (running or not cleaned up)."""
    names = [DEFAULT_LAB] if (paths.run / "lab.json").exists() else []
    labs = paths.home / "labs"
    if labs.is_dir():
        names += sorted(entry.name for entry in labs.iterdir() if (entry / "run" / "lab.json").exists())
    return names


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
        self._boots: dict[str, kernel_mod.Boot] = {}

    # -- state ---------------------------------------------------------------

    def load(self) -> LabState | None:
        """The lab's state, None when no lab runs; a damaged state file is a LabError naming it."""
        if not self.state_file.exists() and not self.state_file.is_symlink():
            return None
        try:
            text = textio.read_text(self.state_file, "lab state", error=LabError)
            if not text.strip():
                raise ValueError("the file is empty")
            data = json.loads(text)
            if not isinstance(data, dict):
                raise ValueError(f"it holds {textio.describe_type(data) if data is not None else 'null'}, "
                                 "not the lab's record")
            state = LabState.from_json(text)
            _check_field_types(state)
            return state
        except LabError as exc:
            message = str(exc)
            reason = message[len(str(self.state_file)):].lstrip(":0123456789 ") if message.startswith(
                str(self.state_file)) else message
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            reason = " ".join(str(exc).split()) or type(exc).__name__
        raise LabError(f"{self.state_file}: unreadable lab state ({reason}); run `invoke lab.down` to clear it")

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
        """Why ``vm``'s guest does not run although its QEMU is alive (SIGSTOP, QMP ``stop``); None if it runs."""
        if owner.stopped(vm.pid):
            return (f"QEMU of {vm.name} (pid {vm.pid}) is stopped (process state T: SIGSTOP or SIGTSTP); "
                    f"`kill -CONT {vm.pid}` resumes it, `invoke lab.down{self._name_flag()}` removes the lab")
        if not vm.qmp:
            return None
        try:
            status = qemu.qmp_command(Path(vm.qmp), "query-status", timeout=QMP_PROBE)
        except Exception:  # noqa: BLE001 - a monitor that does not answer says nothing about the guest
            return None
        run_state = status.get("status") if isinstance(status, dict) else None
        if run_state in (None, "running", "inmigrate", "prelaunch"):
            return None
        return (f"the guest {vm.name} is not running: QMP says {run_state!r} (paused with `stop`, or left so by an "
                f"interrupted snapshot save); `invoke lab.down{self._name_flag()}` and `lab.up` give a fresh lab")

    def guest_paused(self, name: str) -> str | None:
        """``paused`` for VM ``name`` of the running lab; None when it runs or the lab is gone."""
        try:
            state = self.load()
            return self.paused(state.vm(name)) if state is not None else None
        except LabError:
            return None

    def _name_flag(self) -> str:
        return "" if self.name == DEFAULT_LAB else f" --name {self.name}"

    # -- what went wrong -----------------------------------------------------

    def vm_fault(self, name: str, settle: float = 3.0) -> str | None:
        """Why VM ``name`` cannot be used, as a sentence for an error message; None if its QEMU runs and SSH works.

        Called after a step, an SSH command or an agent failed: it tells a
        QEMU that died (killed, crashed) from a guest kernel that panicked
        (its QEMU exits after printing the panic: ``panic=-1``, ``-no-reboot``)
        from an sshd that is gone while the guest still runs.
        """
        state = self.load()
        if state is None:
            return f"{name}: the lab is gone (no {self.state_file}; was `invoke lab.down` run meanwhile?)"
        try:
            vm = state.vm(name)
        except LabError as exc:
            return str(exc)
        log = Path(vm.console_log) if vm.console_log else self.run_dir / f"{name}.console.log"
        running = self.owned(vm)
        panic = panic_lines(log) if log.exists() else None
        # A panicking guest's QEMU exits once the panic is printed; wait a moment for it.
        deadline = time.monotonic() + settle
        while running and panic is not None and time.monotonic() < deadline:
            time.sleep(0.05)
            running = self.owned(vm)
        where = f"console log {log} (moved to {self.logs} by `invoke lab.down`)"
        if panic is not None:
            how = "is still stopping" if running else "exited"
            return (f"the kernel of {name} panicked; its QEMU (pid {vm.pid}) {how}. Panic on the console:\n"
                    f"{panic}\n{where}")
        if not running:
            tail = log_tail(log, 8)
            shown = f"Console's last lines:\n{tail}" if not tail.startswith("(") else f"Console: {tail}."
            return f"QEMU of {name} (pid {vm.pid}) exited: the VM is gone (killed, or QEMU crashed). {shown}\n{where}"
        paused = self.paused(vm)
        if paused:
            return paused
        guest = self._ssh.get(name)
        if guest is not None:
            try:
                guest.client  # raises when the connection is gone
                return None
            except SSHError:
                pass
        banner = _ssh_banner(vm.ssh_port)
        if banner:
            return (f"the SSH connection to {name} is gone, but its QEMU (pid {vm.pid}) runs and sshd answers again "
                    f"on 127.0.0.1:{vm.ssh_port} ({banner}): sshd was restarted, or the connection was cut")
        return (f"SSH to {name} is gone: its QEMU (pid {vm.pid}) runs, but no sshd answers on 127.0.0.1:{vm.ssh_port} "
                f"(sshd killed or hung?); the console still reaches the guest: `invoke lab.console {name}`")

    def segment_faults(self, probe_timeout: float = 2.0) -> list[str]:
        """What is wrong with the lab segment, one sentence per fault naming the VM; [] if it carries traffic.

        Looks at each guest's ``lab0`` (administratively up, carrier, its
        address), at each VM's tap on the host bridge (tap mode), and, when
        all of that is fine, whether the first VM reaches the others' port 22.
        """
        state = self.require()
        faults = []
        for vm in state.vms:
            try:
                out = self.ssh(vm.name, timeout=10).run(
                    "cat /sys/class/net/lab0/flags /sys/class/net/lab0/operstate; ip -o -4 addr show dev lab0",
                    timeout=10).stdout.split("\n", 2)
            except LabError as exc:
                faults.append(f"cannot look at lab0 on {vm.name}: {exc}")
                continue
            flags, operstate, addresses = (out + ["", "", ""])[:3]
            try:
                up = int(flags.strip(), 16) & 0x1  # IFF_UP
            except ValueError:
                faults.append(f"{vm.name} has no lab0 (`ip link` shows none)")
                continue
            if not up:
                faults.append(f"lab0 on {vm.name} is DOWN (set down inside the guest; "
                              f"`invoke lab.exec {vm.name} -- ip link set lab0 up` brings it back)")
            elif operstate.strip() != "up":
                faults.append(f"lab0 on {vm.name} is up but has no carrier (operstate {operstate.strip()}): "
                              "its host side is down")
            if f" {vm.lab_ip} " not in addresses:
                faults.append(f"lab0 on {vm.name} lacks its address {vm.lab_ip}")
        if state.segment == "tap" and state.netns:
            for vm in state.vms:
                fault = _tap_fault(state.netns, vm)
                if fault:
                    faults.append(fault)
        if not faults and len(state.vms) > 1:
            first = state.vms[0]
            probes = " ; ".join(f"timeout {probe_timeout:g} bash -c '</dev/tcp/{peer.address}/22' 2>/dev/null "
                                f"|| echo {peer.name}"
                                for peer in state.vms[1:])
            try:
                unreached = self.ssh(first.name, timeout=10).run(probes, timeout=10 + probe_timeout * len(state.vms))
            except LabError as exc:
                return [f"cannot probe the lab segment from {first.name}: {exc}"]
            for name in unreached.stdout.split():
                peer = state.vm(name)
                faults.append(f"{first.name} cannot reach {name} ({peer.address}) over the lab segment within "
                              f"{probe_timeout:g} s, although every lab0 is up")
        return faults

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

    def up(self, topology_name: str = "default", accel: str = "auto", segment: str = "auto",
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
            state = LabState(lab_id=self.id, topology=topo.name, name=self.name, image=str(first.image.directory),
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
        stores = {spec.name: snapshot.SnapshotStore(boots[spec.name].image.directory) for spec in plan}
        keys = {spec.name: snapshot.snapshot_key({**boots[spec.name].image.sha256, **boots[spec.name].sha256}, spec,
                                                 snapshot.qemu_version()) for spec in plan}
        for store in {str(store.root): store for store in stores.values()}.values():
            for leftover in store.remove_interrupted():
                progress.say(f"removed a half-saved snapshot {leftover.name} (its socklab was killed while saving it)")
        snapshots = {} if cold else self._usable_snapshots(stores, keys)
        if snapshots:
            try:
                self._boot(state, topo, plan, snapshots, time.monotonic() + RESTORE_TIMEOUT)
                self._after_restore(state)
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
        state.ready = True
        self.save(state)

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

    def _plan(self, state: LabState, topo: Topology, boots: dict[str, kernel_mod.Boot]) -> list[qemu.VMSpec]:
        """Each VM's spec, without the host-side details (ports, sockets) a boot fills in."""
        specs = []
        for index, name in enumerate(topo.vms):
            boot = boots[name]
            lab_nic = qemu.LabNic(mode=state.segment, mac=net.mac_address(0x5A, index),
                                  ifname=f"sl{self.id}{index}" if state.segment == "tap" else "")
            specs.append(qemu.VMSpec(
                name=name, run_dir=self.run_dir, kernel=boot.kernel, initrd=boot.initrd,
                overlay=self.run_dir / f"{name}.qcow2", ssh_port=0, mgmt_mac=net.mac_address(0, index),
                lab_ip=net.lab_address(index), lab_nic=lab_nic, accel=state.accel, memory_mib=topo.memory_mib,
                sandbox=True,
                modules_disk=boot.modules_disk,
            ))
        self._boots = boots
        return specs

    def _usable_snapshots(self, stores: dict[str, snapshot.SnapshotStore],
                          keys: dict[str, str]) -> dict[str, snapshot.Snapshot]:
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
                boot = self._boots[spec.name]
                vm = VMState(name=spec.name, index=index, ssh_port=0, lab_ip=spec.lab_ip, mgmt_mac=spec.mgmt_mac,
                             lab_mac=spec.lab_nic.mac, tap=spec.lab_nic.ifname, overlay=str(spec.overlay),
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
            for vm in state.vms if snapshots else ():
                qemu.resume_incoming(Path(vm.qmp))
        with progress.step(f"wait for SSH on {', '.join(topo.vms)}") as step:
            self._wait_ssh(state, deadline, step)
        state.boot_seconds = round(time.monotonic() - started, 2)

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

            try:
                self._in_parallel(fix, state.vms, threading.Event())
            except SSHError as exc:
                raise LabError(f"restored guests cannot reach each other: {exc}") from exc

    def _save_snapshots(self, state: LabState, stores: dict[str, snapshot.SnapshotStore],
                        keys: dict[str, str]) -> None:
        """Save every VM's ready state for the next ``lab.up``; a failure only costs the next boot its speed."""
        with progress.step("save ready snapshots for the next lab.up") as step:
            self.close()  # no half-open SSH connections inside the saved state
            try:
                for vm in state.vms:
                    step.update(f"saving {vm.name}")
                    stores[vm.name].save(keys[vm.name], Path(vm.qmp), Path(vm.overlay))
                    qemu.qmp_command(Path(vm.qmp), "cont")
            except (LabError, OSError) as exc:
                for vm in state.vms:
                    try:
                        qemu.qmp_command(Path(vm.qmp), "cont")
                    except Exception:  # noqa: BLE001 - resuming what we paused is best effort here
                        pass
                progress.say(f"[yellow]warning:[/] could not save snapshots ({exc}); the next lab.up boots cold")

    def _wait_ssh(self, state: LabState, deadline: float, step: progress.Step) -> None:
        abandon = threading.Event()

        def connect(vm: VMState) -> None:
            remaining = deadline - time.monotonic()
            guest = GuestSSH(vm.name, vm.ssh_port, self.paths.client_key, vm.host_key or state.host_key)
            try:
                self._connect_watching(guest, vm, remaining, abandon)
            except SSHError as exc:
                raise GuestUnreachable(f"{vm.name} never became reachable over SSH ({exc}); "
                                       f"console's last lines:\n{log_tail(Path(vm.console_log))}") from exc
            # The lab may be being stopped meanwhile (Ctrl-C, another VM failed): no connection may outlive it.
            if not abandon.is_set():
                self._ssh[vm.name] = guest
            if abandon.is_set():
                if self._ssh.get(vm.name) is guest:
                    del self._ssh[vm.name]
                guest.close()

        self._in_parallel(connect, state.vms, abandon)
        step.update("all guests answer")

    @staticmethod
    def _in_parallel(work, vms: list[VMState], abandon: threading.Event) -> None:
        """``work(vm)`` for every VM at once; the first error (or Ctrl-C) goes up without waiting for the rest.

        Waiting would keep a Ctrl-C from stopping anything until every guest
        had answered or timed out: the other threads are told to give up
        (``abandon``) and end by themselves once ``up`` has stopped the VMs.
        """
        pool = ThreadPoolExecutor(max_workers=len(vms), thread_name_prefix="socklab-up")
        try:
            for future in [pool.submit(work, vm) for vm in vms]:
                future.result()
        except BaseException:
            abandon.set()
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown()

    def _connect_watching(self, guest: GuestSSH, vm: VMState, timeout: float,
                          abandon: threading.Event | None = None) -> None:
        """Connect while checking QEMU is still alive, so a crashed guest fails fast, not at the deadline."""
        deadline = time.monotonic() + timeout
        abandon = abandon or threading.Event()
        while True:
            if abandon.is_set():
                raise SSHError(f"{vm.name}: gave up waiting for SSH (lab.up was interrupted or failed)")
            if not self.owned(vm):
                raise SSHError(f"QEMU of {vm.name} (pid {vm.pid}) exited")
            try:
                guest.connect(timeout=min(2.0, max(0.5, deadline - time.monotonic())))
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
                guest.client  # raises when the connection is gone: sshd restarted, the guest rebooted
                self._ssh[name] = guest
                return guest
            except SSHError:
                pass
        if guest is not None:  # broken, or to a VM of an earlier lab
            guest.close()  # also closes the stats shell kept on the connection
        if not self.owned(vm):
            raise GuestUnreachable(self.vm_fault(name, settle=0) or f"QEMU of {name} (pid {vm.pid}) is not running")
        paused = self.paused(vm)
        if paused:
            raise GuestUnreachable(paused)
        guest = GuestSSH(vm.name, vm.ssh_port, self.paths.client_key, vm.host_key or state.host_key)
        try:
            self._connect_watching(guest, vm, timeout)
        except SSHError as exc:
            fault = self.vm_fault(name)
            raise GuestUnreachable(f"{exc}" + (f"\n{fault}" if fault else "")) from exc
        self._ssh[name] = guest
        return guest

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
                                    alive=lambda vm=vm: self.owned(vm))
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
                _keep_log(log, logs)
            shutil.rmtree(self.run_dir)
            done.append("state, overlays and sockets: removed")
        if not quiet:
            for line in done:
                progress.say(line)
        return done


def _ssh_banner(port: int, timeout: float = 2.0) -> str | None:
    """The SSH banner on 127.0.0.1:``port`` (QEMU's forward to the guest's sshd), or None if none comes."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            data = sock.recv(256)
    except OSError:
        return None
    line = data.split(b"\n", 1)[0].strip().decode(errors="replace")
    return line if line.startswith("SSH-") else None


def _keep_log(log: Path, logs: Path, kept: int = KEPT_LOGS) -> None:
    """Move a console log into ``logs``; earlier ones become ``NAME.1`` (newest) to ``NAME.<kept>``.

    A log the guest wrote nothing to (a restored guest that printed nothing)
    is dropped, so it never pushes out one that shows a panic.
    """
    target = logs / log.name
    try:
        empty = log.stat().st_size == 0
    except OSError:
        return
    if empty and target.exists():
        log.unlink(missing_ok=True)
        return
    if target.exists() and target.stat().st_size > 0:
        for index in range(kept - 1, 0, -1):
            older = logs / f"{log.name}.{index}"
            if older.exists():
                older.replace(logs / f"{log.name}.{index + 1}")
        target.replace(logs / f"{log.name}.1")
    shutil.move(str(log), target)


def _tap_fault(netns: str, vm: VMState) -> str | None:
    """What is wrong with ``vm``'s tap on the lab bridge, seen from the host; None if it is up and attached."""
    if not vm.tap:
        return None
    result = net._run_ip(["ip", "-n", netns, "-o", "link", "show", "dev", vm.tap])
    if result.returncode != 0:
        return f"the tap {vm.tap} of {vm.name} is not on the lab bridge in netns {netns}"
    line = result.stdout
    if f"master {net.BRIDGE}" not in line:
        return f"the tap {vm.tap} of {vm.name} is not attached to the bridge {net.BRIDGE} in netns {netns}"
    if ",UP" not in line and "<UP" not in line:
        return f"the tap {vm.tap} of {vm.name} is DOWN on the host (netns {netns})"
    return None


