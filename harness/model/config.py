"""Per-host configuration: the sysctl defaults a kernel boots with, and credentials.

The table below is Debian bookworm's 6.1 on x86_64; ``defaults_for`` applies
the version rules of ``versions.py`` and the memory-sized boot defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from .constants import CAP_IPC_LOCK, CAP_NET_ADMIN, CAP_NET_BIND_SERVICE, CAP_NET_RAW

from .versions import DEFAULT_KERNEL, DEFAULT_MEMORY_MIB, RULES, boot_defaults

# Values a fresh 6.1 kernel boots with; sources noted where the number is derived. The entries a
# version rule or the VM's memory decides are overwritten by defaults_for().
BASE_SYSCTLS: dict[str, Any] = {
    "net.core.somaxconn": 4096,  # SOMAXCONN, include/linux/socket.h (raised from 128 in 5.4)
    "net.core.rmem_max": 212992,  # SK_RMEM_MAX = SKB_TRUESIZE(256) * 256 = 832 * 256
    "net.core.wmem_max": 212992,  # SK_WMEM_MAX, same formula
    "net.core.rmem_default": 212992,
    "net.core.wmem_default": 212992,
    "net.core.optmem_max": 20480,  # sizeof(long) * (2 * UIO_MAXIOV + 512) in 6.1
    "net.core.busy_read": 0,  # sysctl_net_busy_read: a new socket's sk_ll_usec (sock_init_data)
    "net.core.busy_poll": 0,  # sysctl_net_busy_poll: poll()/select() busy-poll budget in microseconds
    "net.ipv4.tcp_rmem": (4096, 131072, 6291456),  # tcp_init(): rmem[1] = 131072; [2] from memory
    "net.ipv4.tcp_wmem": (4096, 16384, 4194304),  # [2] from memory: see versions.boot_defaults
    "net.ipv4.tcp_mem": (0, 0, 0),  # pages, from memory
    "net.ipv4.udp_mem": (0, 0, 0),
    "net.ipv4.ip_local_port_range": (32768, 60999),
    "net.ipv4.ip_unprivileged_port_start": 1024,  # PROT_SOCK
    "net.ipv4.tcp_syncookies": 1,
    "net.ipv4.tcp_max_syn_backlog": 128,  # max(128, ehash size / 128): from memory
    "net.ipv4.ip_nonlocal_bind": 0,
    "net.ipv6.ip_nonlocal_bind": 0,
    "net.ipv6.bindv6only": 0,
    "net.ipv4.tcp_abort_on_overflow": 0,
    "net.ipv4.tcp_syn_retries": 6,
    "net.ipv4.tcp_fin_timeout": 60,
    "net.ipv4.tcp_adv_win_scale": 1,
    "net.ipv4.ping_group_range": (1, 0),
    "net.unix.max_dgram_qlen": 10,  # unix_net_init()  # kernel default; systemd's 50-default.conf widens it
}


def defaults_for(kernel: str = DEFAULT_KERNEL, memory_mib: int = DEFAULT_MEMORY_MIB) -> dict[str, Any]:
    """The socket sysctls a fresh ``kernel`` boots with in a VM of ``memory_mib``."""
    table = dict(BASE_SYSCTLS)
    for name, rule in RULES.items():
        if name in table:
            table[name] = rule.value(kernel)
    table.update(boot_defaults(memory_mib, kernel))
    return table


DEFAULT_SYSCTLS: dict[str, Any] = defaults_for()

_VECTOR_KEYS = {key for key, value in DEFAULT_SYSCTLS.items() if isinstance(value, tuple)}


def _canonical_key(key: str) -> str:
    """Accept 'somaxconn', 'net/core/somaxconn' or the dotted name."""
    dotted = key.replace("/", ".")
    if dotted in DEFAULT_SYSCTLS:
        return dotted
    matches = [name for name in DEFAULT_SYSCTLS if name.endswith("." + dotted)]
    if len(matches) == 1:
        return matches[0]
    raise KeyError(f"unknown or ambiguous sysctl {key!r}")


def _coerce(key: str, value: Any) -> Any:
    if key in _VECTOR_KEYS:
        parts = value.split() if isinstance(value, str) else list(value)
        return tuple(int(part) for part in parts)
    return int(value)


def build_sysctls(overrides: Mapping[str, Any] | None, kernel: str = DEFAULT_KERNEL,
                  memory_mib: int = DEFAULT_MEMORY_MIB) -> dict[str, Any]:
    """The kernel's defaults with overrides applied, keys canonicalised and values typed."""
    table = defaults_for(kernel, memory_mib)
    for key, value in (overrides or {}).items():
        name = _canonical_key(key)
        table[name] = _coerce(name, value)
    return table


ALL_CAPS = frozenset(range(41))  # CAP_LAST_CAP is 40 in 6.1


@dataclass(frozen=True)
class Creds:
    """Who makes a call: uid/gid and effective capabilities (one process per host per user)."""

    name: str
    uid: int
    gid: int = 0
    caps: frozenset[int] = field(default_factory=frozenset)

    def capable(self, cap: int) -> bool:
        return cap in self.caps


ROOT = Creds("root", 0, 0, ALL_CAPS)
STUDENT = Creds("student", 1000, 1000, frozenset())

CAP_NAMES = {
    "CAP_NET_BIND_SERVICE": CAP_NET_BIND_SERVICE,
    "CAP_NET_ADMIN": CAP_NET_ADMIN,
    "CAP_NET_RAW": CAP_NET_RAW,
    "CAP_IPC_LOCK": CAP_IPC_LOCK,
}
