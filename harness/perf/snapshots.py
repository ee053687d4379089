"""Benchmark: wall time of one snapshot of every lab VM taken in parallel (``python -m harness.perf.snapshots``).

The first snapshot also opens the kept-open stats shell on each VM, so it is
reported apart as the warm-up and left out of the figures.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

from harness.errors import SocklabError
from harness.lab.lifecycle import Lab
from harness.stats.collect import collect_many


@dataclass(frozen=True)
class BenchResult:
    """Milliseconds for one parallel snapshot of ``vms``, over ``samples`` repeats after a warm-up."""

    vms: tuple[str, ...]
    accel: str
    nics: tuple[str, ...] | None
    warmup_ms: float
    samples: tuple[float, ...]
    host_reference_ms: float   # a fixed pure-Python loop on the host, to tell a slow host from a slow collector
    load_average: float        # the host's 1-minute load when the run ended (2 cores here)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.samples)

    @property
    def min_ms(self) -> float:
        return min(self.samples)

    @property
    def max_ms(self) -> float:
        return max(self.samples)

    def describe(self) -> str:
        which = "every NIC" if self.nics is None else ", ".join(self.nics)
        return (f"snapshot of {' + '.join(self.vms)} ({self.accel}, ethtool -S on {which}): "
                f"median {self.median_ms:.0f} ms, min {self.min_ms:.0f} ms, max {self.max_ms:.0f} ms "
                f"over {len(self.samples)} runs; warm-up {self.warmup_ms:.0f} ms; "
                f"host reference loop {self.host_reference_ms:.0f} ms, load average {self.load_average:.2f}")


def host_reference_ms(iterations: int = 2_000_000) -> float:
    """Time of a fixed Python loop: the host's speed right now (this machine varies by tens of percent)."""
    started = time.perf_counter()
    total = 0
    for number in range(iterations):
        total += number
    return (time.perf_counter() - started) * 1000


def measure(lab: Lab, repeats: int = 7, names: Sequence[str] | None = None,
            nics: Sequence[str] | None = None, pause: float = 0.2) -> BenchResult:
    """Take ``repeats`` parallel snapshots of ``names`` (default: every VM) and time each."""
    if repeats < 1:
        raise ValueError("repeats must be at least 1")
    state = lab.require()
    names = tuple(names) if names is not None else tuple(vm.name for vm in state.vms)
    options = {} if nics is None else {"nics": tuple(nics)}
    warmup = collect_many(lab, names, **options).elapsed_ms
    samples = []
    for _ in range(repeats):
        time.sleep(pause)  # let the guests' TCG threads settle between runs, as between lab steps
        samples.append(collect_many(lab, names, **options).elapsed_ms)
    return BenchResult(names, state.accel, tuple(nics) if nics is not None else None, warmup,
                       tuple(samples), host_reference_ms(), os.getloadavg()[0])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.perf.snapshots", description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed snapshots after the warm-up (default 7)")
    parser.add_argument("--vm", action="append", dest="vms", help="VM to include (repeatable; default: all)")
    parser.add_argument("--nic", action="append", dest="nics",
                        help="run ethtool -S only on this NIC (repeatable; default: every NIC but lo)")
    args = parser.parse_args(argv)
    lab = Lab()
    try:
        result = measure(lab, args.repeats, args.vms, args.nics)
    except SocklabError as exc:
        print(f"socklab: {exc}", file=sys.stderr)
        return exc.exit_code
    finally:
        lab.close()
    print(result.describe())
    print("samples ms: " + " ".join(f"{s:.0f}" for s in result.samples))
    return 0


if __name__ == "__main__":
    sys.exit(main())
