"""Socket-layer statistics of lab VMs: ss, ethtool, /proc/net and sysctls in one SSH round trip.

    snap = collect(server)                       # or collect_many(lab) for every VM at once
    snap.listener(5001).recv_q                   # sk_ack_backlog
    (after - before).counter("TcpExt.ListenOverflows")
    snap.nic("lab0").features["scatter-gather"].enabled
"""

from .collect import close_shell, collect, collect_many, parse_output
from .errors import (Origin, StatsCommandFailed, StatsError, StatsFormatError, StatsLookupError, StatsToolMissing,
                     StatsTruncatedError)
from .snapshot import (Delta, Endpoint, Feature, FrozenDict, LabSnapshot, Nic, NicQueue, PortRange, SkMem, Snapshot,
                       Socket, Sysctls, TcpInfo, TcpMem)

__all__ = [
    "collect", "collect_many", "close_shell", "parse_output",
    "Snapshot", "LabSnapshot", "Delta", "Socket", "Endpoint", "SkMem", "TcpInfo", "Nic", "NicQueue", "Feature",
    "Sysctls", "TcpMem", "PortRange", "FrozenDict",
    "StatsError", "StatsToolMissing", "StatsCommandFailed", "StatsFormatError", "StatsTruncatedError",
    "StatsLookupError", "Origin",
]
