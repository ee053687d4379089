"""Tables for the terminal: the lab's status."""

from __future__ import annotations

import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from rich.table import Table

from harness.errors import SocklabError


def offloads(lab, name: str) -> tuple[str, str]:
    """(scatter-gather, tx-checksumming) of the guest's lab NIC: as a restore's wake just read them, else
    from the guest's own ethtool -k (the stats parser)."""
    woken = getattr(lab, "woken_offloads", None)
    known = woken(name) if woken is not None else None
    if known is not None:
        return known
    from harness.stats.ethtool import parse_ethtool_features
    from harness.stats.snapshot import Feature

    try:
        result = lab.ssh(name, timeout=5).run("ethtool -k lab0", timeout=10, check=True)
        features: Mapping[str, Feature] = parse_ethtool_features(result.stdout).get("lab0", {})
    except SocklabError:
        return "?", "?"

    def shown(feature: str) -> str:
        return ("on" if features[feature].enabled else "off") if feature in features else "?"

    return shown("scatter-gather"), shown("tx-checksumming")


def vm_facts(lab, state, live: bool) -> list[tuple[bool, bool, tuple[str, str] | None]]:
    """(running, paused, offloads or None) of every VM, the guests asked at once.

    A stopped QEMU or a paused guest answers no SSH: it is not asked, and says so.
    """
    alive = lab.alive(state)

    def facts(vm) -> tuple[bool, bool, tuple[str, str] | None]:
        running = alive.get(vm.name, False)
        paused = bool(running and hasattr(lab, "paused") and lab.paused(vm))
        return running, paused, offloads(lab, vm.name) if (live and running and not paused) else None

    if len(state.vms) < 2:
        return [facts(vm) for vm in state.vms]
    with ThreadPoolExecutor(max_workers=len(state.vms), thread_name_prefix="socklab-status") as pool:
        return list(pool.map(facts, state.vms))


def vm_kernel(vm) -> str:
    """The kernel a VM runs as ``lab.status`` shows it: its release, marked when it is the user's own."""
    if not vm.kernel:
        return "-"
    return f"{vm.kernel} (own)" if vm.kernel_image else vm.kernel


def kernel_notes(state) -> list[str]:
    """One caption line per image the VMs boot: recipe, suite and the kernel package version it resolved."""
    from harness.image.build import Image

    lines = []
    for directory in sorted({vm.image for vm in state.vms if vm.image}):
        try:
            img = Image.load(Path(directory))
        except Exception:  # noqa: BLE001 - a status line must not fail on a pruned or unreadable manifest
            continue
        users = ", ".join(vm.name for vm in state.vms if vm.image == directory)
        package = f" {img.kernel_package}" if img.kernel_package else ""
        lines.append(f"{users}: image {Path(directory).name} ({img.suite or img.recipe}), "
                     f"linux-image-{img.kernel_release}{package}")
    lines += [f"{vm.name}: own kernel {vm.kernel_image}" for vm in state.vms if vm.kernel_image]
    return lines


# `invoke lab.status --json`: one object. Keys (docs/cli.md repeats them):
#   lab, id, topology, accel, accel_reason, segment, segment_reason, netns, ready, boot_mode,
#   boot_seconds, uptime_seconds (null before the lab started), kernel_notes (list of lines),
#   vms: [{name, kernel, own_kernel, pid, state ("running" | "paused" | "dead"), ssh_port,
#          address, sg, tx_csum ("on" | "off" | "?" when unknown, null without --live or when
#          the VM does not answer)}]
# `--json` without a lab prints {"lab": NAME, "running": false}; with one, "running" is true.
def status_record(lab, state, live: bool = True) -> dict:
    """The lab's status as data: what status_table shows, by the keys above."""
    vms = []
    for vm, (running, paused, offload) in zip(state.vms, vm_facts(lab, state, live)):
        sg, csum = offload or (None, None)
        vms.append({"name": vm.name, "kernel": vm.kernel or None, "own_kernel": vm.kernel_image or None,
                    "pid": vm.pid or None, "state": "paused" if paused else "running" if running else "dead",
                    "ssh_port": vm.ssh_port, "address": vm.address, "sg": sg, "tx_csum": csum})
    return {"lab": getattr(state, "name", "default"), "running": True, "id": state.lab_id,
            "topology": state.topology, "accel": state.accel, "accel_reason": state.accel_reason,
            "segment": state.segment, "segment_reason": state.segment_reason, "netns": state.netns or None,
            "ready": state.ready, "boot_mode": state.boot_mode, "boot_seconds": state.boot_seconds,
            "uptime_seconds": round(time.time() - state.started_at, 1) if state.started_at else None,
            "kernel_notes": kernel_notes(state), "vms": vms}


def status_table(lab, state, live: bool = True) -> Table:
    name = getattr(state, "name", "default")
    table = Table(title=f"socklab lab {name!r}: {state.lab_id} ({state.topology})", title_justify="left")
    for column in ("VM", "kernel", "pid", "state", "SSH", "lab0", "up", "sg", "tx-csum"):
        table.add_column(column, overflow="fold")
    uptime = f"{time.time() - state.started_at:.0f} s" if state.started_at else "-"
    for vm, (running, paused, offload) in zip(state.vms, vm_facts(lab, state, live)):
        sg, csum = offload or ("-", "-")
        shown = "[yellow]paused[/]" if paused else "running" if running else "[red]dead[/]"
        table.add_row(vm.name, vm_kernel(vm), str(vm.pid or "-"), shown,
                      f":{vm.ssh_port}", vm.address, uptime, sg, csum)
    table.caption = ("".join(f"{line}\n" for line in kernel_notes(state)) +
                     f"accelerator {state.accel}: {state.accel_reason}\n"
                     f"segment {state.segment}: {state.segment_reason}"
                     + (f"\nnetns {state.netns}" if state.netns else ""))
    table.caption_justify = "left"
    return table


# -- lab checks ------------------------------------------------------------------------------


def _verdict_text(record) -> str:
    if record.verdict is None:
        return ""
    if record.verdict.ok:
        return "[green]ok[/]" + (f" ({record.verdict.notes[0]})" if record.verdict.notes else "")
    return "[red]FAIL[/] " + "; ".join(record.verdict.problems)


BLIND_NOTE = "blind: the model's answers and the expected values are hidden; --reveal shows them"


def step_table(result, kernel: bool = True, blind: bool = False, explain: bool = False) -> Table:
    """One row per step: host, call, kernel result, model result, expected, verdict.

    ``blind`` hides what a student is to predict (the model's answer, the
    expected value, the model's rule); ``explain`` adds every step's rule and
    kernel function, not only a failing step's.
    """
    table = Table(title=f"{result.scenario.name}: {result.scenario.description}".rstrip(": "), title_justify="left")
    columns = ["#", "host", "call", *(["kernel"] if kernel else []), *([] if blind else ["model", "expected"]),
               "verdict", *(["rule (kernel function)"] if explain and not blind else [])]
    for column in columns:
        table.add_column(column, overflow="fold")
    for record in result.records:
        step = record.step
        if step.kind != "call":
            table.add_row(str(step.index), "", f"[dim]{step.describe()}[/]", *[""] * (len(columns) - 3))
            continue
        model_cell = record.model.describe() if record.model else ""
        if (record.model and record.model.kernel_fn and not explain
                and not (record.verdict and record.verdict.ok)):
            model_cell += f"\n[dim]{record.model.kernel_fn}: {record.model.rule}[/]"
        user = f" ({step.user})" if step.user != "root" else ""
        verdict = _verdict_text(record)
        if blind:
            verdict = "" if record.verdict is None else "[green]ok[/]" if record.verdict.ok else "[red]FAIL[/]"
        row = [str(step.index), step.host + user, step.describe(),
               *([record.kernel.describe() if record.kernel else "-"] if kernel else []),
               *([] if blind else [model_cell, step.expect.describe() if step.expect else ""]), verdict]
        if explain and not blind:
            row.append(f"{record.model.rule} ({record.model.kernel_fn})" if record.model and record.model.kernel_fn
                       else record.model.rule if record.model else "")
        table.add_row(*row)
    if result.error:
        table.caption = f"[red]aborted:[/] {result.error}"
    elif blind:
        table.caption = f"[dim]{BLIND_NOTE}[/]"
    return table


def trace_panels(result) -> list:
    """A compact call tree for each traced step of ``result``, headed by the step and the citation's verdict."""
    from rich.panel import Panel
    from rich.text import Text

    panels = []
    for record in result.records:
        if record.trace is None:
            continue
        step = record.step
        cited = record.model.kernel_fn if record.model else None
        colour = "red" if record.citation and record.citation.model_bug else "dim"
        body = Text.from_markup(record.trace.compact(cited))
        if record.citation is not None:
            body.append("\n")
            body.append_text(Text.from_markup(f"[{colour}]{escape_markup(record.citation.describe())}[/]"))
        panels.append(Panel(body, title=f"step {step.index} {step.host}: {escape_markup(step.describe())} "
                                         f"→ {record.kernel.describe() if record.kernel else '-'}",
                            title_align="left", expand=False))
    return panels


def escape_markup(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def trace_markdown(result) -> list[str]:
    """The full call tree of each traced step, for the Markdown report."""
    lines: list[str] = []
    for record in result.records:
        if record.trace is None:
            continue
        step = record.step
        cited = record.model.kernel_fn if record.model else None
        lines += [f"### Step {step.index}: {step.host} `{step.describe()}` → "
                  f"{record.kernel.describe() if record.kernel else '-'}", ""]
        if record.citation is not None:
            lines += [record.citation.describe() + ".", ""]
        lines += ["```", record.trace.tree(cited), "```", ""]
    if lines:
        lines = ["", "#### The kernel's call graphs (function_graph, depth "
                 f"{next(r.trace.depth for r in result.records if r.trace is not None)})", ""] + lines
    return lines


def assertion_table(outcomes, blind: bool = False, kernel: bool = True) -> Table:
    """One row per expectation: its value (the kernel's, or the model's in a model-only check) and verdict."""
    table = Table(title="expectations" if kernel else "expectations, on the model", title_justify="left")
    for column in ("expectation", "value", *([] if blind or not kernel else ["model"]),
                   *([] if blind else ["wanted"]), "verdict"):
        table.add_column(column, overflow="fold")
    for outcome in outcomes:
        if not outcome.predicted:
            table.add_row(outcome.assertion.ask if blind and outcome.assertion.ask else outcome.assertion.name, "-",
                          *([] if blind else [outcome.assertion.describe()]), f"[yellow]not predicted[/]: {outcome.error}")
            continue
        verdict = "[green]ok[/]" if outcome.ok else f"[red]FAIL[/] {outcome.error}".rstrip()
        if not outcome.ok and outcome.assertion.why and not blind:
            verdict += f"\n[dim]{outcome.assertion.why}[/]"
        table.add_row(outcome.assertion.ask if blind and outcome.assertion.ask else outcome.assertion.name,
                      repr(outcome.value), *([] if blind or not kernel else [outcome.model or "not predicted"]),
                      *([] if blind else [outcome.assertion.describe()]), verdict)
    return table


def write_junit(report, path) -> None:
    """JUnit XML: one test suite per scenario (a test case per call step) and one for the expectations."""
    import xml.etree.ElementTree as ET

    suites = ET.Element("testsuites", name=report.title)
    for result in report.runs:
        cases = [r for r in result.records if r.verdict is not None]
        suite = ET.SubElement(suites, "testsuite", name=result.scenario.name, tests=str(len(cases)),
                              failures=str(sum(not r.verdict.ok for r in cases)), errors="1" if result.error else "0")
        for record in cases:
            case = ET.SubElement(suite, "testcase", classname=result.scenario.name,
                                 name=f"{record.step.index} {record.step.host}: {record.step.describe()}",
                                 time=f"{record.seconds:.3f}")
            if not record.verdict.ok:
                ET.SubElement(case, "failure", message="; ".join(record.verdict.problems))
        if result.error:
            ET.SubElement(ET.SubElement(suite, "testcase", classname=result.scenario.name, name="run"), "error",
                          message=result.error)
    if report.assertions:
        suite = ET.SubElement(suites, "testsuite", name="expectations", tests=str(len(report.assertions)),
                              failures=str(sum(not a.ok for a in report.assertions)), errors="0")
        for outcome in report.assertions:
            case = ET.SubElement(suite, "testcase", classname="expectations", name=outcome.assertion.name)
            if not outcome.ok:
                ET.SubElement(case, "failure", message=f"value {outcome.value!r}, wanted {outcome.assertion.describe()} "
                                                       f"{outcome.error}".strip())
    ET.ElementTree(suites).write(path, encoding="utf-8", xml_declaration=True)


def markdown(report, blind: bool = False) -> str:
    """The check as Markdown: a verdict line, each scenario's steps, the expectations (``blind``: no answers)."""
    def cell(text: object) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    counts = report.counts
    unpredicted = (f", {counts['not_predicted']} not predicted by the model"
                   if counts.get("not_predicted") and not report.kernel else "")
    lines = [f"# {report.title}", "",
             f"**{'PASS' if report.ok else 'FAIL'}**: {counts['steps'] - counts['step_failures']}/{counts['steps']} "
             f"steps agree, {counts['assertions'] - counts['assertion_failures'] - counts.get('not_predicted', 0)}/"
             f"{counts['assertions']} expectations hold{'' if report.kernel else ' on the model'}{unpredicted}.", ""]
    for result in report.runs:
        lines += [f"## {result.scenario.name}", "", result.scenario.description, ""]
        lines += (["| # | host | call | kernel | verdict |", "|---|---|---|---|---|"] if blind else
                  ["| # | host | call | kernel | model | expected | verdict |", "|---|---|---|---|---|---|---|"])
        for record in result.records:
            step = record.step
            verdict = "" if record.verdict is None else ("ok" if record.verdict.ok else
                                                          "FAIL: " + "; ".join(record.verdict.problems))
            model = (f"{record.model.describe()} ({record.model.kernel_fn})" if record.model and record.model.kernel_fn
                     else record.model.describe() if record.model else "")
            cells = (step.index, step.host, step.describe(), record.kernel.describe() if record.kernel else "",
                     *(() if blind else (model, step.expect.describe() if step.expect else "")),
                     ("ok" if record.verdict.ok else "FAIL") if blind and record.verdict else verdict)
            lines.append("| " + " | ".join(cell(x) for x in cells) + " |")
        if result.error:
            lines += ["", f"Aborted: {result.error}"]
        lines += trace_markdown(result)
        lines.append("")
    if report.assertions:
        lines += ["## Expectations", ""]
        lines += (["| expectation | value | verdict |", "|---|---|---|"] if blind else
                  ["| expectation | value | wanted | verdict |", "|---|---|---|---|"])
        for outcome in report.assertions:
            name = outcome.assertion.ask if blind and outcome.assertion.ask else outcome.assertion.name
            verdict = ("not predicted: " + outcome.error if not outcome.predicted else
                       "ok" if outcome.ok else f"FAIL {outcome.error}".strip())
            value = "-" if not outcome.predicted else repr(outcome.value)
            if report.kernel and not blind:
                value += f" (model: {outcome.model or 'not predicted'})"
            lines.append("| " + " | ".join(cell(x) for x in (
                name, value, *(() if blind else (outcome.assertion.describe(),)), verdict)) + " |")
    if blind:
        lines += ["", f"*{BLIND_NOTE}.*"]
    for note in report.notes:
        lines += ["", f"Note: {note}"]
    return "\n".join(lines) + "\n"


# `invoke lab.check --json`: one object. Keys (docs/cli.md repeats them):
#   lab, title, ok, on_kernel (false with --model-only), counts {steps, step_failures, assertions,
#   assertion_failures, not_predicted}, report_dir, notes (list),
#   scenarios: [{name, ok, error, diagnosis (list), steps: [{index, host, user, call, kernel, model,
#                expected, verdict ("ok" | "fail" | null for a step that is not compared), problems}]}],
#   expectations: [{name, value, ok, predicted, error, model}]
# With ``blind`` (no --reveal) model, expected, problems and the expectations' values are null,
# as the tables hide them.
def check_record(name: str, report, directory, blind: bool = False) -> dict:
    """A lab check's report as data, by the keys above."""
    def text(outcome) -> str | None:
        return outcome.describe() if outcome is not None else None

    scenarios = []
    for result in report.runs:
        steps = []
        for record in result.records:
            step = record.step
            verdict = None if record.verdict is None else "ok" if record.verdict.ok else "fail"
            steps.append({"index": step.index, "host": step.host, "user": step.user, "call": step.describe(),
                          "kernel": text(record.kernel), "model": None if blind else text(record.model),
                          "expected": None if blind or not step.expect else step.expect.describe(),
                          "verdict": verdict,
                          "problems": None if blind or record.verdict is None else list(record.verdict.problems)})
        scenarios.append({"name": result.scenario.name, "ok": result.ok, "error": result.error,
                          "diagnosis": list(result.diagnosis), "steps": steps})
    expectations = [{"name": outcome.assertion.describe(), "value": None if blind else _plain(outcome.value),
                     "ok": outcome.ok, "predicted": outcome.predicted, "error": outcome.error or None,
                     "model": None if blind else (outcome.model or None)} for outcome in report.assertions]
    return {"lab": name, "title": report.title, "ok": report.ok, "on_kernel": report.kernel,
            "counts": dict(report.counts), "report_dir": str(directory), "notes": list(report.notes),
            "scenarios": scenarios, "expectations": expectations}


def _plain(value):
    """``value`` as JSON can hold it (a number, a string, a list...), else its text."""
    import json

    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return str(value)
    return value
