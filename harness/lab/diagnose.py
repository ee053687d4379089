"""What went wrong with a lab, as one sentence a user can act on.

Called after a step, an SSH command or an agent failed, these tell a QEMU that
died from a guest kernel that panicked, a guest that was paused or stopped, an
sshd that is gone while the guest runs, and a lab segment that carries no
traffic (a NIC set down, a tap off the bridge). They look; they never change
anything.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING

from harness.deadline import QMP_PROBE
from harness.errors import LabError, SSHError
from harness.host import net
from harness.lab.state import VMState
from harness.vm import owner, qemu
from harness.vm.console import log_tail, panic_lines

if TYPE_CHECKING:  # the Lab calls down into this module and passes itself
    from harness.lab.lifecycle import Lab


def paused(lab: Lab, vm: VMState) -> str | None:
    """Why ``vm``'s guest does not run although its QEMU is alive (SIGSTOP, QMP ``stop``); None if it runs."""
    if owner.stopped(vm.pid):
        return (f"QEMU of {vm.name} (pid {vm.pid}) is stopped (process state T: SIGSTOP or SIGTSTP); "
                f"`kill -CONT {vm.pid}` resumes it, `invoke lab.down{lab.name_flag()}` removes the lab")
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
            f"interrupted snapshot save); `invoke lab.down{lab.name_flag()}` and `lab.up` give a fresh lab")


def vm_fault(lab: Lab, name: str, settle: float = 3.0) -> str | None:
    """Why VM ``name`` cannot be used, as a sentence for an error message; None if its QEMU runs and SSH works.

    Called after a step, an SSH command or an agent failed: it tells a
    QEMU that died (killed, crashed) from a guest kernel that panicked
    (its QEMU exits after printing the panic: ``panic=-1``, ``-no-reboot``)
    from an sshd that is gone while the guest still runs.
    """
    state = lab.load()
    if state is None:
        return f"{name}: the lab is gone (no {lab.state_file}; was `invoke lab.down` run meanwhile?)"
    try:
        vm = state.vm(name)
    except LabError as exc:
        return str(exc)
    log = Path(vm.console_log) if vm.console_log else lab.run_dir / f"{name}.console.log"
    running = lab.owned(vm)
    panic = panic_lines(log) if log.exists() else None
    # A panicking guest's QEMU exits once the panic is printed; wait a moment for it.
    deadline = time.monotonic() + settle
    while running and panic is not None and time.monotonic() < deadline:
        time.sleep(0.05)
        running = lab.owned(vm)
    where = f"console log {log} (moved to {lab.logs} by `invoke lab.down`)"
    if panic is not None:
        how = "is still stopping" if running else "exited"
        return (f"the kernel of {name} panicked; its QEMU (pid {vm.pid}) {how}. Panic on the console:\n"
                f"{panic}\n{where}")
    if not running:
        tail = log_tail(log, 8)
        shown = f"Console's last lines:\n{tail}" if not tail.startswith("(") else f"Console: {tail}."
        return f"QEMU of {name} (pid {vm.pid}) exited: the VM is gone (killed, or QEMU crashed). {shown}\n{where}"
    why_paused = paused(lab, vm)
    if why_paused:
        return why_paused
    guest = lab.kept_connection(name)
    if guest is not None:
        try:
            guest.client  # noqa: B018 - raises when the connection is gone
            return None
        except SSHError:
            pass
    banner = ssh_banner(vm.ssh_port)
    if banner and guest is None and not lab.lost_connection(name):
        return None  # no connection of ours broke (a restored lab is not logged in to), and sshd answers
    if banner:
        return (f"the SSH connection to {name} is gone, but its QEMU (pid {vm.pid}) runs and sshd answers again "
                f"on 127.0.0.1:{vm.ssh_port} ({banner}): sshd was restarted, or the connection was cut")
    return (f"SSH to {name} is gone: its QEMU (pid {vm.pid}) runs, but no sshd answers on 127.0.0.1:{vm.ssh_port} "
            f"(sshd killed or hung?); the console still reaches the guest: `invoke lab.console {name}`")

def segment_faults(lab: Lab, probe_timeout: float = 2.0) -> list[str]:
    """What is wrong with the lab segment, one sentence per fault naming the VM; [] if it carries traffic.

    Looks at each guest's ``lab0`` (administratively up, carrier, its
    address), at each VM's tap on the host bridge (tap mode), and, when
    all of that is fine, whether the first VM reaches the others' port 22.
    """
    state = lab.require()
    faults = []
    for vm in state.vms:
        try:
            out = lab.ssh(vm.name, timeout=10).run(
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
            fault = tap_fault(state.netns, vm)
            if fault:
                faults.append(fault)
    if not faults and len(state.vms) > 1:
        first = state.vms[0]
        probes = " ; ".join(f"timeout {probe_timeout:g} bash -c '</dev/tcp/{peer.address}/22' 2>/dev/null "
                            f"|| echo {peer.name}"
                            for peer in state.vms[1:])
        try:
            unreached = lab.ssh(first.name, timeout=10).run(probes, timeout=10 + probe_timeout * len(state.vms))
        except LabError as exc:
            return [f"cannot probe the lab segment from {first.name}: {exc}"]
        for name in unreached.stdout.split():
            peer = state.vm(name)
            faults.append(f"{first.name} cannot reach {name} ({peer.address}) over the lab segment within "
                          f"{probe_timeout:g} s, although every lab0 is up")
    return faults


def ssh_banner(port: int, timeout: float = 2.0) -> str | None:
    """The SSH banner on 127.0.0.1:``port`` (QEMU's forward to the guest's sshd), or None if none comes."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            data = sock.recv(256)
    except OSError:
        return None
    line = data.split(b"\n", 1)[0].strip().decode(errors="replace")
    return line if line.startswith("SSH-") else None


def tap_fault(netns: str, vm: VMState) -> str | None:
    """What is wrong with ``vm``'s tap on the lab bridge, seen from the host; None if it is up and attached."""
    if not vm.tap:
        return None
    result = net.run_ip(["ip", "-n", netns, "-o", "link", "show", "dev", vm.tap])
    if result.returncode != 0:
        return f"the tap {vm.tap} of {vm.name} is not on the lab bridge in netns {netns}"
    line = result.stdout
    if f"master {net.BRIDGE}" not in line:
        return f"the tap {vm.tap} of {vm.name} is not attached to the bridge {net.BRIDGE} in netns {netns}"
    if ",UP" not in line and "<UP" not in line:
        return f"the tap {vm.tap} of {vm.name} is DOWN on the host (netns {netns})"
    return None
