"""``invoke bench``: the figures socklab promises, each the median of several runs, with the alternative beside it.

Every figure is measured here, in this run; nothing is copied from elsewhere.
The lab-level figures use a lab of their own (own home, netns and taps; the
same image and snapshots), so a running lab is left alone.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness import progress
from harness.image import build as image
from harness.image.kernel import Boot
from harness.lab.lifecycle import Lab
from harness.lab.topology import topology
from harness.paths import Paths
from harness.perf import peer
from harness.vm import qemu

if TYPE_CHECKING:
    from rich.table import Table

SECTIONS = ("build", "boot", "kernels", "latency", "stats", "model", "check", "trace", "memory", "fuzz")
TRACE_LABS = ("03-listen", "01-sockets-are-files")  # checks timed traced and untraced: three scenarios, and one


@dataclass(frozen=True)
class Figure:
    """One measured quantity: its samples, and (optionally) the alternative measured beside it."""

    name: str
    unit: str
    samples: tuple[float, ...]
    alternative: str = ""
    alternative_samples: tuple[float, ...] = ()
    note: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def alternative_median(self) -> float | None:
        return statistics.median(self.alternative_samples) if self.alternative_samples else None

    @property
    def ratio(self) -> float | None:
        """How many times the alternative's median this figure's median is (below 1: faster)."""
        other = self.alternative_median
        return self.median / other if other else None

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(median=self.median, min=min(self.samples), max=max(self.samples),
                    alternative_median=self.alternative_median, ratio=self.ratio)
        return data


@dataclass(frozen=True)
class Ratio:
    """One figure's median over another's, both measured in this run."""

    name: str
    numerator: str
    denominator: str
    value: float


@dataclass
class Bench:
    """A bench run: its figures in order, the ratios between them, and where it ran."""

    figures: list[Figure] = field(default_factory=list)
    host: dict[str, Any] = field(default_factory=dict)
    ratios: list[Ratio] = field(default_factory=list)

    def add(self, figure: Figure) -> None:
        self.figures.append(figure)
        alt = f"; {figure.alternative} {figure.alternative_median:.4g} {figure.unit}" if figure.alternative else ""
        progress.say(f"  {figure.name}: {figure.median:.4g} {figure.unit}{alt}")

    def figure(self, name: str) -> Figure | None:
        return next((figure for figure in self.figures if figure.name == name), None)

    def add_ratio(self, name: str, numerator: str, denominator: str) -> None:
        """``numerator``'s median over ``denominator``'s; left out (silently) when either figure is missing."""
        top, bottom = self.figure(numerator), self.figure(denominator)
        if top is None or bottom is None or not bottom.median:
            return
        self.ratios.append(Ratio(name, numerator, denominator, top.median / bottom.median))
        progress.say(f"  {name}: {top.median / bottom.median:.2f}×")


def _timed(fn: Callable[[], Any]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def host_facts() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "load_1min": os.getloadavg()[0], "time": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def load_1min() -> float:
    return os.getloadavg()[0]


BENCH_LAB = "bench"


def own_lab(paths: Paths, home: Path) -> Lab:
    """A lab of the bench's own (named ``bench``): same image and snapshots, its own netns, taps and run dir."""
    own = Lab(Paths(images=paths.images, home=home, cache_dir=paths.cache), BENCH_LAB)
    shutil.copytree(paths.keys, own.paths.keys, dirs_exist_ok=True)
    probe = paths.home / "accel-probe.json"
    if probe.exists():
        shutil.copy(probe, own.paths.home / "accel-probe.json")
    return own


def bench_build(bench: Bench, paths: Paths, repeats: int) -> None:
    """Cold image builds of every recipe into a scratch cache, and the no-op build of the real cache."""
    cached = [_timed(lambda: image.build(paths)) for _ in range(max(repeats, 5))]
    for recipe in image.recipes(paths.images):
        cold = []
        for _ in range(repeats):
            with tempfile.TemporaryDirectory(prefix="socklab-bench-cache-", dir=paths.cache.parent) as scratch:
                os.environ["SOCKLAB_CACHE"] = scratch
                try:
                    cold.append(_timed(lambda: image.build(paths, recipe.name)))  # noqa: B023 - called at once
                finally:
                    del os.environ["SOCKLAB_CACHE"]
        if recipe.name == "bookworm":
            bench.add(Figure("image build, cached (no-op)", "s", tuple(cached), "cold build", tuple(cold)))
        bench.add(Figure(f"image build of {recipe.name} ({recipe.kernel}), cold", "s", tuple(cold)))


# The boot section's figures; the ratios below name them.
WARM2 = "both VMs SSH-ready, restored from snapshot"
COLD2 = "both VMs SSH-ready, cold boot"
UP2 = "whole lab.up of both VMs, restored from snapshot"
COLD1 = "one VM (topology single) SSH-ready, cold boot"
WARM1 = "one VM (topology single) SSH-ready, restored from snapshot"
FLOOR = "the floor: bare QEMU, same kernel, initrd and VM shape, start → first userspace line"
PEER = "virtme-ng, its defaults: boot → `true` → exit"
PEER_SHAPED = "virtme-ng in socklab's VM shape: boot → `true` → exit"
BOOT_RATIOS = (
    ("socklab cold (1 VM) / floor", COLD1, FLOOR),
    ("socklab cold (2 VMs) / floor", COLD2, FLOOR),
    ("socklab cold (1 VM) / virtme-ng in socklab's shape", COLD1, PEER_SHAPED),
    ("socklab cold (1 VM) / virtme-ng defaults", COLD1, PEER),
    ("socklab warm (1 VM, SSH-ready) / floor", WARM1, FLOOR),
    ("socklab warm (whole lab.up, 2 VMs) / floor", UP2, FLOOR),
)


@dataclass
class Contender:
    """One thing the boot section times once per round: ``run`` returns its samples, by figure name.

    An optional contender (virtme-ng) that fails is dropped from the remaining
    rounds, with one line saying why; any other failure stops the bench.
    """

    name: str
    run: Callable[[], dict[str, float]]
    optional: bool = False
    failed: str = ""


def run_rounds(contenders: list[Contender], repeats: int, say: Callable[[str], None] = progress.say,
               load: Callable[[], float] | None = None) -> tuple[dict[str, list[float]], list[float]]:
    """Every contender once per round, each round starting one further along, so a change of load hits all alike.

    Returns the samples by figure name, and the 1-minute load before each round and after the last.
    """
    load = load or load_1min
    samples: dict[str, list[float]] = {}
    loads: list[float] = []
    active = list(contenders)
    for index in range(repeats):
        loads.append(load())
        shift = index % len(active) if active else 0
        for contender in active[shift:] + active[:shift]:
            try:
                measured = contender.run()
            except peer.PeerError as exc:
                if not contender.optional:
                    raise
                contender.failed = str(exc)
                active.remove(contender)
                say(f"  {contender.name}: cannot run here ({exc}); the bench goes on without it")
                continue
            for name, seconds in measured.items():
                samples.setdefault(name, []).append(seconds)
    loads.append(load())
    return samples, loads


def socklab_boots(lab: Lab, topology_name: str, cold_name: str, warm_name: str,
                  up_name: str = "") -> Callable[[], dict[str, float]]:
    """A cold boot of the topology, then a restore of its snapshot: first QEMU start to SSH-ready, and lab.up's wall clock."""
    def run() -> dict[str, float]:
        state, _ = lab.up(topology_name, cold=True)
        cold = state.boot_seconds
        lab.down()
        started = time.perf_counter()
        state, _ = lab.up(topology_name)
        whole = time.perf_counter() - started
        if state.boot_mode != "restored from snapshot":
            raise RuntimeError(f"topology {topology_name}: expected a restore, got a {state.boot_mode}")
        lab.down()
        return {cold_name: cold, warm_name: state.boot_seconds, **({up_name: whole} if up_name else {})}
    return run


def peer_contenders(bench: Bench, workdir: Path, boot: Boot, accel: str, shape: peer.Shape) -> list[Contender]:
    """virtme-ng with its defaults and in socklab's shape, or none (and one line saying why)."""
    found = peer.peer_problem(workdir)
    if isinstance(found, str):
        bench.host["peer"] = f"skipped: {found}"
        progress.say(f"  virtme-ng: {found}; the bench goes on without it")
        return []
    try:
        kernel = peer.stage_kernel(boot.image, workdir)
    except peer.PeerError as exc:
        bench.host["peer"] = f"skipped: {exc}"
        progress.say(f"  virtme-ng: {exc}; the bench goes on without it")
        return []
    bench.host["peer"] = ", ".join(part for part in (peer.version(found), found.note) if part)
    progress.say(f"  virtme-ng: {bench.host['peer']}")
    return [Contender(PEER, lambda: {PEER: peer.time_vng(found, peer.vng_argv(found, kernel, accel), workdir)},
                      optional=True),
            Contender(PEER_SHAPED, lambda: {PEER_SHAPED: peer.time_vng(found, peer.vng_argv(found, kernel, accel, shape),
                                                                       workdir)}, optional=True)]


def bench_boot(bench: Bench, lab: Lab, repeats: int) -> None:
    """socklab's boots (two VMs and one) beside the bare-QEMU floor and virtme-ng, interleaved round by round."""
    for name in ("default", "single"):  # makes sure both topologies' snapshots exist
        state, _ = lab.up(name)
        lab.down()
    single = topology("single")
    guest = single.guests[0]
    shape = peer.Shape(state.accel, guest.memory_mib, guest.cpus)
    boot = lab.boots(single)[guest.name]
    floor_argv = peer.floor_argv(boot.kernel, boot.initrd, shape)
    with tempfile.TemporaryDirectory(prefix="socklab-bench-peer-") as workdir:
        contenders = [
            Contender("socklab, 2 VMs", socklab_boots(lab, "default", COLD2, WARM2, UP2)),
            Contender("socklab, 1 VM", socklab_boots(lab, "single", COLD1, WARM1)),
            Contender("floor", lambda: {FLOOR: peer.time_floor(floor_argv)}),
            *peer_contenders(bench, Path(workdir), boot, state.accel, shape),
        ]
        samples, loads = run_rounds(contenders, repeats)
    bench.host["boot_loads"] = loads
    shaped = f"{shape.accel}, -cpu {qemu.cpu_model(shape.accel)}, {shape.memory_mib} MiB, {shape.cpus} vCPU"
    restored = "sshd's banner on the forward and the wake on ttyS1 (reseed, clock, segment); the first command logs in"
    notes = {UP2: f"lab.up's wall clock: image digests, restore, {restored}", WARM2: restored, WARM1: restored,
             FLOOR: f"{shaped}; rdinit prints one line; no disk, NIC or SSH",
             PEER_SHAPED: shaped, PEER: "host root over virtio-fs, socklab's kernel; KVM off as for socklab"}
    for name in (COLD2, WARM2, UP2, COLD1, WARM1, FLOOR, PEER, PEER_SHAPED):
        if name in samples:
            alternative = ("cold boot", tuple(samples[COLD2])) if name == WARM2 else ("", ())
            bench.add(Figure(name, "s", tuple(samples[name]), *alternative, note=notes.get(name, "TCG" if shape.accel == "tcg" else "")))
    for ratio in BOOT_RATIOS:
        bench.add_ratio(*ratio)
    progress.say(f"  1-minute load over the rounds: {' → '.join(f'{value:.1f}' for value in loads)}")


def bench_kernels(bench: Bench, paths: Paths, lab: Lab, repeats: int) -> None:
    """Per kernel (every recipe): both VMs cold-booted and restored to SSH-ready, alternating, one kernel at a time."""
    for recipe in sorted(image.recipes(paths.images), key=lambda r: tuple(int(x) for x in r.kernel.split("."))):
        image.build(paths, recipe.name)
        lab.up("default", kernel=recipe.name)  # makes sure this kernel's snapshots exist
        lab.down()
        cold, warm = [], []
        for _ in range(repeats):
            state, _ = lab.up("default", kernel=recipe.name, cold=True)
            cold.append(state.boot_seconds)
            lab.down()
            state, _ = lab.up("default", kernel=recipe.name)
            if state.boot_mode != "restored from snapshot":
                raise RuntimeError(f"kernel {recipe.kernel}: expected a restore, got a {state.boot_mode}")
            warm.append(state.boot_seconds)
            lab.down()
        bench.add(Figure(f"kernel {recipe.kernel} ({recipe.name}): both VMs restored to SSH-ready", "s", tuple(warm),
                         "cold boot", tuple(cold), note="TCG; one kernel's lab at a time"))


def bench_latency(bench: Bench, lab: Lab, repeats: int) -> None:
    """One guest call three ways: an agent step, an exec on the kept SSH connection, a new ssh process."""
    from harness.guest.client import measure_latency

    report = measure_latency(lab, "server", n=max(20, repeats * 10), n_ssh_process=max(5, repeats * 3))
    agent, exec_, spawn = report.agent_step, report.paramiko_exec, report.ssh_process
    bench.add(Figure("agent step round trip", "ms", agent.samples_ms, "paramiko exec of `true`", exec_.samples_ms))
    bench.add(Figure("paramiko exec of `true`, kept connection", "ms", exec_.samples_ms,
                     "new ssh process per command", spawn.samples_ms))


def bench_stats(bench: Bench, lab: Lab, repeats: int) -> None:
    from harness.perf.snapshots import measure

    result = measure(lab, repeats=max(7, repeats))
    bench.add(Figure("stats snapshot of both VMs", "ms", tuple(result.samples)))


def bench_model(bench: Bench, repeats: int) -> None:
    from harness.model.bench import measure

    samples = tuple(measure(n_calls=100_000, repeats=1)["median"] for _ in range(max(3, repeats)))
    bench.add(Figure("model throughput (CPU time)", "syscalls/s", samples))
    big = tuple(scenario_seconds(20_000) for _ in range(repeats))
    half = tuple(scenario_seconds(10_000) for _ in range(repeats))
    bench.add(Figure("20,000-step scenario: parse + model run", "s", big, alternative="10,000 steps",
                     alternative_samples=half, note="target < 10 s; linear: about twice the 10,000-step time"))


# One connection's lifetime, repeated by a template loop: how a user generates a long scenario.
BIG_SCENARIO = """name: generated
hosts: [server, client]
params: {rounds: 1}
---
steps:
  - {on: server, call: socket, args: {family: AF_INET, type: SOCK_STREAM}, as: l}
  - {on: server, call: bind, args: {fd: $l, addr: [0.0.0.0, 7000]}}
  - {on: server, call: listen, args: {fd: $l, backlog: 4096}}
{% for i in range(rounds) %}
  - {on: client, call: socket, args: {family: AF_INET, type: SOCK_STREAM}, as: c{{ i }}}
  - {on: client, call: connect, args: {fd: $c{{ i }}, addr: [198.51.100.1, 7000]}}
  - {on: server, call: accept, args: {fd: $l}, as: a{{ i }}}
  - {on: client, call: send, args: {fd: $c{{ i }}, length: 100}}
  - {on: server, call: recv, args: {fd: $a{{ i }}, length: 100}}
  - {on: client, call: close, args: {fd: $c{{ i }}}}
  - {on: server, call: close, args: {fd: $a{{ i }}}}
{% endfor %}
"""
BIG_SCENARIO_STEPS_PER_ROUND = 7


def scenario_seconds(steps: int) -> float:
    """Wall-clock seconds to load (read, render, parse, check) and run on the model a generated scenario of ``steps``."""
    from harness.scenario.check import run_scenario
    from harness.scenario.format import load

    with tempfile.TemporaryDirectory(prefix="socklab-bench-") as tmp:
        path = Path(tmp, "generated.yaml")
        path.write_text(BIG_SCENARIO)
        started = time.perf_counter()
        scenario = load(path, {"rounds": (steps - 3) // BIG_SCENARIO_STEPS_PER_ROUND})
        result = run_scenario(scenario, None)
        elapsed = time.perf_counter() - started
    if not result.ok:
        raise RuntimeError(f"the generated scenario failed on the model: {result.error}")
    return elapsed


def bench_fuzz(bench: Bench, lab: Lab | None, repeats: int) -> None:
    """Differential throughput (issue 16): batched live steps/s on one VM, the fuzzer's live and model rates."""
    from harness.fuzz import bench as fuzz_bench

    runs = max(3, repeats)
    if lab is None:
        samples = tuple(fuzz_bench.model_programs() for _ in range(runs))
        bench.add(Figure("fuzz programs on the model", "steps/s", samples))
        return
    pairs = [fuzz_bench.live_batched(lab) for _ in range(runs)]
    bench.add(Figure(f"live steps, one batch of {fuzz_bench.BATCH_STEPS} on one VM", "steps/s",
                     tuple(p[0] for p in pairs), "one round trip per step", tuple(p[1] for p in pairs),
                     note="TCG; goal >= 1,000 steps/s per VM"))
    bench.add(Figure("lab.fuzz live segments (both VMs, root and student)", "steps/s",
                     tuple(fuzz_bench.fuzz_live(lab) for _ in range(runs))))


def bench_check(bench: Bench, lab: Lab, repeats: int) -> None:
    from harness.scenario.check import LabSpec, check, known_labs

    for name in known_labs():
        spec = LabSpec.load(name)
        samples, failed = [], 0
        for _ in range(repeats):
            started = time.perf_counter()
            report = check(spec, lab)
            samples.append(time.perf_counter() - started)
            failed += not report.ok
        # A failing check still took its time; the figure says so rather than stopping the bench.
        bench.add(Figure(f"lab.check {name}, end to end", "s", tuple(samples),
                         note=f"{failed} of {repeats} runs FAILED" if failed else ""))


def bench_trace(bench: Bench, lab: Lab, repeats: int) -> None:
    """A traced step against the same step untraced, and a traced lab check against an untraced one."""
    from harness.guest.client import Agent
    from harness.scenario.check import LabSpec, check
    from harness.guest.trace import TraceOptions

    with Agent(lab.ssh("server"), "server", timeout=60) as agent:
        pid = agent.hello["pid"]
        agent.call("trace_arm")

        def step(traced: bool) -> float:
            fd = agent.call("socket", family=2, type=1).ret
            started = time.perf_counter()
            if traced:  # as LabBackend.call_traced does for a root step: begin posted, end read
                agent.post("trace_begin", {"pid": pid, "depth": 6, "functions": ["inet_csk_listen_start"]})
            agent.call("listen", fd=fd, backlog=4)
            if traced:
                agent.call("trace_end")
            elapsed = time.perf_counter() - started
            agent.call("close", fd=fd)
            return elapsed * 1000

        n = max(20, repeats * 10)
        untraced, traced = [], []
        for _ in range(n):  # alternating, so load changes hit both alike
            untraced.append(step(False))
            traced.append(step(True))
    bench.add(Figure("listen() step, traced (trace_begin posted, step, trace_end)", "ms", tuple(traced),
                     "the same step untraced", tuple(untraced), note="tracer armed once beforehand"))
    for name in TRACE_LABS:
        spec = LabSpec.load(name)
        plain, with_trace, failed = [], [], 0
        for _ in range(repeats):  # alternating, so load changes hit both alike
            started = time.perf_counter()
            failed += not check(spec, lab).ok
            plain.append(time.perf_counter() - started)
            started = time.perf_counter()
            failed += not check(spec, lab, trace=TraceOptions()).ok
            with_trace.append(time.perf_counter() - started)
        bench.add(Figure(f"lab.check {name} --trace, end to end", "s", tuple(with_trace),
                         f"lab.check {name} untraced", tuple(plain),
                         note=(f"{failed} runs FAILED; " if failed else "") + "every call step traced, depth 6; "
                         "arming and restoring the tracer on each VM included"))


def bench_memory(bench: Bench, lab: Lab) -> None:
    state = lab.require()
    rss = []
    for vm in state.vms:
        for line in Path(f"/proc/{vm.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss.append(int(line.split()[1]) / 1024)
    bench.add(Figure("host memory (RSS) per VM", "MiB", tuple(rss), note="guest RAM 512 MiB, TCG"))


def run(paths: Paths, repeats: int = 3, only: tuple[str, ...] = SECTIONS) -> Bench:
    bench = Bench(host=host_facts())
    try:
        _run_sections(bench, paths, repeats, only)
    finally:
        bench.host["load_1min_end"] = load_1min()
    return bench


def _run_sections(bench: Bench, paths: Paths, repeats: int, only: tuple[str, ...]) -> None:
    if "build" in only:
        progress.say("image builds")
        bench_build(bench, paths, 1 if repeats < 3 else repeats)
    if "model" in only:
        progress.say("model")
        bench_model(bench, repeats)
    if "fuzz" in only:
        progress.say("fuzz on the model")
        bench_fuzz(bench, None, repeats)
    lab_sections = [s for s in only if s in ("boot", "kernels", "latency", "stats", "check", "trace", "memory", "fuzz")]
    if not lab_sections:
        return
    with tempfile.TemporaryDirectory(prefix="socklab-bench-") as home:
        lab = own_lab(paths, Path(home))
        try:
            if "boot" in lab_sections:
                progress.say("boot: socklab cold and restored, the bare-QEMU floor, virtme-ng; interleaved")
                bench_boot(bench, lab, repeats)
            if "kernels" in lab_sections:
                progress.say("cold boot vs restore per kernel")
                bench_kernels(bench, paths, lab, repeats)
            if not set(lab_sections) & {"latency", "stats", "check", "trace", "memory", "fuzz"}:
                return
            lab.up("default")
            for section in ("latency", "stats", "check", "trace", "memory", "fuzz"):
                if section in lab_sections:
                    progress.say(section)
                    {"latency": lambda: bench_latency(bench, lab, repeats),
                     "stats": lambda: bench_stats(bench, lab, repeats),
                     "check": lambda: bench_check(bench, lab, repeats),
                     "trace": lambda: bench_trace(bench, lab, repeats),
                     "memory": lambda: bench_memory(bench, lab),
                     "fuzz": lambda: bench_fuzz(bench, lab, repeats)}[section]()
        finally:
            lab.down()


def save(bench: Bench, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"host": bench.host, "figures": [f.as_dict() for f in bench.figures],
                                "ratios": [asdict(ratio) for ratio in bench.ratios]}, indent=2) + "\n")
    return path


def table(bench: Bench) -> Table:
    from rich.table import Table

    out = Table(title=f"socklab bench ({bench.host.get('cpus')} CPUs, {load_span(bench)})", title_justify="left")
    for column in ("figure", "median", "min", "max", "n", "alternative (median)", "ratio"):
        out.add_column(column)
    for figure in bench.figures:
        alt = f"{figure.alternative}: {figure.alternative_median:.4g} {figure.unit}" if figure.alternative else ""
        out.add_row(figure.name, f"{figure.median:.4g} {figure.unit}", f"{min(figure.samples):.4g}",
                    f"{max(figure.samples):.4g}", str(len(figure.samples)), alt,
                    f"{figure.ratio:.2f}×" if figure.ratio else "")
    return out


def load_span(bench: Bench) -> str:
    """The host's 1-minute load at the bench's start and end: ``load 5.1 → 6.3``."""
    start, end = bench.host.get("load_1min", 0.0), bench.host.get("load_1min_end")
    return f"load {start:.1f}" + (f" → {end:.1f}" if end is not None else "")


def ratios_table(bench: Bench) -> Table:
    """The ratios of medians, each named by its two figures."""
    from rich.table import Table

    out = Table(title=f"ratios of medians, same run ({load_span(bench)})", title_justify="left")
    for column in ("ratio", "value", "medians"):
        out.add_column(column)
    for ratio in bench.ratios:
        top, bottom = bench.figure(ratio.numerator), bench.figure(ratio.denominator)
        medians = f"{top.median:.4g} {top.unit} / {bottom.median:.4g} {bottom.unit}" if top and bottom else ""
        out.add_row(ratio.name, f"{ratio.value:.2f}×", medians)
    return out
