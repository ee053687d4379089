"""Boot and stop one QEMU guest: its command line, its process, its QMP monitor."""

from __future__ import annotations

import logging
import os
import shlex
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.deadline import QEMU_START, QEMU_STOP, QMP_CALL, QMP_CONNECT, SNAPSHOT_RESTORE, SNAPSHOT_SAVE
from harness.errors import LabError
from harness.log import truncate
from harness.vm.owner import stopped

QEMU = "qemu-system-x86_64"

# qemu.qmp logs a refused or wedged monitor at ERROR level; ``stop`` handles both, and the
# command line drops those records unless --debug is on (harness/log.py).
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LabNic:
    """How the VM's lab-segment NIC is backed on the host.

    ``mode`` is ``tap`` (QEMU creates tap ``ifname`` with a virtio-net header, so
    the guest gets scatter-gather and checksum offload) or ``socket`` (a
    point-to-point QEMU socket netdev over 127.0.0.1: no offloads, no root).
    """

    mode: str
    mac: str
    ifname: str = ""
    listen_port: int = 0
    connect_port: int = 0

    def netdev(self) -> str:
        if self.mode == "tap":
            return f"tap,id=lab,ifname={self.ifname},script=no,downscript=no,vnet_hdr=on"
        if self.mode == "socket" and self.listen_port:
            return f"socket,id=lab,listen=127.0.0.1:{self.listen_port}"
        if self.mode == "socket" and self.connect_port:
            return f"socket,id=lab,connect=127.0.0.1:{self.connect_port}"
        raise ValueError(f"lab NIC mode {self.mode!r} needs an ifname or a port")


@dataclass(frozen=True)
class VMSpec:
    """Everything that decides how one guest is started."""

    name: str
    run_dir: Path
    kernel: Path
    initrd: Path
    overlay: Path
    ssh_port: int
    mgmt_mac: str
    lab_ip: str
    lab_nic: LabNic | None
    accel: str = "tcg"
    memory_mib: int = 512
    cpus: int = 1
    extra_append: tuple[str, ...] = field(default=())
    # A migration stream to resume from instead of booting (a ready snapshot).
    incoming: Path | None = None
    # Unique per VM and boot: what tells this QEMU from every other one (harness/vm/owner.py).
    uuid: str = ""
    # seccomp (-sandbox): see SANDBOX.
    sandbox: bool = False
    # A read-only ext4 disk with a user-built kernel's module tree (--kernel-image --modules).
    modules_disk: Path | None = None

    @property
    def qmp_socket(self) -> Path:
        return self.run_dir / f"{self.name}.qmp"

    @property
    def console_socket(self) -> Path:
        return self.run_dir / f"{self.name}.console"

    @property
    def console_log(self) -> Path:
        return self.run_dir / f"{self.name}.console.log"

    @property
    def wake_socket(self) -> Path:
        """The guest's second serial port (ttyS1), where lab.up wakes a restored guest (lifecycle.wake_line)."""
        return self.run_dir / f"{self.name}.wake"

    @property
    def pidfile(self) -> Path:
        return self.run_dir / f"{self.name}.pid"

    def kernel_append(self) -> str:
        params = [
            "console=ttyS0",
            "root=/dev/vda",
            "rw",
            "quiet",
            # A panic ends QEMU (with -no-reboot) so a crashed guest is noticed at once.
            "panic=-1",
            # TCG re-translates a program's code whenever it lands at new addresses;
            # with fixed mappings every exec (ss, python3, sshd's children) is about
            # twice as fast. The labs do not depend on address randomisation.
            "norandmaps",
            # Boot-time trims, measured with initcall_debug under TCG (docs/performance.md): the crypto
            # self-tests (crypto_algapi_init, about 0.2 s) and the ACPI _PRS/_SRS evaluation of an
            # interrupt link per PCI device (about 0.1 s each, three of them; the PIR table serves).
            "cryptomgr.notests",
            "acpi=noirq",
            f"socklab.name={self.name}",
            f"socklab.mgmt_mac={self.mgmt_mac}",
        ]
        if self.lab_nic is not None:
            params += [f"socklab.lab_mac={self.lab_nic.mac}", f"socklab.lab_ip={self.lab_ip}"]
        if self.modules_disk is not None:
            params.append("socklab.modules_disk=1")
        return " ".join([*params, *self.extra_append])


# seccomp: no obsolete syscalls, no changing scheduling or CPU affinity. `spawn=deny` would also forbid the
# fork of -daemonize, and `elevateprivileges=deny` its setsid(), so both stay allowed (docs/security.md).
SANDBOX = "on,obsolete=deny,resourcecontrol=deny"


# No default devices, no config files, no display, and QEMU ends when the guest would reboot (a panic).
BASE_ARGS = ("-nodefaults", "-no-user-config", "-display", "none", "-no-reboot")


def cpu_model(accel: str) -> str:
    # qemu64 has no RDRAND, so sshd sat ~2.5 s in getrandom() waiting for the
    # crng; with RDRAND (emulated by TCG) the kernel seeds it at once.
    return "host" if accel == "kvm" else "qemu64,+rdrand"


def machine_args(accel: str, memory_mib: int, cpus: int) -> list[str]:
    """A lab VM's shape: accelerator, CPU model, memory and vCPUs (the bench gives its floor and peer the same)."""
    return ["-accel", accel, "-cpu", cpu_model(accel), "-m", str(memory_mib), "-smp", str(cpus)]


def qemu_argv(spec: VMSpec, incoming_fd: int | None = None) -> list[str]:
    """The QEMU command line for ``spec``: no default devices, only what a lab VM uses.

    A snapshot is loaded from ``incoming_fd``, a descriptor socklab opened and
    QEMU inherits, so QEMU spawns no helper to read it.
    """
    argv = [
        QEMU,
        "-name", f"socklab-{spec.name},process=socklab-{spec.name}",
        *(["-uuid", spec.uuid] if spec.uuid else []),
        *BASE_ARGS,
        *machine_args(spec.accel, spec.memory_mib, spec.cpus),
        "-kernel", str(spec.kernel),
        "-initrd", str(spec.initrd),
        "-append", spec.kernel_append(),
        "-drive", f"file={spec.overlay},if=virtio,format=qcow2,discard=unmap",
        *(["-drive", f"file={spec.modules_disk},if=virtio,format=raw,readonly=on"] if spec.modules_disk else []),
        # Management NIC: user networking sealed with restrict=on; the only way in
        # is the SSH forward, and it listens on the host's loopback alone.
        "-netdev", f"user,id=mgmt,restrict=on,hostfwd=tcp:127.0.0.1:{spec.ssh_port}-:22",
        "-device", f"virtio-net-pci,netdev=mgmt,mac={spec.mgmt_mac}",
    ]
    if spec.lab_nic is not None:
        argv += ["-netdev", spec.lab_nic.netdev(), "-device", f"virtio-net-pci,netdev=lab,mac={spec.lab_nic.mac}"]
    argv += [
        "-chardev", f"socket,id=console,path={spec.console_socket},server=on,wait=off,logfile={spec.console_log}",
        "-serial", "chardev:console",
        "-chardev", f"socket,id=wake,path={spec.wake_socket},server=on,wait=off",
        "-serial", "chardev:wake",
        "-chardev", f"socket,id=qmp,path={spec.qmp_socket},server=on,wait=off",
        "-mon", "chardev=qmp,mode=control",
        "-pidfile", str(spec.pidfile),
        "-daemonize",
    ]
    if spec.sandbox:
        argv += ["-sandbox", SANDBOX]
    if spec.incoming is not None:
        argv += ["-incoming", f"fd:{incoming_fd}" if incoming_fd is not None
                 else f"exec:cat {shlex.quote(str(spec.incoming))}"]
    return argv


def create_overlay(base: Path, overlay: Path, base_format: str = "raw") -> None:
    """A qcow2 overlay backed by the read-only ``base``: the guest writes only here."""
    result = subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-F", base_format, "-b", str(base), str(overlay)],
        stdin=subprocess.DEVNULL, capture_output=True, text=True,
    )
    if result.returncode != 0:
        raise LabError(f"qemu-img could not create {overlay.name}: {result.stderr.strip()}")
    overlay.chmod(0o600)


def start(spec: VMSpec, popen: Callable[..., Any] = subprocess.Popen) -> int:
    """Start QEMU daemonized and return its pid.

    QEMU forks into the background only once its devices are set up, so a bad
    argument, a busy port or a tap it cannot open is reported here, by name.
    """
    for stale in (spec.pidfile, spec.qmp_socket, spec.console_socket, spec.wake_socket):
        stale.unlink(missing_ok=True)
    incoming_fd = os.open(spec.incoming, os.O_RDONLY | os.O_CLOEXEC) if spec.incoming is not None else None
    argv = qemu_argv(spec, incoming_fd)
    log.debug("%s: %s", spec.name, shlex.join(argv))
    started = time.monotonic()
    try:
        proc = popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                     stderr=subprocess.PIPE, text=True, pass_fds=() if incoming_fd is None else (incoming_fd,))
        _out, err = proc.communicate(timeout=QEMU_START)
    finally:
        if incoming_fd is not None:
            os.close(incoming_fd)
    log.debug("%s: QEMU daemonized in %.3f s (exit %s)", spec.name, time.monotonic() - started, proc.returncode)
    if proc.returncode != 0:
        message = " ".join(line for line in err.strip().splitlines() if line)[-400:]
        raise LabError(f"QEMU for {spec.name} did not start: {message or f'exit {proc.returncode}'}")
    pid = read_pid(spec.pidfile)
    if pid is None:
        raise LabError(f"QEMU for {spec.name} started but wrote no pid file {spec.pidfile}")
    return pid


def read_pid(pidfile: Path) -> int | None:
    try:
        return int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return None


def is_running(pid: int, name: str | None = None) -> bool:
    """Whether ``pid`` is alive and (if ``name`` is given) still our QEMU, not a recycled pid."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        if b"State:\tZ" in Path(f"/proc/{pid}/status").read_bytes():
            return False
    except OSError:
        return False
    return name is None or f"socklab-{name},".encode() in cmdline


def qmp_command(socket_path: Path, command: str, timeout: float = QMP_CALL, **arguments: Any) -> object:
    """Send one QMP command and return its result; every wait is bounded by ``timeout``.

    A wedged QEMU must not hang ``lab.down``: qemu.qmp's connect has no timeout
    of its own, so each await here gets one.
    """
    import asyncio

    from qemu.qmp import QMPClient

    async def exchange() -> object:
        client = QMPClient("socklab")
        try:
            await asyncio.wait_for(client.connect(str(socket_path)), timeout)
            return await asyncio.wait_for(client.execute(command, arguments or None), timeout)
        finally:
            await asyncio.wait_for(client.disconnect(), timeout)

    log.debug("QMP %s: %s %s", socket_path.name, command, truncate(arguments) if arguments else "")
    started = time.monotonic()
    reply = asyncio.run(exchange())
    log.debug("QMP %s: %s -> %s in %.3f s", socket_path.name, command, truncate(reply), time.monotonic() - started)
    return reply


def migrate_to_file(socket_path: Path, target: Path, timeout: float = SNAPSHOT_SAVE) -> None:
    """Pause the guest, write its whole state to ``target``, and leave it paused.

    The caller copies the disk overlay while the guest is paused (``stop``
    drains and flushes every block device), then resumes it with ``cont``.
    """
    import asyncio

    from qemu.qmp import ExecuteError, QMPClient

    async def exchange() -> None:
        try:
            await save()
        except ExecuteError as exc:
            raise LabError(f"saving the guest state failed: {exc}") from exc
        except TimeoutError as exc:
            raise LabError(f"QEMU's monitor did not answer within {QMP_CALL:g} s while saving") from exc

    async def save() -> None:
        client = QMPClient("socklab-snapshot")
        await asyncio.wait_for(client.connect(str(socket_path)), QMP_CONNECT)

        async def call(command: str, arguments: dict | None = None) -> Any:  # QMP's JSON reply
            return await asyncio.wait_for(client.execute(command, arguments), QMP_CALL)

        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            await call("stop")
            # The default 128 MiB/s cap would make a paused guest's save crawl.
            await call("migrate-set-parameters", {"max-bandwidth": 8 << 30})
            # The file is opened here and handed over (SCM_RIGHTS): QEMU spawns no `cat` to write it.
            client.send_fd_scm(fd)
            await call("getfd", {"fdname": "snapshot"})
            await call("migrate", {"uri": "fd:snapshot"})
            ends = time.monotonic() + timeout
            while True:
                status = await call("query-migrate")
                state = status.get("status")
                if state == "completed":
                    return
                if state in ("failed", "cancelled"):
                    raise LabError(f"saving the guest state failed: {status.get('error-desc', state)}")
                if time.monotonic() > ends:
                    raise LabError(f"saving the guest state took over {timeout:.0f} s")
                await asyncio.sleep(0.02)
        finally:
            os.close(fd)
            await asyncio.wait_for(client.disconnect(), QMP_CALL)

    asyncio.run(exchange())


def resume_incoming(socket_path: Path, timeout: float = SNAPSHOT_RESTORE) -> None:
    """Run a guest that QEMU is loading from a snapshot once the load is done.

    The snapshot was saved from a paused guest, and QEMU keeps an incoming guest
    in the state its source was in, so it has to be told to ``cont``.
    """
    import asyncio

    from qemu.qmp import ExecuteError, QMPClient

    async def exchange() -> None:
        client = QMPClient("socklab-resume")
        try:
            await resume(client)
        except ExecuteError as exc:
            raise LabError(f"the snapshot did not load: {exc}") from exc
        except TimeoutError as exc:
            raise LabError(f"QEMU's monitor did not answer within {QMP_CALL:g} s while resuming") from exc

    async def resume(client: Any) -> None:  # a qemu.qmp QMPClient (untyped)
        ends = time.monotonic() + timeout
        while True:  # the monitor socket appears as QEMU starts
            try:
                await asyncio.wait_for(client.connect(str(socket_path)), QMP_CONNECT)
                break
            except (TimeoutError, OSError):
                if time.monotonic() > ends:
                    raise LabError(f"no QMP monitor at {socket_path} to resume the snapshot") from None
                await asyncio.sleep(0.02)
        try:
            while True:
                status = (await asyncio.wait_for(client.execute("query-status"), QMP_CALL))["status"]
                if status == "running":
                    return
                if status in ("paused", "postmigrate"):
                    await asyncio.wait_for(client.execute("cont"), QMP_CALL)
                    return
                if status not in ("inmigrate", "prelaunch"):
                    raise LabError(f"the snapshot did not load: the guest is {status}")
                if time.monotonic() > ends:
                    raise LabError(f"loading the snapshot took over {timeout:.0f} s")
                await asyncio.sleep(0.02)
        finally:
            await asyncio.wait_for(client.disconnect(), QMP_CALL)

    asyncio.run(exchange())


def stop(name: str, pid: int, qmp_socket: Path, timeout: float = QEMU_STOP,
         alive: Callable[[], bool] | None = None) -> str:
    """Stop a guest: QMP ``quit`` first, SIGKILL if it lingers. Returns how it went.

    ``alive()`` tells whether ``pid`` is still this guest's QEMU (by default: by
    its ``-name``); nothing is signalled once it says no.
    """
    alive = alive or (lambda: is_running(pid, name))
    if not alive():
        return "not running"
    if stopped(pid):  # a SIGSTOPped QEMU answers no QMP; SIGKILL still ends it
        os.kill(pid, signal.SIGKILL)
        return "killed (it was stopped)"
    try:
        qmp_command(qmp_socket, "quit")
    except Exception:  # noqa: BLE001 - a dead or wedged monitor just means we go straight to SIGKILL
        pass
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            return "quit"
        time.sleep(0.05)
    if not alive():
        return "quit"
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return "quit"
    return "killed"
