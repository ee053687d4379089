"""Which VMs a lab has and how each is wired, read from a topology file.

A topology is a YAML file: the ones socklab ships are in ``harness/lab/topologies/``
(``default``, ``single``, ``mixed``, ``lossy``), and ``--topology`` (or a lab's
``lab.yaml``) may name any other file by path. Each VM has:

- ``name``: how tasks and scenarios call it (``client``);
- ``kernel``: a kernel series or recipe it always boots (``"7.2"``); without
  it, the VM boots what ``lab.up --kernel`` chose;
- ``memory_mib`` and ``cpus``;
- ``lab0``: its NIC on the lab segment: ``address`` (with prefix, inside
  198.51.100.0/24), and optionally ``mtu``, ``offloads`` (ethtool -K feature
  names, true or false), ``delay_ms`` and ``loss_percent`` (tc netem).

The address reaches the guest on its kernel command line; MTU, offloads and
netem are set in the guest once it answers on SSH, after a cold boot and after
a restore alike (``harness/lab/lifecycle.py``, ``Lab._configure_nics``).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness import load as textio
from harness.errors import LabError
from harness.host.net import LAB_NETWORK, lab_address

BUILTIN = Path(__file__).resolve().parent / "topologies"
# ethtool -K's short names for the features a lab NIC can toggle (virtio-net, Linux 6.1 and later).
OFFLOADS = ("rx", "tx", "sg", "tso", "gso", "gro", "lro", "rxhash", "rxvlan", "txvlan", "ntuple",
            "tx-checksum-ip-generic", "tx-tcp-segmentation", "tx-tcp6-segmentation", "tx-udp-segmentation")
_VM_KEYS = ("name", "kernel", "memory_mib", "cpus", "lab0")
_NIC_KEYS = ("address", "mtu", "offloads", "delay_ms", "loss_percent")


@dataclass(frozen=True)
class Nic:
    """A VM's NIC on the lab segment; ``None`` and ``()`` leave the guest's defaults."""

    address: str
    mtu: int | None = None
    offloads: tuple[tuple[str, bool], ...] = ()
    delay_ms: float = 0.0
    loss_percent: float = 0.0

    @property
    def ip(self) -> str:
        return self.address.split("/")[0]

    @property
    def tuned(self) -> bool:
        """Whether anything must be set in the guest after it boots."""
        return bool(self.mtu or self.offloads or self.delay_ms or self.loss_percent)

    def guest_commands(self, dev: str = "lab0") -> list[str]:
        """The shell commands that make the guest's ``dev`` what this spec says (idempotent)."""
        commands = []
        if self.mtu:
            commands.append(f"ip link set dev {dev} mtu {self.mtu}")
        if self.offloads:
            commands.append(f"ethtool -K {dev} " + " ".join(f"{name} {'on' if on else 'off'}"
                                                             for name, on in self.offloads))
        if self.delay_ms or self.loss_percent:
            netem = (f" delay {self.delay_ms:g}ms" if self.delay_ms else "") + \
                    (f" loss {self.loss_percent:g}%" if self.loss_percent else "")
            commands.append(f"tc qdisc replace dev {dev} root netem{netem}")
        return commands


@dataclass(frozen=True)
class Guest:
    """One VM of a topology."""

    name: str
    lab0: Nic
    kernel: str | None = None
    memory_mib: int = 512
    cpus: int = 1


@dataclass(frozen=True)
class Topology:
    """A lab's VMs, in boot order; ``source`` is the file it was read from."""

    name: str
    guests: tuple[Guest, ...]
    source: str = ""

    @property
    def vms(self) -> tuple[str, ...]:
        return tuple(guest.name for guest in self.guests)

    @property
    def kernels(self) -> tuple[tuple[str, str], ...]:
        """The VMs pinned to a kernel, as (vm, kernel) pairs."""
        return tuple((guest.name, guest.kernel) for guest in self.guests if guest.kernel)

    @property
    def ref(self) -> str:
        """What names this topology again later: its name if socklab ships it, else its file's absolute path."""
        if not self.source or Path(self.source).resolve().parent == BUILTIN:
            return self.name
        return str(Path(self.source).resolve())

    def guest(self, vm: str) -> Guest:
        for guest in self.guests:
            if guest.name == vm:
                return guest
        raise LabError(f"topology {self.name} has no VM {vm!r}; it has: {', '.join(self.vms)}")

    def kernel_of(self, vm: str, default: str) -> str:
        return self.guest(vm).kernel or default

    def addresses(self) -> dict[str, str]:
        """Each VM's lab-segment address, without prefix: what a model of this lab gives its hosts."""
        return {guest.name: guest.lab0.ip for guest in self.guests}


def builtin_names() -> list[str]:
    return sorted(path.stem for path in BUILTIN.glob("*.yaml"))


def topology(name: str | Path, base: Path | None = None) -> Topology:
    """The topology ``name``: a shipped one by name, or a YAML file by path (relative to ``base`` if given)."""
    text = str(name)
    if isinstance(name, Path) or text.endswith((".yaml", ".yml")) or "/" in text:
        path = Path(text)
        if base is not None and not path.is_absolute():
            path = base / path
        return load(path)
    path = BUILTIN / f"{text}.yaml"
    if not path.is_file():
        raise LabError(f"unknown topology {text!r}{textio.did_you_mean(text, builtin_names())} "
                       "(or give the path of a topology file)")
    return load(path)


def load(path: Path) -> Topology:
    """Read and check a topology file; any problem is one LabError naming file:line."""
    where = str(path)
    data = textio.parse_yaml(textio.read_text(path, "topology", error=LabError), where, error=LabError)
    if not isinstance(data, dict):
        raise LabError(f"{where}: a topology is a mapping with `name:` and `vms:`, not {textio.describe_type(data)}")
    textio.check_keys(data, ("name", "vms"), where, error=LabError)
    name = textio.expect_type(data.get("name", path.stem), str, where, textio.line_of(data), "name", error=LabError)
    vms = data.get("vms")
    if not isinstance(vms, list) or not vms:
        raise LabError(f"{where}:{textio.line_of(data)}: `vms:` must be a list of at least one VM")
    guests = tuple(_guest(entry, index, where) for index, entry in enumerate(vms))
    _check_unique(guests, [textio.line_of(entry) for entry in vms], where)
    return Topology(name=name, guests=guests, source=str(path.resolve()))


def _guest(entry: Any, index: int, where: str) -> Guest:
    line = textio.line_of(entry)
    if not isinstance(entry, dict):
        raise LabError(f"{where}:{line}: each VM is a mapping with `name:` and `lab0:`, not {textio.describe_type(entry)}")
    textio.check_keys(entry, _VM_KEYS, where, error=LabError)
    name = textio.expect_type(entry.get("name"), str, where, line, "name", error=LabError)
    if not name.isidentifier() or len(name) > 15:
        raise LabError(f"{where}:{line}: VM name {name!r}: use letters, digits and '_' (at most 15)")
    kernel = entry.get("kernel")
    if kernel is not None:
        kernel = str(textio.expect_type(kernel, (str, int, float), where, line, "kernel", error=LabError))
    memory = textio.expect_type(entry.get("memory_mib", 512), int, where, line, "memory_mib", error=LabError)
    cpus = textio.expect_type(entry.get("cpus", 1), int, where, line, "cpus", error=LabError)
    if not 128 <= memory <= 16384:
        raise LabError(f"{where}:{line}: `memory_mib: {memory}` is outside 128..16384")
    if not 1 <= cpus <= 8:
        raise LabError(f"{where}:{line}: `cpus: {cpus}` is outside 1..8")
    nic = entry.get("lab0", {})
    if not isinstance(nic, dict):
        raise LabError(f"{where}:{line}: `lab0:` must be a mapping, not {textio.describe_type(nic)}")
    return Guest(name=name, lab0=_nic(nic, index, where, textio.line_of(nic, line)), kernel=kernel,
                 memory_mib=memory, cpus=cpus)


def _nic(nic: dict, index: int, where: str, line: int) -> Nic:
    textio.check_keys(nic, _NIC_KEYS, where, error=LabError)
    address = textio.expect_type(nic["address"] if "address" in nic else lab_address(index), str, where, line, "address",
                                 error=LabError)
    try:
        interface = ipaddress.ip_interface(address)
    except ValueError:
        raise LabError(f"{where}:{line}: `address: {address}` is not an IPv4 address with a prefix "
                       "(198.51.100.7/24)") from None
    if interface.network != LAB_NETWORK or interface.ip in (LAB_NETWORK.network_address, LAB_NETWORK.broadcast_address):
        raise LabError(f"{where}:{line}: `address: {address}` must be a host address in {LAB_NETWORK}: the lab "
                       "segment is the only network a lab may use")
    mtu = nic.get("mtu")
    if mtu is not None:
        mtu = textio.expect_type(mtu, int, where, line, "mtu", error=LabError)
        if not 576 <= mtu <= 9000:
            raise LabError(f"{where}:{line}: `mtu: {mtu}` is outside 576..9000")
    offloads = nic.get("offloads", {})
    if not isinstance(offloads, dict):
        raise LabError(f"{where}:{line}: `offloads:` maps ethtool -K feature names to true or false")
    for feature, on in offloads.items():
        if feature not in OFFLOADS:
            raise LabError(f"{where}:{line}: unknown offload {feature!r}{textio.did_you_mean(feature, OFFLOADS)}")
        textio.expect_type(on, bool, where, line, f"offloads.{feature}", error=LabError)
    delay = textio.expect_type(nic.get("delay_ms", 0), (int, float), where, line, "delay_ms", error=LabError)
    loss = textio.expect_type(nic.get("loss_percent", 0), (int, float), where, line, "loss_percent", error=LabError)
    if not 0 <= delay <= 10000:
        raise LabError(f"{where}:{line}: `delay_ms: {delay}` is outside 0..10000")
    if not 0 <= loss <= 100:
        raise LabError(f"{where}:{line}: `loss_percent: {loss}` is outside 0..100")
    return Nic(address=str(interface), mtu=mtu, offloads=tuple((str(k), bool(v)) for k, v in offloads.items()),
               delay_ms=float(delay), loss_percent=float(loss))


def _check_unique(guests: tuple[Guest, ...], lines: list[int], where: str) -> None:
    names: set[str] = set()
    addresses: set[str] = set()
    for guest, line in zip(guests, lines):
        if guest.name in names:
            raise LabError(f"{where}:{line}: a second VM named {guest.name!r}")
        if guest.lab0.ip in addresses:
            raise LabError(f"{where}:{line}: {guest.name} has the address {guest.lab0.ip} of an earlier VM")
        names.add(guest.name)
        addresses.add(guest.lab0.ip)
