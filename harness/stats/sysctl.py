"""The sysctls a snapshot reads, their /proc/sys paths and how each value is typed."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import Origin, StatsFormatError, StatsTruncatedError
from .snapshot import PortRange, Sysctls, TcpMem


@dataclass(frozen=True)
class SysctlSpec:
    """One sysctl: dotted name, ``Sysctls`` attribute, and the number of integers its file holds."""

    name: str
    attr: str
    kind: Callable[[list[int]], object]
    count: int = 1

    @property
    def path(self) -> str:
        return "/proc/sys/" + self.name.replace(".", "/")


def _int(values: list[int]) -> int:
    return values[0]


def _bool(values: list[int]) -> bool:
    if values[0] not in (0, 1):
        raise ValueError(f"{values[0]} is not 0 or 1")
    return bool(values[0])


SYSCTLS: tuple[SysctlSpec, ...] = (
    SysctlSpec("net.core.somaxconn", "somaxconn", _int),
    SysctlSpec("net.core.rmem_max", "rmem_max", _int),
    SysctlSpec("net.core.wmem_max", "wmem_max", _int),
    SysctlSpec("net.core.rmem_default", "rmem_default", _int),
    SysctlSpec("net.core.wmem_default", "wmem_default", _int),
    SysctlSpec("net.core.optmem_max", "optmem_max", _int),
    SysctlSpec("net.ipv4.tcp_rmem", "tcp_rmem", lambda v: TcpMem(*v), 3),
    SysctlSpec("net.ipv4.tcp_wmem", "tcp_wmem", lambda v: TcpMem(*v), 3),
    SysctlSpec("net.ipv4.ip_local_port_range", "ip_local_port_range", lambda v: PortRange(*v), 2),
    SysctlSpec("net.ipv4.ip_unprivileged_port_start", "ip_unprivileged_port_start", _int),
    SysctlSpec("net.ipv4.tcp_syncookies", "tcp_syncookies", _int),
    SysctlSpec("net.ipv4.tcp_max_syn_backlog", "tcp_max_syn_backlog", _int),
    SysctlSpec("net.ipv4.ip_nonlocal_bind", "ip_nonlocal_bind", _bool),
    SysctlSpec("net.ipv4.tcp_abort_on_overflow", "tcp_abort_on_overflow", _bool),
)

_NUMBERS = re.compile(r"^-?\d+(?:\s+-?\d+)*$")


def parse_sysctl_value(spec: SysctlSpec, text: str, origin: Origin) -> object:
    """One /proc/sys file's content (tab-separated integers) as the spec's type."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) != 1:
        raise StatsFormatError(origin, 1, text, f"{spec.name} should be one line, got {len(lines)}")
    line = lines[0]
    if not _NUMBERS.match(line.strip()):
        raise StatsFormatError(origin, 1, line, f"{spec.name} is not integers")
    values = [int(v) for v in line.split()]
    if len(values) < spec.count:
        raise StatsTruncatedError(origin, 1, line, f"{spec.name} has {len(values)} of {spec.count} values")
    if len(values) > spec.count:
        raise StatsFormatError(origin, 1, line, f"{spec.name} has {len(values)} values, expected {spec.count}")
    try:
        return spec.kind(values)
    except ValueError as exc:
        raise StatsFormatError(origin, 1, line, f"{spec.name}: {exc}") from None


def parse_sysctls(files: Mapping[str, str], origin_for: Callable[[str], Origin]) -> Sysctls:
    """``Sysctls`` from ``{"/proc/sys/net/core/somaxconn": "4096\\n", …}``."""
    values: dict[str, Any] = {}  # attr -> its spec's kind: ints, TcpMem, PortRange, bools
    for spec in SYSCTLS:
        if spec.path not in files:
            raise StatsTruncatedError(origin_for(spec.path), 0, "", f"{spec.name} was not read")
        values[spec.attr] = parse_sysctl_value(spec, files[spec.path], origin_for(spec.path))
    return Sysctls(**values)
