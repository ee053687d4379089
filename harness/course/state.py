"""What a student can see of a run: every snapshot's sockets, queues and skmem, and the counters' deltas.

``save_snapshots`` keeps each snapshot as the guest printed it (``ss``,
``ethtool``, ``/proc`` in one text) and as parsed records (JSON), beside the
model's view of the same moment. ``markdown`` turns them into the report's
"State at each snapshot": per host, the lab's TCP and UDP sockets (the SSH
session that carries the run is left out) with Recv-Q, Send-Q and skmem, and
the counters that changed since the run's first snapshot, as ``nstat`` shows
them, not totals since boot.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

SSH_PORT = 22


def jsonable(value: Any) -> Any:
    """Records (dataclasses, read-only mappings, tuples, frozensets) as plain JSON values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)
                if f.name not in ("raw", "line")}
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted(jsonable(v) for v in value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def lab_sockets(snapshot: Any) -> list[Any]:
    """The TCP and UDP sockets of a kernel snapshot, without the SSH connection that runs the scenario."""
    found = []
    for sock in getattr(snapshot, "sockets", ()):
        if sock.netid not in ("tcp", "udp"):
            continue
        if SSH_PORT in (sock.local.port, sock.peer.port):
            continue
        found.append(sock)
    return found


def save_snapshots(result: Any, directory: Path) -> list[Path]:
    """Write ``snapshots/<scenario>/<snapshot>.<host>.{txt,json}`` (+ ``model.<snapshot>.<host>.json``)."""
    written = []
    where = directory / "snapshots" / result.scenario.name
    for name, hosts in result.kernel_snapshots.items():
        for host, snapshot in hosts.items():
            where.mkdir(parents=True, exist_ok=True)
            raw = getattr(snapshot, "raw", "")
            if raw:
                (where / f"{name}.{host}.txt").write_text(raw)
                written.append(where / f"{name}.{host}.txt")
            (where / f"{name}.{host}.json").write_text(json.dumps(jsonable(snapshot), indent=1) + "\n")
            written.append(where / f"{name}.{host}.json")
    for name, hosts in result.model_snapshots.items():
        for host, stats in hosts.items():
            where.mkdir(parents=True, exist_ok=True)
            (where / f"model.{name}.{host}.json").write_text(json.dumps(jsonable(stats), indent=1) + "\n")
            written.append(where / f"model.{name}.{host}.json")
    return written


def _skmem(sock: Any) -> str:
    m = getattr(sock, "skmem", None)
    if m is None:
        return "-"
    return (f"r {m.sk_rmem_alloc} rb {m.sk_rcvbuf} t {m.sk_wmem_alloc} tb {m.sk_sndbuf} "
            f"w {m.sk_wmem_queued} o {m.sk_omem_alloc} d {m.sk_drops}")


def counter_deltas(first: Any, snapshot: Any) -> dict[str, int]:
    """The counters that changed between two kernel snapshots of one host (nstat's view of the run)."""
    try:
        return dict((snapshot - first).changed())
    except Exception:  # noqa: BLE001 - a model stand-in or a rebooted guest has no delta to show
        return {}


def _model_listener(model_hosts: Mapping[str, Any] | None, host: str, port: int | None) -> str:
    stats = (model_hosts or {}).get(host)
    if stats is None or port is None:
        return ""
    row = stats.listener(port)
    return f"{row.recv_q}/{row.send_q}" if row is not None else "(no listener)"


def markdown(result: Any) -> str:
    """The run's state at each snapshot, host by host (empty when the run took no kernel snapshot)."""
    def cell(text: object) -> str:
        return str(text).replace("|", "\\|")

    if not result.kernel_snapshots:
        return ""
    lines = [f"### State at each snapshot: {result.scenario.name}", ""]
    first = next(iter(result.kernel_snapshots.values()))
    for name, hosts in result.kernel_snapshots.items():
        model_hosts = result.model_snapshots.get(name)
        for host, snapshot in hosts.items():
            lines += [f"**{name}, {host}**", ""]
            sockets = lab_sockets(snapshot)
            if sockets:
                lines += ["| netid | state | local | peer | Recv-Q | Send-Q | skmem | model Recv-Q/Send-Q |",
                          "|---|---|---|---|---|---|---|---|"]
                for sock in sockets:
                    model = _model_listener(model_hosts, host, sock.local.port) if sock.state == "LISTEN" else ""
                    lines.append("| " + " | ".join(cell(x) for x in (
                        sock.netid, sock.state, sock.local, sock.peer, sock.recv_q, sock.send_q, _skmem(sock),
                        model)) + " |")
            else:
                lines.append("No TCP or UDP socket of the lab.")
            deltas = counter_deltas(first[host], snapshot) if host in first else {}
            if name != next(iter(result.kernel_snapshots)):
                changed = ", ".join(f"{key} +{value}" if value > 0 else f"{key} {value}"
                                    for key, value in sorted(deltas.items()))
                lines += ["", f"Counters since `{next(iter(result.kernel_snapshots))}`: {changed or 'none changed'}"]
            lines.append("")
    return "\n".join(lines) + "\n"
