"""The copy vs MSG_ZEROCOPY benchmark on the live lab: a short run has the right shape and draws its PNG."""

from __future__ import annotations

import pytest

from harness.perf.zerocopy import MODES, PATHS, measure, plot

# One worker runs the module (--dist loadgroup): the measurement all its tests read is made once, not once per worker.
pytestmark = [pytest.mark.vm, pytest.mark.xdist_group("zerocopy-bench")]

SIZES = (16384, 65536)


@pytest.fixture(scope="module")
def results(lab):
    return measure(lab, sizes=SIZES, seconds=0.2, repeats=1)  # the shape, not a figure: 0.2 s moves MBs a point


def test_every_path_mode_and_size_was_measured(results):
    rows = results.rows()
    assert {(r.path, r.mode, r.size) for r in rows} == {(p, m, s) for p in PATHS for m in MODES for s in SIZES}
    for row in rows:
        assert len(row.mbit_s) == 1
        assert row.median > 0, f"{row.path}/{row.mode}/{row.size} moved no data"


def test_zerocopy_sends_were_all_completed(results):
    for sample in results.samples:
        if sample.mode == "zerocopy":
            assert sample.sends > 0 and sample.completed == sample.sends, sample
        else:
            assert sample.completed == 0, sample


def test_the_kernel_copies_on_loopback_and_not_across_the_lab_segment(results):
    # skb_orphan_frags_rx() copies pages delivered to a local socket: every loopback id is COPIED.
    for size in SIZES:
        assert results.row("loopback", "zerocopy", size).copied_fraction == 1.0
    if results.lab_sg:  # virtio-net with a vnet_hdr tap gathers the user pages itself
        for size in SIZES:
            assert results.row("lab", "zerocopy", size).copied_fraction == 0.0


def test_ratios_and_table(results):
    for path in PATHS:
        for size in SIZES:
            assert results.ratio(path, size) > 0
    table = results.table()
    assert "loopback" in table and "lab" in table and str(SIZES[-1]) in table


def test_plot_writes_a_png(results, tmp_path):
    out = plot(results, tmp_path / "zerocopy.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.stat().st_size > 10_000
