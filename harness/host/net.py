"""Host side of the lab's networks: loopback ports for SSH, and the lab segment.

The lab segment is 198.51.100.0/24 (TEST-NET-2, never routed). As root it is a
bridge inside a network namespace the lab creates, with one tap per VM: QEMU
creates each tap in the root namespace (so its SSH forward can stay on the
host's 127.0.0.1), and the tap is then moved into the lab namespace while QEMU
holds its fd. Nothing in the root namespace is attached to the bridge, so no
frame from the segment can reach the host or beyond. Without root the segment
is a QEMU socket netdev over 127.0.0.1: two VMs only, and no offloads.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import shlex
import socket
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from harness.errors import LabError
from harness.log import truncate

log = logging.getLogger(__name__)

LAB_NETWORK = ipaddress.ip_network("198.51.100.0/24")
BRIDGE = "br-lab"
# How the lab segment is made: taps on a bridge in a netns (root), a QEMU socket netdev, or whichever works.
SEGMENT_MODES = ("auto", "tap", "socket")

Runner = Callable[[Sequence[str]], subprocess.CompletedProcess]


def run_ip(argv: Sequence[str]) -> subprocess.CompletedProcess:
    log.debug("host: %s", shlex.join(argv))
    result = subprocess.run(list(argv), stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if result.returncode:
        log.debug("host: exit %d: %s", result.returncode, truncate(result.stderr.strip()))
    return result


def lab_address(index: int) -> str:
    """The lab-segment address (with prefix) of the ``index``-th VM: .1, .2, ..."""
    if not 0 <= index < LAB_NETWORK.num_addresses - 2:
        raise LabError(f"no lab address for VM number {index + 1} in {LAB_NETWORK}")
    return f"{LAB_NETWORK.network_address + index + 1}/{LAB_NETWORK.prefixlen}"


def mac_address(kind: int, index: int) -> str:
    """Locally administered MACs, fixed per role so the guest names its NICs by them."""
    return f"52:54:00:{kind:02x}:00:{index + 1:02x}"


def free_port(bind: Callable[[], socket.socket] | None = None, attempts: int = 20) -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now.

    The kernel picks it (bind to port 0), so this never scans. The port is free
    when we return; QEMU binds it a moment later, and a lost race makes QEMU
    fail with a clear message, which the caller answers with a new port.
    """
    last_error: OSError | None = None
    for _ in range(attempts):
        sock = bind() if bind else socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.bind(("127.0.0.1", 0))
            return sock.getsockname()[1]
        except OSError as exc:
            last_error = exc
            if exc.errno not in (errno.EADDRINUSE, errno.EADDRNOTAVAIL):
                break
        finally:
            sock.close()
    raise LabError(f"no free TCP port on 127.0.0.1 for the SSH forward: {last_error}")


def can_use_taps() -> tuple[bool, str]:
    """Whether tap mode is possible here, and why not if it is not."""
    if os.geteuid() != 0:
        return False, "not root (taps, bridges and network namespaces need CAP_NET_ADMIN)"
    if not os.path.exists("/dev/net/tun"):
        return False, "/dev/net/tun is missing"
    return True, "root, /dev/net/tun present"


@dataclass
class TapSegment:
    """A bridge in network namespace ``netns`` that the VMs' taps are moved onto."""

    netns: str
    run: Runner = run_ip

    def _ip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        result = self.run(["ip", *args])
        if check and result.returncode != 0:
            raise LabError(f"`ip {' '.join(args)}` failed: {result.stderr.strip()}")
        return result

    def exists(self) -> bool:
        result = self._ip("netns", "list", check=False)
        return any(line.split()[0] == self.netns for line in result.stdout.splitlines() if line.strip())

    def create(self) -> None:
        if self.exists():
            # Left by a lab that died before it could clean up; its taps died with its QEMUs.
            self.destroy()
        self._ip("netns", "add", self.netns)
        self._ip("-n", self.netns, "link", "add", BRIDGE, "type", "bridge")
        # Forward at once: a new bridge port otherwise waits in STP listening/learning.
        self._ip("-n", self.netns, "link", "set", BRIDGE, "type", "bridge", "forward_delay", "0", "stp_state", "0")
        self._ip("-n", self.netns, "link", "set", BRIDGE, "up")

    def attach(self, tap: str) -> None:
        """Move a tap QEMU holds open from the root namespace onto the bridge."""
        self._ip("link", "set", tap, "netns", self.netns)
        self._ip("-n", self.netns, "link", "set", tap, "master", BRIDGE)
        self._ip("-n", self.netns, "link", "set", tap, "up")

    def destroy(self) -> None:
        """Remove the namespace and with it the bridge. Taps vanish with the QEMU that made them."""
        if self.exists():
            self._ip("netns", "delete", self.netns)


def tap_exists(name: str, run: Runner = run_ip) -> bool:
    return run(["ip", "link", "show", "dev", name]).returncode == 0


def delete_tap(name: str, run: Runner = run_ip) -> None:
    """Delete a tap left in the root namespace (a QEMU that died between start and attach)."""
    if tap_exists(name, run):
        run(["ip", "link", "delete", "dev", name])
