"""A lab check: run a lab's scenarios on the kernel and the model, then its expectation template."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .. import load as textio
from ..errors import LabError
from ..lab.topology import topology as topology_of
from ..paths import REPO_ROOT, labs_dir as configured_labs_dir
from . import expect
from .format import Scenario, ScenarioError, declared_params, load
from .predict import model_view
from .runner import ModelBackend, RunAborted, RunResult, StepRecord, run, traced_options

# The checkout's own labs (tests read their guides); a lab is looked up in paths.labs_dir(),
# which is SOCKLAB_LABS, invoke's lab.labs_dir, or this.
LABS_DIR = REPO_ROOT / "labs"


@dataclass(frozen=True)
class LabSpec:
    """``labs/<name>/lab.yaml``: a title, the topology, the scenarios and the expectation template."""

    name: str
    directory: Path
    title: str
    topology: str
    scenarios: tuple[Path, ...]
    expected: Path | None
    # The lab's "write your own scenario" exercise, as lab.yaml gives it (harness.course.exercise reads it).
    exercise: Mapping[str, Any] | None = None

    @classmethod
    def load(cls, name: str, labs_dir: Path | None = None) -> "LabSpec":
        """A lab by name (``03-listen``) in ``labs_dir`` (default: paths.labs_dir()) or, when ``name``
        contains a slash, by its directory, which may be anywhere."""
        directory = _lab_directory(name, labs_dir if labs_dir is not None else configured_labs_dir())
        name = directory.name
        path = directory / "lab.yaml"
        where = str(path)
        data = textio.parse_yaml(textio.read_text(path, "lab description", error=ScenarioError), where,
                                 error=ScenarioError)
        if not isinstance(data, textio.YamlMap) or not data.get("scenarios"):
            raise ScenarioError(f"{path}:1: lab.yaml needs `title:` and a list of `scenarios:`")
        textio.check_keys(data, LAB_KEYS, where, error=ScenarioError)
        for key, kinds in LAB_KEYS.items():
            if key in data:
                textio.expect_type(data[key], kinds, where, data.line_of(key), key, error=ScenarioError)
        try:
            topology = topology_of(data.get("topology", "default"), base=directory).ref
        except LabError as exc:
            raise ScenarioError(f"{path}:{data.line_of('topology')}: {exc}") from None
        scenarios = []
        for index, item in enumerate(data["scenarios"]):
            textio.expect_type(item, str, where, data["scenarios"].line_of(index), "scenarios", error=ScenarioError)
            scenarios.append(textio.check_path(_inside(directory, item, where, "scenario"), "scenario", where,
                                               error=ScenarioError))
        expected = None
        if data.get("expected"):
            expected = textio.check_path(_inside(directory, data["expected"], where, "expectation template"),
                                         "expectation template", where, error=ScenarioError)
        exercise = data.get("exercise")  # its shape is harness.course.exercise's to check
        return cls(name, directory, str(data.get("title", name)), topology, tuple(scenarios), expected,
                   textio.plain(exercise) if exercise is not None else None)


LAB_KEYS: dict[str, tuple[type, ...]] = {"title": (str,), "topology": (str,), "scenarios": (list,),
                                         "expected": (str,), "minutes": (int, float), "article": (str,),
                                         "exercise": (dict,)}


def _lab_directory(name: str, labs_dir: Path) -> Path:
    """The directory of lab ``name``; a name that is not a lab is one line saying what exists."""
    # os.path's tests, not Path's: they answer False for a name too long for the file system too.
    known = known_labs(labs_dir)
    shown = name if len(name) <= 80 else name[:80] + "…"
    if "/" not in name:
        if name.isdigit() and not os.path.isdir(labs_dir / name):
            # `lab.check 03` for 03-listen: the number alone names a lab when it is unique.
            matches = sorted(labs_dir.glob(f"{int(name):02d}-*/lab.yaml"))
            if len(matches) == 1:
                return matches[0].parent
        if not os.path.isfile(labs_dir / name / "lab.yaml"):
            raise ScenarioError(f"unknown lab {shown!r}{textio.did_you_mean(name, known)}")
        return labs_dir / name
    directory = Path(name)
    if os.path.lexists(directory / "lab.yaml"):
        return directory
    hint = (f"; the lab {directory.name} is {labs_dir / directory.name} (a directory is taken relative to "
            f"{Path.cwd()})") if directory.name in known else f"; known labs: {', '.join(known) or 'none'}"
    if not os.path.exists(directory):
        where = os.path.abspath(directory) if len(name) <= 80 else "it"
        raise ScenarioError(f"no lab at {shown}: {where} does not exist{hint}")
    if not os.path.isdir(directory):
        raise ScenarioError(f"no lab at {shown}: it is a file, not a lab directory{hint}")
    raise ScenarioError(f"no lab at {shown}: the directory has no lab.yaml{hint}")


def _inside(directory: Path, relative: str, where: str, what: str) -> Path:
    """``directory/relative``, refusing a path that leaves the lab's directory."""
    path = directory / relative
    if Path(relative).is_absolute() or not path.resolve().is_relative_to(directory.resolve()):
        raise ScenarioError(f"{where}: {what} {relative!r} is outside the lab's directory")
    return path


def known_labs(labs_dir: Path | None = None) -> list[str]:
    """The labs in ``labs_dir`` (default: paths.labs_dir())."""
    return sorted(p.parent.name for p in (labs_dir if labs_dir is not None else configured_labs_dir()).glob("*/lab.yaml"))


@dataclass
class CheckReport:
    """Everything a check found: each scenario's run and each assertion's outcome."""

    title: str
    runs: list[RunResult] = field(default_factory=list)
    assertions: list[expect.AssertionOutcome] = field(default_factory=list)
    kernel: bool = True
    notes: list[str] = field(default_factory=list)
    # host -> kernel series the model ran each host on
    kernels: dict[str, str] = field(default_factory=dict)
    # The assertions' outcomes again, by scenario name (a predictions sheet asks per scenario).
    outcomes_by_scenario: dict[str, list[expect.AssertionOutcome]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        # An expectation the model cannot evaluate (a model-only check) neither passes nor fails.
        return all(r.ok for r in self.runs) and all(a.ok for a in self.assertions if a.predicted)

    @property
    def counts(self) -> dict[str, int]:
        verdicts = [rec.verdict for run in self.runs for rec in run.records if rec.verdict is not None]
        return {"steps": len(verdicts), "step_failures": sum(not verdict.ok for verdict in verdicts),
                "assertions": len(self.assertions),
                "assertion_failures": sum(not a.ok for a in self.assertions if a.predicted),
                "not_predicted": sum(not a.predicted for a in self.assertions)}


def lab_kernels(lab: Any) -> dict[str, str]:
    """The model series of each VM of the running lab (its kernel's release; a user's kernel maps to
    the newest series the model knows that is not newer)."""
    from ..model.versions import nearest_series

    kernels = {}
    for vm in lab.require().vms:
        if getattr(vm, "kernel", ""):
            try:
                kernels[vm.name] = nearest_series(vm.kernel)
            except ValueError as exc:
                raise LabError(f"{vm.name}: {exc}") from None
    return kernels


def lab_scatter_gather(lab: Any | None) -> bool:
    """Whether the lab NIC gathers pages: a tap segment does, the socket segment does not; no lab, the tap's answer."""
    return lab is None or lab.require().segment == "tap"


def run_scenario(scenario: Scenario, lab: Any | None, on_step: Callable[[StepRecord], None] | None = None,
                 scatter_gather: bool | None = None, model_kernel: str = "6.1", trace: Any = None,
                 agents: dict | None = None) -> RunResult:
    """One scenario on the model, and on the lab's kernels too when ``lab`` is given.

    With a lab, each host is modelled on its VM's kernel; without one, on ``model_kernel``.
    ``trace`` (TraceOptions) traces every call step on the kernel side; steps with
    ``trace:`` are traced either way. ``agents`` (a dict the caller keeps and finally
    gives to ``live.close_agents``) lets consecutive scenarios share their guest agents:
    each is reset after a scenario instead of ended, and a traced check arms once.
    """
    kernel = None
    kernels: dict[str, str] = {}
    if lab is not None:
        from .live import LabBackend

        kernels = lab_kernels(lab)
        # A lab may bring its own kernel side (the unit tests' stand-in for the guests).
        factory = getattr(lab, "scenario_backend", None)
        kernel = factory(scenario) if factory is not None else LabBackend(lab, scenario, agents)
        if scatter_gather is None:
            scatter_gather = lab_scatter_gather(lab)
    model = ModelBackend(scenario, scatter_gather=True if scatter_gather is None else scatter_gather,
                         kernels=kernels, kernel=model_kernel)
    result: RunResult | None = None
    closing = None
    try:
        traced_hosts = sorted({step.host for step in scenario.steps if traced_options(step, trace) is not None})
        start = getattr(kernel, "start_agents", None)
        if start is not None:
            try:
                start(traced_hosts)
            except LabError as exc:
                # Nothing ran yet; the run is reported as aborted like any other.
                result = RunResult(scenario, error=f"starting the guest agents: {exc}")
        if kernel is not None and result is None:
            try:
                kernel.apply_sysctls()
            except LabError as exc:
                result = RunResult(scenario, error=f"setting the scenario's sysctls: {exc}")
        if result is None and kernel is not None and traced_hosts:
            kernel.arm_tracing(traced_hosts)  # a refusal (TraceError) stops the check: nothing ran yet
        if result is None:
            try:
                result = run(scenario, kernel, model, on_step, trace)
            except RunAborted as exc:
                result = exc.result
    except BaseException:
        if kernel is not None and hasattr(kernel, "faulted"):
            kernel.faulted = True  # whatever stopped the run (a refused trace, Ctrl-C): no agent is reused
        raise
    finally:
        if kernel is not None:
            closing = _close(kernel)
    if closing:
        # Not the run's error (its result stands), but the lab may keep what the scenario changed.
        result.diagnosis.append(f"{closing} (sockets and sysctls of the scenario may be left on the guest)")
    return result


def _close(kernel: Any) -> str | None:
    """Close the agents; what went wrong, if anything (a dead VM's agent cannot be closed cleanly)."""
    try:
        kernel.close()
    except LabError as exc:
        return str(exc)
    return None


def prepare(spec: LabSpec, overrides: Mapping[str, Any] | None = None, scatter_gather: bool = True) -> list[Scenario]:
    """Load and check everything a lab check will use, before any VM is touched (or booted)."""
    hosts = topology_of(spec.topology).vms
    scenarios = [load(path, _overrides_for(path, overrides), known_hosts=hosts, scatter_gather=scatter_gather)
                 for path in spec.scenarios]
    unused = set(overrides or {}) - {key for scenario in scenarios for key in scenario.params}
    if unused:
        raise ScenarioError(f"--param {', '.join(sorted(unused))}: no scenario of lab {spec.name} has it")
    if spec.expected is not None:
        for scenario in scenarios:  # a broken template stops the check before anything runs
            expect.precheck(spec.expected, scenario.params, scenario.hosts, scatter_gather)
    return scenarios


def check(spec: LabSpec, lab: Any | None, overrides: Mapping[str, Any] | None = None,
          on_step: Callable[[StepRecord], None] | None = None, model_kernel: str = "6.1",
          trace: Any = None, scatter_gather: bool | None = None) -> CheckReport:
    """Run every scenario of ``spec``; with a lab, evaluate the expectation template over the kernel's run.

    ``scatter_gather`` is the lab NIC's, from the lab's segment unless given (the model alone: True).
    """
    report = CheckReport(spec.title, kernel=lab is not None)
    if scatter_gather is None:
        scatter_gather = lab_scatter_gather(lab)
    scenarios = prepare(spec, overrides, scatter_gather)
    kernels = lab_kernels(lab) if lab is not None else {host: model_kernel for host in _hosts(spec)}
    report.kernels = kernels
    # The scenarios share their guest agents (reset between them, ended after the last): a
    # check pays each agent's start, and a traced check the tracer's arming, once.
    agents: dict = {}
    try:
        for index, scenario in enumerate(scenarios):
            result = run_scenario(scenario, lab, on_step, scatter_gather, model_kernel=model_kernel, trace=trace,
                                  agents=agents)
            report.runs.append(result)
            report.notes += [f"{scenario.name}: {finding}" for finding in result.diagnosis]
            gone = _gone_vms(lab) if result.error else []
            if gone and index + 1 < len(scenarios):
                # Every further scenario would fail the same way; say so once.
                report.notes.append(f"not run: {', '.join(s.name for s in scenarios[index + 1:])} "
                                    f"({', '.join(gone)} no longer running; `invoke lab.down` then `invoke lab.up`)")
                break
    finally:
        if agents:
            from .live import close_agents

            try:
                close_agents(agents)
            except LabError as exc:
                report.notes.append(f"{exc} (sockets and sysctls of the last scenario may be left on the guest)")
    if spec.expected is None:
        return report
    for scenario, result in zip(scenarios, report.runs):
        if result.error:
            continue
        if lab is not None:
            sysctls = {host: snap.sysctls for host, snap in next(iter(result.kernel_snapshots.values()), {}).items()}
        else:  # the guests' defaults with the scenario's own settings, as the model ran
            sysctls = {host: expect.default_sysctls(scenario.sysctls.get(host)) for host in scenario.hosts}
        variables = {**scenario.params, "sysctl": sysctls, "kernel": expect.KernelRules(kernels),
                     "scatter_gather": scatter_gather}
        assertions = expect.load(spec.expected, variables)
        predicted = expect.evaluate(assertions, expect.context(model_view(result, sysctls), scenario.params, sysctls))
        if lab is None:
            outcomes = predicted
        else:
            outcomes = [replace(kernel, model=_shown(model)) for kernel, model in zip(
                expect.evaluate(assertions, expect.context(result, scenario.params, sysctls)), predicted)]
        report.outcomes_by_scenario[scenario.name] = outcomes
        report.assertions += outcomes
    if lab is None and any(not a.predicted for a in report.assertions):
        missing = sum(not a.predicted for a in report.assertions)
        report.notes.append(f"{missing} of {len(report.assertions)} expectations read figures the model does "
                            "not predict (marked 'not predicted'); the lab's kernels show them")
    return report


def _hosts(spec: LabSpec) -> tuple[str, ...]:
    return topology_of(spec.topology).vms


def _shown(outcome: expect.AssertionOutcome) -> str:
    """The model's value for an assertion, as a report shows it; "" when it does not predict it."""
    if not outcome.predicted or outcome.error:
        return ""
    return repr(outcome.value)


def _gone_vms(lab: Any) -> list[str]:
    """The lab's VMs whose QEMU is no longer running."""
    try:
        return [name for name, up in lab.alive(lab.require()).items() if not up]
    except (AttributeError, LabError):
        return []


def _overrides_for(path: Path, overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """Only the overrides this scenario declares (a lab's scenarios may take different params)."""
    declared = declared_params(path)
    return {key: value for key, value in (overrides or {}).items() if key in declared}
