"""Parse /proc/net/netstat, /proc/net/snmp and /proc/net/sockstat{,6}, and split ``grep -H`` output by file."""

from __future__ import annotations

import re
from collections.abc import Sequence

from .errors import Origin, StatsFormatError, StatsTruncatedError
from .snapshot import FrozenDict

NETSTAT = "/proc/net/netstat"   # TcpExt, IpExt, MPTcpExt: LINUX_MIB_* (include/uapi/linux/snmp.h)
SNMP = "/proc/net/snmp"         # Ip, Icmp, IcmpMsg, Tcp, Udp, UdpLite: the RFC MIBs
SOCKSTAT = "/proc/net/sockstat"
SOCKSTAT6 = "/proc/net/sockstat6"

# Groups every kernel the labs run prints; their absence means the file was cut.
REQUIRED_GROUPS = {NETSTAT: ("TcpExt", "IpExt"), SNMP: ("Ip", "Tcp", "Udp")}

_GROUP = re.compile(r"^(?P<group>[A-Za-z0-9]+): (?P<rest>.*)$")
_INTEGER = re.compile(r"^-?\d+$")  # Tcp.MaxConn is -1: the RFC's "dynamic"


def file_origin(vm: str, path: str) -> Origin:
    """The origin named in errors about one procfs file read by the collector's single grep."""
    return Origin(vm, f"busybox grep -H '' {path}")


def _lines(text: str) -> list[str]:
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def parse_mib(text: str, origin: Origin, required: Sequence[str] = ()) -> dict[str, int]:
    """``Group: Name1 Name2`` / ``Group: value1 value2`` line pairs into ``{"Group.Name1": value1, …}``."""
    lines = _lines(text)
    counters: dict[str, int] = {}
    groups: list[str] = []
    for index in range(0, len(lines), 2):
        names_line = lines[index]
        names = _GROUP.match(names_line)
        if names is None:
            raise StatsFormatError(origin, index + 1, names_line, "expected '<Group>: <Name> <Name> …'")
        if index + 1 >= len(lines):
            raise StatsTruncatedError(origin, index + 1, names_line, f"{names['group']} names have no values line")
        values_line = lines[index + 1]
        values = _GROUP.match(values_line)
        if values is None or values["group"] != names["group"]:
            raise StatsFormatError(origin, index + 2, values_line, f"expected the values line of {names['group']}")
        keys, numbers = names["rest"].split(), values["rest"].split()
        bad = [n for n in numbers if not _INTEGER.match(n)]
        if bad:
            raise StatsFormatError(origin, index + 2, values_line, f"{bad[0]!r} is not an integer")
        if len(numbers) < len(keys):
            raise StatsTruncatedError(origin, index + 2, values_line,
                                      f"{len(keys)} {names['group']} names but only {len(numbers)} values")
        if len(numbers) > len(keys):
            raise StatsTruncatedError(origin, index + 1, names_line,
                                      f"{len(numbers)} {names['group']} values but only {len(keys)} names")
        group = names["group"]
        for key, number in zip(keys, numbers):
            name = f"{group}.{key}"
            if name in counters:
                raise StatsFormatError(origin, index + 1, names_line, f"counter {name} appears twice")
            counters[name] = int(number)
        groups.append(group)
    missing = [g for g in required if g not in groups]
    if missing:
        last = lines[-1] if lines else ""
        raise StatsTruncatedError(origin, len(lines), last, f"no {', '.join(missing)} lines "
                                  f"(found {', '.join(groups) or 'nothing'})")
    return counters


def parse_sockstat(text: str, origin: Origin) -> dict[str, FrozenDict[str, int]]:
    """``TCP: inuse 3 orphan 0 tw 0 alloc 5 mem 1`` lines into ``{"TCP": {"inuse": 3, …}}`` (mem in pages)."""
    table: dict[str, FrozenDict[str, int]] = {}
    lines = _lines(text)
    if not lines:
        raise StatsTruncatedError(origin, 1, "", "the file is empty")
    for number, line in enumerate(lines, 1):
        match = _GROUP.match(line)
        if match is None:
            raise StatsFormatError(origin, number, line, "expected '<PROTO>: <name> <value> …'")
        words = match["rest"].split()
        if len(words) % 2:
            raise StatsTruncatedError(origin, number, line, f"{words[-1]!r} has no value")
        pairs = dict(zip(words[::2], words[1::2]))
        bad = [v for v in pairs.values() if not _INTEGER.match(v)]
        if bad:
            raise StatsFormatError(origin, number, line, f"{bad[0]!r} is not an integer")
        if match["group"] in table:
            raise StatsFormatError(origin, number, line, f"{match['group']} appears twice")
        table[match["group"]] = FrozenDict({k: int(v) for k, v in pairs.items()})
    return table


def split_grep_h(text: str, paths: Sequence[str], origin: Origin) -> dict[str, str]:
    """Undo ``grep -H '' FILE…``: every line is ``FILE:content``; give back each file's text.

    Every file must have produced at least one line: procfs files are never empty,
    so a missing one means grep could not read it.
    """
    wanted = set(paths)
    files: dict[str, list[str]] = {path: [] for path in paths}
    lines = _lines(text)
    for number, line in enumerate(lines, 1):
        path, colon, content = line.partition(":")
        if not colon or path not in wanted:
            raise StatsFormatError(origin, number, line, f"expected '<file>:<line>' for one of {len(paths)} files")
        files[path].append(content)
    empty = [path for path, content in files.items() if not content]
    if empty:
        raise StatsTruncatedError(origin, len(lines), lines[-1] if lines else "",
                                  f"nothing read from {', '.join(empty)}")
    return {path: "\n".join(content) + "\n" for path, content in files.items()}
