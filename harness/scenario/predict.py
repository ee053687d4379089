"""The model's side of the expectations: its snapshots read through the same API as the kernel's stats.

An expectation template reads ``full.server.listener(port).recv_q``,
``delta("before", "full").server.counter(...)`` or ``...skmem.sk_rcvbuf``
from the kernel's snapshots. ``ModelSnapshot`` answers the same names from
the model's state at that snapshot, so every assertion can be evaluated on
the model as well: a model-only check runs the expectations, and a check on
the lab shows what the model predicted next to what the kernel showed.

What the model does not simulate (most of skmem, tcp_info, NIC counters)
raises ``NotPredicted``; the assertion is then reported as "not predicted by
the model" for that figure, instead of failing or silently passing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from .runner import ModelStats, RunResult, StepRecord


class NotPredicted(Exception):
    """The model does not simulate this figure; the message says which."""


@dataclass(frozen=True)
class ModelEndpoint:
    address: str
    port: int | None

    def __str__(self) -> str:
        return f"{self.address}:{'*' if self.port is None else self.port}"


def _endpoint(value: Any) -> ModelEndpoint:
    if isinstance(value, (tuple, list)) and len(value) >= 2:
        return ModelEndpoint(str(value[0]), value[1] or None)
    return ModelEndpoint(str(value or "*"), None)


@dataclass(frozen=True)
class ModelSkMem:
    """``skmem:(…)`` as far as the model knows it: the buffer limits, not the memory charged."""

    sk_rcvbuf: int
    sndbuf: int
    sndbuf_locked: bool = True

    @property
    def sk_sndbuf(self) -> int:
        if not self.sndbuf_locked:
            raise NotPredicted("the model does not follow send-buffer autotuning (tcp_sndbuf_expand with the cwnd)")
        return self.sndbuf

    def __getattr__(self, name: str) -> Any:
        if name.startswith("sk_"):
            raise NotPredicted(f"the model does not predict skmem {name} (it tracks the limits rb and tb only)")
        raise AttributeError(name)


@dataclass(frozen=True)
class ModelSocket:
    netid: str
    state: str
    recv_q: int
    send_q: int
    local: ModelEndpoint
    peer: ModelEndpoint
    inode: int
    skmem_limits: ModelSkMem | None

    @property
    def skmem(self) -> ModelSkMem:
        if self.skmem_limits is None:
            raise NotPredicted("the model has no skmem for a TIME-WAIT socket")
        return self.skmem_limits

    @property
    def tcp(self) -> Any:
        raise NotPredicted("the model does not predict tcp_info (windows, RTT, cwnd)")


class ModelSnapshot:
    """One host's model state at a snapshot, with the kernel ``Snapshot``'s reading API."""

    def __init__(self, stats: ModelStats, sysctls: Any = None) -> None:
        self._stats = stats
        self.sysctls = sysctls
        self.sockets = tuple(
            ModelSocket(row.proto, row.state, row.recv_q, row.send_q, _endpoint(row.local), _endpoint(row.peer),
                        row.inode, ModelSkMem(row.skmem_rb, row.skmem_tb, row.sndbuf_locked) if row.skmem_rb is not None else None)
            for row in stats.rows)

    def find(self, *, netid: str | None = None, state: str | None = None, port: int | None = None,
             peer_port: int | None = None, address: str | None = None, family: str | None = None) -> tuple:
        found = []
        for sock in self.sockets:
            if netid is not None and sock.netid != netid:
                continue
            if state is not None and sock.state != state:
                continue
            if port is not None and sock.local.port != port:
                continue
            if peer_port is not None and sock.peer.port != peer_port:
                continue
            if address is not None and sock.local.address != address:
                continue
            found.append(sock)
        return tuple(found)

    def listener(self, port: int, address: str | None = None, netid: str = "tcp") -> ModelSocket:
        for sock in self.find(netid=netid, state="LISTEN", port=port, address=address):
            return sock
        raise LookupError(f"the model has no {netid} listener on port {port}")

    def socket(self, *, inode: int | None = None, cookie: int | None = None) -> ModelSocket:
        if cookie is not None:
            raise NotPredicted("the model has no socket cookies")
        for sock in self.sockets:
            if sock.inode == inode:
                return sock
        raise LookupError(f"the model has no socket with inode {inode}")

    def counter(self, name: str) -> int:
        return self._stats.counter(_modelled(name))

    @property
    def sockstat(self) -> Any:
        raise NotPredicted("the model does not account protocol memory (/proc/net/sockstat)")

    def nic(self, name: str) -> Any:
        raise NotPredicted(f"the model does not predict NIC {name}'s counters or features")

    def __sub__(self, before: "ModelSnapshot") -> "ModelDeltaView":
        return ModelDeltaView(self._stats - before._stats)


class ModelDeltaView:
    """``delta(a, b).host`` on the model: counter growth, for the counters the model moves."""

    def __init__(self, delta: Any) -> None:
        self._delta = delta

    def counter(self, name: str) -> int:
        return self._delta.counter(_modelled(name))


def _modelled(counter: str) -> str:
    from ..model.host import Host

    if counter not in Host.MODELLED_COUNTERS:
        raise NotPredicted(f"the model does not count {counter}")
    return counter


def model_view(result: RunResult, sysctls: Mapping[str, Any]) -> RunResult:
    """The run as the model saw it: model snapshots as the snapshots, the model's outcomes as the trace."""
    snapshots: dict[str, Mapping[str, Any]] = {name: {host: ModelSnapshot(stats, sysctls.get(host)) for host, stats in hosts.items()}
                 for name, hosts in result.model_snapshots.items()}
    records = [replace(record, kernel=record.model) if isinstance(record, StepRecord) else record
               for record in result.records]
    return replace(result, records=records, kernel_snapshots=snapshots)
