"""What a student sees of a run: snapshots saved raw and parsed, queues and skmem per snapshot, counter deltas."""

from __future__ import annotations

import dataclasses
import json

from harness.course import state
from harness.scenario.runner import RunResult
from harness.stats.collect import parse_output
from tests.unit.stats.helpers import fixture, nonce_of


def _snapshot(name: str, **changes):
    text = fixture(name)
    snap = parse_output(text, nonce_of(text), "server")
    return dataclasses.replace(snap, raw=text, **changes)


def _result(tmp_path, snapshots):
    from harness.scenario.format import load

    path = tmp_path / "s.yaml"
    path.write_text("name: s\nhosts: [server]\nparams: {}\n---\nsteps:\n  - snapshot: before\n")
    result = RunResult(load(path))
    result.kernel_snapshots.update(snapshots)
    return result


def test_every_snapshot_is_saved_raw_and_parsed(tmp_path):
    snap = _snapshot("snapshot-server-mixed.txt")
    result = _result(tmp_path, {"before": {"server": snap}, "after": {"server": snap}})
    written = state.save_snapshots(result, tmp_path / "out")
    names = sorted(p.name for p in written)
    assert names == ["after.server.json", "after.server.txt", "before.server.json", "before.server.txt"]
    assert (tmp_path / "out" / "snapshots" / "s" / "before.server.txt").read_text() == snap.raw
    parsed = json.loads((tmp_path / "out" / "snapshots" / "s" / "before.server.json").read_text())
    assert len(parsed["sockets"]) == len(snap.sockets) and parsed["counters"]


def test_the_report_shows_queues_and_skmem_without_the_ssh_session(tmp_path):
    snap = _snapshot("snapshot-server-mixed.txt")
    text = state.markdown(_result(tmp_path, {"before": {"server": snap}}))
    listeners = [s for s in state.lab_sockets(snap) if s.state == "LISTEN"]
    assert listeners, "the fixture has a listener of the lab"
    assert f"| {listeners[0].recv_q} | {listeners[0].send_q} | r " in text
    assert ":22 " not in text and "0.0.0.0:22" not in text


def test_counters_are_deltas_over_the_run_not_totals_since_boot(tmp_path):
    before = _snapshot("snapshot-server-mixed.txt")
    bumped = dict(before.counters)
    bumped["TcpExt.ListenOverflows"] = bumped.get("TcpExt.ListenOverflows", 0) + 4
    from harness.stats.snapshot import FrozenDict

    after = dataclasses.replace(before, counters=FrozenDict(bumped))
    text = state.markdown(_result(tmp_path, {"before": {"server": before}, "full": {"server": after}}))
    assert "Counters since `before`: TcpExt.ListenOverflows +4" in text
