"""Parse ``ethtool -S IFACE`` (driver counters, per queue) and ``ethtool -k '*'`` (offload features)."""

from __future__ import annotations

import re

from .errors import Origin, StatsFormatError, StatsTruncatedError
from .snapshot import Feature, FrozenDict, NicQueue

FEATURES_COMMAND = "ethtool -k '*'"  # "*" makes ethtool 6.x dump every device over netlink: one process, not one per NIC


def stats_command(nic: str) -> str:
    return f"ethtool -S {nic}"


_STAT = re.compile(r"^\s+(?P<name>\S.*?): (?P<value>\d+)$")
# Per-queue counter names. virtio_net (the lab NICs) prints rx_queue_<n>_<stat> and
# tx_queue_<n>_<stat> (virtnet_get_strings); the other two are common driver spellings.
_QUEUE_PATTERNS = (
    re.compile(r"^(?P<dir>rx|tx)_queue_(?P<index>\d+)_(?P<stat>.+)$"),
    re.compile(r"^(?P<dir>rx|tx)-(?P<index>\d+)\.(?P<stat>.+)$"),
    re.compile(r"^(?P<dir>rx|tx)(?P<index>\d+)_(?P<stat>.+)$"),
)
_FEATURES_FOR = re.compile(r"^Features for (?P<nic>\S+):$")
# dump_feature() in ethtool's netlink/features.c: "[fixed]" when the bit is not in hw_features,
# "[requested on|off]" when the wanted state differs from the active one.
_FEATURE = re.compile(r"^(?P<indent>\t?)(?P<name>[^\s:][^:]*): (?P<state>on|off)"
                      r"(?: \[(?P<note>fixed|requested on|requested off)\])?$")
# Something a valid feature line starts with but does not complete: the line was cut.
_FEATURE_CUT = re.compile(r"^\t?[^\s:][^:]*(?::(?: (?:o|on|of|off)(?: (?:\[[a-z ]*)?)?)?)?$")


def parse_ethtool_stats(text: str, origin: Origin | None = None) -> tuple[FrozenDict[str, int], tuple[NicQueue, ...]]:
    """All counters of ``ethtool -S``, and the per-queue ones grouped by queue."""
    origin = origin or Origin("?", "ethtool -S")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if not lines or lines[0] != "NIC statistics:":
        first = lines[0] if lines else ""
        raise StatsFormatError(origin, 1, first, "expected the header 'NIC statistics:'")
    counters: dict[str, int] = {}
    for number, line in enumerate(lines[1:], 2):
        match = _STAT.match(line)
        if match is None:
            if re.match(r"^\s+\S.*?:\s*$", line) or re.match(r"^\s+\S[^:]*$", line):
                raise StatsTruncatedError(origin, number, line, "a counter without its value")
            raise StatsFormatError(origin, number, line, "expected '     <name>: <unsigned value>'")
        name = match["name"]
        if name in counters:
            raise StatsFormatError(origin, number, line, f"counter {name!r} appears twice")
        counters[name] = int(match["value"])
    return FrozenDict(counters), group_queues(counters)


def group_queues(counters: dict[str, int] | FrozenDict[str, int]) -> tuple[NicQueue, ...]:
    """Per-queue counters, ordered rx 0…n then tx 0…n; device-wide counters are left in ``counters`` only."""
    queues: dict[tuple[str, int], dict[str, int]] = {}
    for name, value in counters.items():
        for pattern in _QUEUE_PATTERNS:
            match = pattern.match(name)
            if match:
                queues.setdefault((match["dir"], int(match["index"])), {})[match["stat"]] = value
                break
    return tuple(NicQueue(direction, index, FrozenDict(stats))
                 for (direction, index), stats in sorted(queues.items()))


def parse_ethtool_features(text: str, origin: Origin | None = None) -> dict[str, FrozenDict[str, Feature]]:
    """``ethtool -k`` for one device or ``-k '*'`` for all: ``{nic: {feature: Feature}}``."""
    origin = origin or Origin("?", FEATURES_COMMAND)
    nics: dict[str, dict[str, Feature]] = {}
    current: dict[str, Feature] | None = None
    parent: str | None = None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    for number, line in enumerate(lines, 1):
        if line == "":
            # The wildcard dump puts a blank line before each "Features for" header.
            if number < len(lines) and _FEATURES_FOR.match(lines[number]):
                continue
            raise StatsFormatError(origin, number, line, "blank line not followed by 'Features for <nic>:'")
        header = _FEATURES_FOR.match(line)
        if header:
            nic = header["nic"]
            if nic in nics:
                raise StatsFormatError(origin, number, line, f"features of {nic} listed twice")
            current = nics[nic] = {}
            parent = None
            continue
        if current is None:
            raise StatsFormatError(origin, number, line, "expected 'Features for <nic>:' before any feature")
        match = _FEATURE.match(line)
        if match is None:
            if _FEATURE_CUT.match(line):
                raise StatsTruncatedError(origin, number, line, "a feature without its complete on/off state")
            raise StatsFormatError(origin, number, line, "expected '<feature>: on|off [fixed|requested on|requested off]'")
        name = match["name"]
        note = match["note"] or ""
        if match["indent"]:
            if parent is None:
                raise StatsFormatError(origin, number, line, "indented feature with no feature above it")
            owner = parent
        else:
            owner, parent = None, name
        current[name] = Feature(
            name=name, enabled=match["state"] == "on", fixed=note == "fixed",
            requested=None if not note.startswith("requested") else note.endswith("on"), parent=owner,
        )
    for nic, features in nics.items():
        if not features:
            raise StatsTruncatedError(origin, len(lines), lines[-1] if lines else "", f"no features listed for {nic}")
    return {nic: FrozenDict(features) for nic, features in nics.items()}
