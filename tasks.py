"""socklab tasks: `invoke --list` shows them, `invoke TASK --help` explains one.

Kept thin on purpose: every task parses its arguments, calls the harness and
prints. Errors a user can act on come out as one line and exit status 2.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

from invoke import Collection, Exit, task
from rich.markup import escape

from harness import config, progress
from harness import log as debug_log
from harness.image import build as image
from harness.errors import SocklabError
from harness.lab.lifecycle import Lab, check_up_args
from harness.lab.topology import topology
from harness.lab.topology import topology as topology_of
from harness import paths as paths_module
from harness.paths import DEFAULT_LAB, Paths, check_lab_name

NAME_HELP = "which lab of this checkout (default: $SOCKLAB_LAB or 'default'); each name is a lab of its own"

# invoke reads invoke.yaml right after this import, with no check of its own: check it first.
config.check_at_import(Path(__file__).resolve().parent)
# The debug log (harness/log.py): on with SOCKLAB_DEBUG=1 or invoke's own --debug (which has set
# the root logger to DEBUG by now); a task's --debug turns it on later. Off, the output is unchanged.
debug_log.configure(debug_log.env_debug() or logging.getLogger().isEnabledFor(logging.DEBUG))
DEBUG_HELP = "log QEMU argv, SSH commands, agent messages and timings to stderr (also SOCKLAB_DEBUG=1)"


# Tasks whose VM name is checked by the task itself, so that a missing one gives the usual one
# `socklab:` line and exit 2 instead of invoke's "did not receive required positional arguments".
_OWN_VM_CHECK = {"lab.exec", "lab.ssh", "lab.console"}


def _let_tasks_check_their_vm_name() -> None:
    """invoke requires every positional argument; let the VM tasks report a missing name themselves.

    invoke 2.x/3.x parse in ParseMachine.complete_context; if that ever moves, this does nothing
    and the bad-input corpus (cli-exec-without-vm) says so.
    """
    try:
        from invoke.parser.parser import ParseMachine
    except ImportError:  # pragma: no cover - another invoke layout
        return
    original = getattr(ParseMachine, "complete_context", None)
    if original is None or getattr(original, "_socklab", False):
        return

    def complete_context(self):
        if self.context is not None and self.context.name in _OWN_VM_CHECK:
            for argument in self.context.missing_positional_args:
                argument.value = ""
        original(self)

    complete_context._socklab = True  # type: ignore[attr-defined]  # marks our hook, so it is installed once
    ParseMachine.complete_context = complete_context  # type: ignore[method-assign]  # see the docstring


_let_tasks_check_their_vm_name()


def _friendly(fn):
    """Turn SocklabError into `socklab: <message>` and exit 2; SIGTERM behaves like Ctrl-C.

    The task also gets a ``--debug`` flag (harness/log.py), which it does not see itself.
    """

    @functools.wraps(fn)
    def wrapper(c, *args, debug=False, **kwargs):
        if debug and not debug_log.enabled():
            debug_log.configure(True)
        # Recipes and labs from invoke config; the environment still wins (harness/paths.py).
        paths_module.configure(images=c.config.images.dir, labs=c.config.lab.labs_dir)
        # invoke hands `--help` to a task's positional argument (`invoke lab.ssh --help`
        # would try to reach a VM called "--help"); show the task's help instead.
        for flag in ("--help", "-h"):
            if flag in args or flag in kwargs.values():
                where = sys.argv.index(flag) if flag in sys.argv else 0
                task_name = sys.argv[where - 1] if where > 0 else fn.__name__
                if Path(sys.argv[0]).name == "socklab":  # the installed command (harness/cli.py)
                    os.execvp(sys.argv[0], [sys.argv[0], "--help", task_name])
                os.execvp(sys.executable, [sys.executable, "-m", "invoke", "--help", task_name])

        def on_term(signum, frame):
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, on_term)
        try:
            return fn(c, *args, **kwargs)
        except SocklabError as exc:
            # The message is data: "[ip, port]" in it must not be read as rich markup.
            progress.console.print(f"[red]socklab:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            raise Exit(code=exc.exit_code) from None
        except KeyboardInterrupt:
            progress.console.print(f"[yellow]socklab: interrupted; {_left_running()}[/]")
            raise Exit(code=130) from None

    signature = inspect.signature(fn)
    if "debug" not in signature.parameters:
        # invoke builds a task's flags from this signature (it follows __signature__ before __wrapped__).
        flag = inspect.Parameter("debug", inspect.Parameter.KEYWORD_ONLY, default=False)
        new = signature.replace(parameters=[*signature.parameters.values(), flag])
        wrapper.__signature__ = new  # type: ignore[attr-defined]  # functools.wraps' wrapper takes it at run time
    return wrapper


def _left_running() -> str:
    """What an interrupted command leaves, as seen now (not assumed): which labs of this install are up, or none."""
    from harness.lab.state import lab_names

    paths = Paths.default()
    up: list[tuple[str, list[str], Lab]] = []
    stale: list[tuple[str, list[str], Lab]] = []
    try:
        for name in lab_names(paths):
            lab = Lab(paths, name)
            state = lab.load()
            if state is None:
                continue
            running = [vm for vm, alive in lab.alive(state).items() if alive]
            label = "the lab" if name == DEFAULT_LAB else f"lab {name}"
            (up if running else stale).append((label, running, lab))
    except (SocklabError, OSError) as exc:
        return f"a lab's state cannot be read ({exc}); `invoke lab.down` clears it"
    if up:
        return "; ".join(f"{label} stays up ({', '.join(running)}; `{_down_hint(lab)}` stops it)"
                         for label, running, lab in up)
    if stale:
        return "; ".join(f"{label}'s VMs are not running but its state is left; `{_down_hint(lab)}` clears it"
                         for label, _running, lab in stale)
    return "no lab is running (nothing was left started)"


def _number(text, option: str, what: str, kind=float):
    """A number given on the command line; invoke would otherwise turn a typo into a traceback."""
    try:
        value = kind(text) if len(str(text)) <= 32 else None  # past Python's digit limit int() raises
        if value is None or value != value or value in (float("inf"), float("-inf")):
            raise ValueError
    except (TypeError, ValueError):
        shown = str(text) if len(str(text)) <= 32 else f"{str(text)[:32]}…"
        raise SocklabError(f"{option} must be {what}, not {shown!r}") from None
    if value <= 0:
        raise SocklabError(f"{option} must be {what}, not {text}")
    return value


def _seed(text) -> int:
    """A fuzz seed: any integer, the same one running the same programs."""
    try:
        return int(text)
    except ValueError:
        raise SocklabError(f"--seed must be an integer, not {text!r}") from None


def _lab(name=None) -> Lab:
    """The lab called ``name`` (``--name``, else $SOCKLAB_LAB, else ``default``) of this install."""
    name = name or os.environ.get("SOCKLAB_LAB") or DEFAULT_LAB
    return Lab(Paths.default(), check_lab_name(name))


def _down_hint(lab: Lab) -> str:
    return "invoke lab.down" + ("" if lab.name == DEFAULT_LAB else f" --name {lab.name}")


def _vm_name(name, example: str = "invoke lab.ssh server") -> str:
    import re

    if not name:
        raise SocklabError(f"name a VM: client or server (e.g. `{example}`)")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", name):
        raise SocklabError(f"{name!r} is not a VM name: VM names are letters, digits, '-', '_' and '.' (e.g. server)")
    return name


def _mirror(c, mirror):
    return mirror or os.environ.get("SOCKLAB_MIRROR") or c.config.images.mirror or None


@task(help={
    "recipe": "image recipe in images/ (default: bookworm)",
    "kernel": "kernel series (6.1, 6.12, 7.2) or recipe name; same as --recipe",
    "force": "rebuild even when a complete cache entry exists",
    "mirror": "Debian mirror for mmdebstrap (default: mmdebstrap's own; also SOCKLAB_MIRROR or images.mirror in invoke.yaml)",
})
@_friendly
def build(c, recipe=None, kernel=None, force=False, mirror=None):
    """Build the Debian guest image (mmdebstrap), cached by recipe hash; a no-op when cached."""
    if recipe and kernel:
        raise SocklabError("give --recipe or --kernel, not both")
    img, built = image.build(Paths.default(), kernel or recipe or c.config.images.recipe, _mirror(c, mirror),
                             force=force)
    state = "built" if built else "cached"
    progress.say(f"image {state}: {img.directory}  (kernel {img.kernel_release})")


@task(help={"all": "also remove the per-install SSH key (the next build makes a new one)"})
@_friendly
def clean(c, all=False):
    """Remove the image cache (and with --all the SSH key). The running lab must be down."""
    from harness.lab.state import lab_names

    paths = Paths.default()
    running = lab_names(paths)
    if running:
        downs = ", ".join(f"`invoke lab.down{'' if n == DEFAULT_LAB else ' --name ' + n}`" for n in running)
        raise SocklabError(f"labs run on these images ({', '.join(running)}): {downs} first")
    removed = image.clean(paths, keys=all)
    progress.say(f"removed {len(removed)} item(s)" + "".join(f"\n  {p}" for p in removed))


@task(help={
    "topology": "which VMs to boot: default (client + server), single (server), mixed (client 6.1, server 7.2), "
                "lossy (20 ms, 1% loss, MTU 1400, no TSO/GSO), or the path of a topology file (docs/topologies.md)",
    "kernel": "kernel series (6.1, 6.12, 7.2) or recipe name; a topology may pin a VM to its own",
    "kernel_image": "boot your own bzImage over the chosen kernel's userland",
    "modules": "with --kernel-image: the INSTALL_MOD_PATH of its `make modules_install` (none if virtio is built in)",
    "accel": "auto (probe KVM, fall back to TCG), kvm or tcg",
    "segment": "lab segment: auto (tap as root, else socket), tap or socket",
    "timeout": "seconds to wait for SSH on every guest",
    "cold": "boot from scratch even when a ready snapshot exists (and save no new one)",
    "name": NAME_HELP,
})
@_friendly
def up(c, topology=None, accel=None, segment=None, timeout="120", cold=False, name=None, kernel=None,
       kernel_image=None, modules=None):
    """Boot the lab: build the image if needed, start the VMs, wait until SSH answers.

    The first boot saves a ready snapshot of every VM; later ones resume it
    (about a second) unless --cold is given or the image or VM setup changed.
    """
    topology, accel = topology or c.config.lab.topology, accel or c.config.lab.accel
    segment = segment or c.config.lab.segment
    timeout = _number(timeout, "--timeout", "a positive number of seconds")
    topo = check_up_args(topology, accel, segment, timeout)
    if modules and not kernel_image:
        raise SocklabError("--modules goes with --kernel-image (the modules of your own kernel)")
    lab = _lab(name)
    kernel = kernel or c.config.images.recipe
    for vm_name in topo.vms:  # every recipe checked before the first is built
        image.resolve(lab.paths.images, topo.kernel_of(vm_name, kernel))
    for recipe in sorted({topo.kernel_of(vm_name, kernel) for vm_name in topo.vms}):
        image.build(lab.paths, recipe, _mirror(c, None))
    state, started = lab.up(topology, accel, segment, boot_timeout=timeout, cold=cold, kernel=kernel,
                            kernel_image=Path(kernel_image) if kernel_image else None,
                            modules=Path(modules) if modules else None)
    try:
        if not started:
            progress.say(f"a lab is already running; not starting another (`{_down_hint(lab)}` stops it)")
        _print_status(lab, state, live=True)
        if started:
            progress.say(f"[bold]{len(state.vms)} VMs SSH-ready in {state.boot_seconds:.1f} s[/] "
                         f"({state.accel}, {state.boot_mode})")
    except KeyboardInterrupt:
        # Ctrl-C after the VMs came up but before lab.up finished: the user stopped lab.up, so
        # what it started goes too (a lab that was already running stays).
        if started:
            lab.down()
        raise
    finally:
        lab.close()


@task(help={"name": NAME_HELP})
@_friendly
def down(c, name=None):
    """Stop the lab: QMP quit, kill leftovers, remove taps, netns, overlays and state. Idempotent."""
    _lab(name).down()


@task(help={"live": "also ask each guest for its lab NIC's offloads (ethtool -k over SSH)", "name": NAME_HELP,
            "json": "print one JSON object instead of the table (keys: harness/lab/status.py, docs/cli.md)"})
@_friendly
def status(c, live=True, name=None, json=False):
    """Show the lab: VMs, pids, ports, accelerator, segment mode, offloads, uptime."""
    lab = _lab(name)
    state = lab.load()
    if state is None:
        if json:
            _print_json({"lab": lab.name, "running": False})
        else:
            progress.say("no lab is running")
        return
    if json:
        from harness.lab.status import status_record

        _print_json(status_record(lab, state, live=live))
    else:
        _print_status(lab, state, live=live)
    lab.close()


def _print_json(record) -> None:
    """Data for a program: one JSON object on stdout, nothing else there."""
    import json

    sys.stdout.write(json.dumps(record, indent=2) + "\n")


def _print_status(lab, state, live):
    from harness.lab.status import status_table

    progress.show(status_table(lab, state, live=live))


@task(positional=["vm"], help={"vm": "VM name, e.g. client or server", "name": NAME_HELP})
@_friendly
def ssh(c, vm=None, name=None):
    """Open an interactive SSH session to a VM (host key pinned, project key only).

    A command after `--` is not run here (ssh would): `invoke lab.exec VM -- CMD` runs one.
    """
    from harness.guest import remote

    if remote.words_after_dashes(sys.argv, c.remainder):
        raise SocklabError(f"lab.ssh opens an interactive session and runs no command; "
                           f"run one with `invoke lab.exec {vm or 'client'} -- COMMAND`")
    argv = _lab(name).ssh_argv(_vm_name(vm))
    os.execvp(argv[0], argv)


@task(positional=["vm"], help={"vm": "VM name, e.g. client or server", "name": NAME_HELP})
@_friendly
def console(c, vm=None, name=None):
    """Attach to a VM's serial console (Ctrl-] leaves)."""
    from harness.vm.console import interact

    vm = _vm_name(vm)
    guest = _lab(name).require().vm(vm)
    interact(guest.console_path, vm)


@task(name="exec", positional=["vm"], help={
    "vm": "VM name, e.g. client or server; the command follows `--`",
    "name": NAME_HELP,
    "timeout": "seconds before the command is killed (default 60; none with --tty)",
    "merge": "fold the command's stderr into stdout in the order it printed them",
    "tty": "give the command a terminal (interactive tools: top, python3, less)",
})
@_friendly
def exec_(c, vm=None, timeout=None, merge=False, tty=False, name=None):
    """Run one command in a VM, word for word, with stdin forwarded; exits with its status.

    `invoke lab.exec server -- python3 -c 'print(1)'` runs exactly that argv,
    as `docker exec` would. A single quoted word with shell syntax is a shell
    line: `invoke lab.exec server -- 'ss -tln | grep 7000'`. Standard input is
    forwarded until EOF (`echo hi | invoke lab.exec client -- cat`).
    The exit status is the command's; socklab's own failures (no lab, VM gone,
    SSH lost, timeout) exit 255, like ssh. Bad arguments exit 2.
    """
    from harness.guest import remote

    vm = _vm_name(vm, "invoke lab.exec server -- ss -tln")
    timeout = None if tty and timeout is None else _number(timeout or "60", "--timeout", "a positive number of seconds")
    command = remote.guest_command(remote.words_after_dashes(sys.argv, c.remainder))
    lab = _lab(name)
    try:
        state = lab.require()
    except SocklabError as exc:
        exc.exit_code = remote.OWN_FAILURE
        raise
    state.vm(vm)  # an unknown VM is bad input (exit 2), checked before anything connects
    try:
        status = remote.run_in_guest(lab.ssh(vm), command, timeout=timeout, merge=merge, use_tty=tty)
    except SocklabError as exc:
        exc.exit_code = remote.OWN_FAILURE
        raise
    finally:
        lab.close()
    if status:
        raise Exit(code=status)


def _results_root(c, out):
    """Where this run's reports go (harness.results: --out, SOCKLAB_RESULTS, results.dir); checked before any work."""
    from harness.results import results_root

    return results_root(out, c.config.results.dir)


def _results_dir(root, name: str):
    from harness.results import new_run_dir

    return new_run_dir(root, name)


OUT_HELP = "directory for the reports (default: results/; also SOCKLAB_RESULTS or results.dir in invoke.yaml)"


def _running_lab(lab: Lab, topology: str, kernel: str | None = None) -> Lab:
    """``lab``, booted here if it does not run (it is left running for the next check).

    With ``kernel`` (a series) the lab must run that kernel: it boots on it, and a running lab of
    another kernel is refused rather than rebooted under someone's feet.
    """
    state = lab.load()
    if state is None or not state.ready or not all(lab.alive(state).values()):
        progress.say(f"no lab is running; booting one ({topology}{', ' + kernel if kernel else ''}) "
                     "and leaving it up for the next check")
        image.build(lab.paths, kernel or "bookworm")
        lab.up(topology, kernel=kernel or "bookworm")
    elif tuple(vm.name for vm in state.vms) != topology_of(topology).vms:
        # Another topology with the same VMs (`mixed`: other kernels) runs the lab as well.
        raise SocklabError(f"the running lab is {state.topology!r} but this needs {topology!r}: `{_down_hint(lab)}` first")
    elif kernel:
        from harness.model.versions import nearest_series

        running = sorted({nearest_series(vm.kernel) for vm in state.vms if vm.kernel})
        if running != [kernel]:
            raise SocklabError(f"the running lab runs {', '.join(running) or 'an unknown kernel'}, not {kernel}: "
                               f"`{_down_hint(lab)}` first, or leave out --kernel")
    return lab


def _model_kernel(kernel) -> str:
    """A --kernel option as a series the model knows (a recipe name is taken too)."""
    if not kernel:
        return "6.1"
    from harness.model.versions import KERNELS

    if str(kernel) in KERNELS:
        return str(kernel)
    return image.resolve(Paths.default().images, str(kernel)).kernel


def _show_and_save(root, report, name: str, blind: bool = False, explain: bool = False, fail_exit: bool = True,
                   as_json: bool = False):
    """The report's tables and verdict on stdout (with ``as_json`` one JSON object instead, the verdict
    on stderr), its files in a new results directory."""
    from harness.course import state
    from harness.course.html import write_report
    from harness.lab.status import assertion_table, check_record, markdown, step_table, trace_panels, write_junit

    for result in report.runs if not as_json else ():
        progress.show(step_table(result, kernel=report.kernel, blind=blind, explain=explain))
        for panel in trace_panels(result):
            progress.show(panel)
    if report.assertions and not as_json:
        progress.show(assertion_table(report.assertions, blind=blind, kernel=report.kernel))
    for note in report.notes:
        progress.say(f"note: {note}")
    directory = _results_dir(root, name)
    snapshots = []
    try:
        write_junit(report, directory / "junit.xml")
        for result in report.runs:
            snapshots += state.save_snapshots(result, directory)
        (directory / "report.md").write_text(markdown(report, blind=blind) + "".join(
            "\n" + state.markdown(result) for result in report.runs if result.kernel_snapshots))
        write_report(report, directory, blind=blind)
    except OSError as exc:
        # The tables above are the results; only the files are missing (a full disk, say): say where.
        verdict = "passed" if report.ok else "failed"
        raise SocklabError(f"the check {verdict} (tables above), but its report could not be written: "
                           f"{exc.filename or directory}: {exc.strerror or exc}") from None
    if snapshots:
        progress.say(f"{len(snapshots)} snapshot files (raw ss/ethtool//proc text and parsed records) in "
                     f"{directory / 'snapshots'}")
    counts = report.counts
    verdict = "[green]PASS[/]" if report.ok else "[red]FAIL[/]"
    held = counts["assertions"] - counts["assertion_failures"] - counts["not_predicted"]
    unpredicted = f" ({counts['not_predicted']} not predicted by the model)" if counts["not_predicted"] else ""
    if as_json:
        _print_json(check_record(name, report, directory, blind=blind))
    (progress.say if as_json else progress.show)(
        f"{verdict}: {counts['steps'] - counts['step_failures']}/{counts['steps']} steps agree, "
        f"{held}/{counts['assertions']} expectations hold{'' if report.kernel else ' on the model'}"
        f"{unpredicted}; report in {directory}")
    if not report.ok and fail_exit:
        raise Exit(code=1)
    return directory


def _trace_options(trace, depth, function=None):
    """--trace [--depth N] [--function NAME] -> TraceOptions (None without --trace); checked before any VM."""
    from harness.guest.trace import TraceError, TraceOptions, check_depth, check_function

    if not trace:
        if depth is not None or function:
            raise TraceError("--depth and --function go with --trace")
        return None
    return TraceOptions(check_depth(6 if depth is None else depth), check_function(function))


TRACE_HELP = {
    "trace": "record the kernel's call graph of every call step (function_graph in the guest; docs/tracing.md)",
    "depth": "with --trace: how deep the graph goes, 1..20 (default 6)",
}


@task(name="check", iterable=["param"], help={
    "lab_name": "the course lab, e.g. 03-listen or 03 (see labs/README.md)",
    "param": "override a scenario parameter, e.g. --param backlog=4 (repeatable; not with --student)",
    "model_only": "run on the reference model alone (no VM); expectations are evaluated on the model's predictions",
    "out": OUT_HELP,
    "name": NAME_HELP,
    "kernel": "with --model-only: the kernel to model (6.1, 6.12, 7.2); live checks model each VM's own kernel",
    **TRACE_HELP,
    "student": "mark this student's predictions sheet against the kernel (see lab.predict)",
    "workspace": "the students' workspace (default: work/, or $SOCKLAB_WORKSPACE)",
    "reveal": "show the model's answers and the expected values (hidden by default: predict first)",
    "explain": "show every step's rule and kernel function (implies --reveal)",
    "json": "print one JSON object instead of the tables (keys: harness/lab/status.py, docs/cli.md)",
})
@_friendly
def check_(c, lab_name, param=None, model_only=False, out=None, name=None, kernel=None, trace=False, depth=None,
           student=None, workspace=None, reveal=False, explain=False, json=False):
    """Check a lab: its scenarios on the live kernels and the model, then its expectations. Exit 0 only if all agree."""
    from harness.scenario.check import LabSpec, check, prepare
    from harness.scenario.format import parse_params

    sheet = None
    if json and student is not None:
        raise SocklabError("--json goes without --student: the marked sheet is a table of its own")
    if student is not None:  # the sheet is read and checked before anything else is touched
        sheet = _student_sheet(lab_name, student, workspace, param, model_only)
    root = _results_root(c, out)
    spec = LabSpec.load(lab_name)
    overrides = parse_params(param or [])
    options = _trace_options(trace, depth)
    if options is not None and model_only:
        raise SocklabError("--trace needs the kernels: it cannot go with --model-only")
    prepare(spec, overrides)  # every input checked before a VM is booted or touched
    if kernel and not model_only:
        raise SocklabError("--kernel goes with --model-only: a live check models each VM's own kernel "
                           "(boot another with `invoke lab.up --kernel K`)")
    series = _model_kernel(kernel)
    if model_only:
        report = check(spec, None, overrides, model_kernel=series)
    else:
        lab = _lab(name)
        with lab.using():  # one check, run or grade at a time on this lab: they would share ports
            report = check(spec, _running_lab(lab, spec.topology), overrides, trace=options)
            lab.close()
    blind = not (reveal or explain)
    if sheet is None:
        _show_and_save(root, report, spec.name, blind=blind, explain=explain, as_json=json)
        return
    _show_and_save(root, report, spec.name, blind=blind, explain=explain, fail_exit=False)
    _mark(spec, report, *sheet)
    if not report.ok:
        raise Exit(code=1)


def _student_sheet(lab_name, student, workspace, param, model_only):
    """(student, workspace, questions, predictions): the sheet read and checked before any VM is touched."""
    from harness.course.sheet import questions, read_sheet
    from harness.course.workspace import PREDICTIONS, Workspace, check_student, default_root
    from harness.scenario.check import LabSpec

    student = check_student(student)
    if param:
        raise SocklabError("--student marks the lab as it is: predictions are for its default parameters, "
                           "so drop --param")
    if model_only:
        raise SocklabError("--student needs the kernel (it is the answer key): drop --model-only")
    spec = LabSpec.load(lab_name)
    space = Workspace(default_root(workspace))
    lab_questions = questions(spec)
    predictions = read_sheet(spec, space.lab_dir(student, spec.name) / PREDICTIONS, lab_questions)
    return student, space, lab_questions, predictions


def _mark(spec, report, student, space, lab_questions, predictions):
    from rich.table import Table

    from harness.course.score import AnswerKey, explain, save, score

    key = AnswerKey.from_report(spec.name, report, lab_questions)
    marked = score(spec.name, lab_questions, predictions, key)
    table = Table(title=f"{student}'s predictions, marked by the kernel", title_justify="left")
    for column in ("question", "your answer", "kernel", "", "why the kernel did it"):
        table.add_column(column, overflow="fold")
    for mark in marked.marks:
        verdict = "[green]right[/]" if mark.correct else "[dim]blank[/]" if mark.answer is None else "[red]wrong[/]"
        table.add_row(mark.question.id, escape(mark.answer.describe()) if mark.answer else "",
                      escape(mark.key.describe()), verdict, "" if mark.correct else escape(explain(mark)))
    progress.show(table)
    path = save(marked, key, student, space.lab_dir(student, spec.name))
    progress.show(f"[bold]{student}: {marked.correct}/{marked.total} predictions right[/] "
                  f"({marked.answered} answered); marked sheet: {path}")


@task(name="predict", help={
    "lab_name": "the lab, e.g. 03-listen or 03",
    "student": "whose sheet (a directory name: letters, digits, '.', '_', '-')",
    "workspace": "the students' workspace (default: work/, or $SOCKLAB_WORKSPACE)",
    "force": "overwrite an existing predictions sheet (the answers in it are lost)",
})
@_friendly
def predict_(c, lab_name, student=None, workspace=None, force=False):
    """Write a blank predictions sheet (and an answers file) for a lab into the student's workspace."""
    from harness.course import explain as explaining
    from harness.course.exercise import Exercise
    from harness.course.sheet import write_sheet
    from harness.course.workspace import ANSWERS, OWN_SCENARIO, PREDICTIONS, Workspace, check_student, default_root
    from harness.scenario.check import LabSpec

    student = check_student(student)
    spec = LabSpec.load(lab_name)
    directory = Workspace(default_root(workspace)).lab_dir(student, spec.name)
    sheet = directory / PREDICTIONS
    written = write_sheet(spec, student, sheet, force=force)
    explaining.write(spec.name, student, spec.directory / "README.md", directory / ANSWERS)
    progress.say(f"{'wrote' if written else 'kept (use --force to start over)'} {sheet}")
    progress.say(f"explanations go in {directory / ANSWERS}")
    exercise = Exercise.parse(spec.exercise, str(spec.directory / "lab.yaml"))
    if exercise is not None:
        progress.say(f"own scenario ({directory / OWN_SCENARIO}): {exercise.task}")
    print(sheet)


@task(name="run", iterable=["param"], help={
    "file": "a scenario file (YAML)",
    "param": "override a scenario parameter, e.g. --param port=7001 (repeatable)",
    "out": OUT_HELP,
    "name": NAME_HELP,
    **TRACE_HELP,
    "hold_at": "after this step (its number, label or snapshot name) keep every socket open until you press Enter",
    "reveal": "show the model's answers and the expected values",
})
@_friendly
def run_(c, file, param=None, out=None, name=None, trace=False, depth=None, hold_at=None, reveal=False):
    """Run any scenario file on the live kernels and the model, step by step."""
    from pathlib import Path

    from harness.scenario.check import CheckReport, lab_scatter_gather, run_scenario
    from harness.scenario.format import load, parse_params

    root = _results_root(c, out)
    path = Path(file)
    options = _trace_options(trace, depth)
    params, hosts = parse_params(param or []), topology("default").vms
    scenario = load(path, params, known_hosts=hosts)
    on_step = _holder(scenario, hold_at) if hold_at is not None else None
    lab = _lab(name)
    with lab.using():
        running = _running_lab(lab, "default")
        if not lab_scatter_gather(running):  # the answer key of the socket segment's NIC
            scenario = load(path, params, known_hosts=hosts, scatter_gather=False)
        report = CheckReport(scenario.name, runs=[run_scenario(scenario, running, on_step, trace=options)])
        lab.close()
    _show_and_save(root, report, path.stem, blind=not reveal)


def _holder(scenario, hold_at):
    """An on_step callback that stops the run after step ``hold_at`` until Enter (EOF goes on too)."""
    wanted = str(hold_at)
    steps = [step for step in scenario.steps if str(step.index) == wanted or wanted in (step.label, step.snapshot)]
    if not steps:
        raise SocklabError(f"--hold-at {hold_at}: {scenario.path} has no step numbered, labelled or snapshot "
                           f"named {hold_at!r} (steps 1-{len(scenario.steps)})")
    target = steps[0]

    def hold(record):
        if record.step.index != target.index:
            return
        progress.say(f"[bold]holding after step {target.index} ({escape(target.describe())})[/]: every socket of "
                     f"the run is open on {', '.join(scenario.hosts)}. In another terminal look, e.g. "
                     f"`invoke lab.exec {scenario.hosts[0]} -- ss -tlnm`; press Enter here to go on.")
        try:
            sys.stdin.readline()
        except (OSError, ValueError):
            pass

    return hold


@task(name="trace", positional=["vm"], help={
    "vm": "VM name; the program follows `--`, e.g. invoke lab.trace server -- python3 /tmp/client.py",
    "name": NAME_HELP,
    "depth": "how deep the graph goes, 1..20 (default 6)",
    "function": "also root a graph at this kernel function (e.g. inet_csk_accept)",
    "timeout": "seconds the program may run (at most 120)",
})
@_friendly
def trace_(c, vm=None, depth=None, function=None, timeout="60", name=None):
    """Run a program in a guest and print the kernel's call graph of each of its socket calls."""
    import shlex

    from harness.guest import remote
    from harness.guest.trace import TraceError, trace_program

    vm = _vm_name(vm, "invoke lab.trace server -- python3 /tmp/client.py")
    options = _trace_options(True, depth, function)
    timeout = _number(timeout, "--timeout", "a number of seconds in 1..120")
    if timeout > 120:
        raise TraceError(f"--timeout {timeout:g}: a traced program may run at most 120 s")
    argv = remote.words_after_dashes(sys.argv, c.remainder)  # word for word, as lab.exec takes them
    if not argv:
        raise TraceError("no program: put it after --, e.g. `invoke lab.trace server -- python3 /tmp/client.py`")
    lab = _lab(name)
    lab.require().vm(vm)  # an unknown VM is bad input, checked before anything connects
    result = trace_program(lab, vm, argv, options, timeout)
    lab.close()
    if result.output:
        sys.stderr.write(result.output if result.output.endswith("\n") else result.output + "\n")
    shown = result.socket_calls()
    print(shown.tree())
    status = "timed out (killed)" if result.timed_out else f"exit status {result.status}"
    progress.say(f"{vm}: {shlex.join(argv)}: {status}; {len(shown.roots)} socket call(s) traced at depth "
                 f"{shown.depth} ({len(result.syscalls()) - len(shown.roots)} other calls left out)")


@task(name="model", iterable=["param"], help={
    "file": "a scenario file (YAML)",
    "param": "override a scenario parameter (repeatable)",
    "no_sg": "model a lab NIC without scatter-gather (as in socket-segment mode)",
    "out": OUT_HELP,
    "kernel": "the kernel to model: 6.1 (default), 6.12, 7.2 or a recipe name",
    "reveal": "show the model's answers (hidden by default, so that you predict first)",
    "explain": "show every step's rule text and kernel function (implies --reveal)",
})
@_friendly
def model_(c, file, param=None, no_sg=False, out=None, kernel=None, reveal=False, explain=False):
    """Run a scenario on the reference model alone (no VM): predict, then check on the lab."""
    from pathlib import Path

    from harness.scenario.check import CheckReport, run_scenario
    from harness.scenario.format import load, parse_params

    root = _results_root(c, out)
    scenario = load(Path(file), parse_params(param or []), known_hosts=topology("default").vms,
                    scatter_gather=not no_sg)
    series = _model_kernel(kernel)
    report = CheckReport(scenario.name, runs=[run_scenario(scenario, None, scatter_gather=not no_sg,
                                                           model_kernel=series)], kernel=False)
    progress.say(f"model of Linux {series}")
    _show_and_save(root, report, Path(file).stem, blind=not (reveal or explain), explain=explain)


@task(name="selfcheck", iterable=["only"], help={
    "student": "the name on the report (default: $USER)",
    "only": "check just this lab (repeatable); default: every lab in labs/",
    "out": OUT_HELP,
    "name": NAME_HELP,
})
@_friendly
def selfcheck(c, student=None, only=None, out=None, name=None):
    """Environment check: every lab's check on the live lab, kernel and model agreeing (Markdown and CSV)."""
    import getpass

    from harness.course import selfcheck as grading

    from harness.scenario.check import LabSpec, prepare

    root = _results_root(c, out)
    student = student or os.environ.get("USER") or getpass.getuser()
    for course_lab in only or []:
        prepare(LabSpec.load(course_lab))  # a misspelt --only stops here, before a boot
    lab = _lab(name)

    def show(course_lab, report):
        verdict = "[red]cannot run[/]" if report is None else "[green]pass[/]" if report.ok else "[red]FAIL[/]"
        progress.say(f"{course_lab}: {verdict}")

    with lab.using():
        grades, reports = grading.grade(_running_lab(lab, "default"), list(only or []) or None, on_lab=show)
        kernel = lab.ssh(lab.require().vms[0].name).run("uname -r").stdout.strip()
        lab.close()
    directory = _results_dir(root, f"selfcheck-{student}")
    grading.write(student, grades, reports, directory, kernel)
    progress.say(f"{sum(g.passed for g in grades)}/{len(grades)} labs pass; report: {directory / 'grade.md'}, "
                 f"{directory / 'grade.csv'}")
    if not all(g.passed for g in grades):
        raise Exit(code=1)


@task(name="grade", iterable=["only", "student"], help={
    "workspace": "the students' workspace (default: work/, or $SOCKLAB_WORKSPACE)",
    "student": "grade only this student (repeatable); default: every student in the workspace",
    "only": "grade just this lab (repeatable); default: every lab in labs/",
    "out": OUT_HELP,
    "name": NAME_HELP,
})
@_friendly
def grade(c, workspace=None, student=None, only=None, out=None, name=None):
    """Grade the class: predictions marked by the kernel, own scenarios, written answers (CSV, Markdown, HTML)."""
    from harness.course import grade as grading
    from harness.course.workspace import Workspace, check_student, default_root
    from harness.scenario.check import LabSpec, known_labs, prepare

    root = _results_root(c, out)
    space = Workspace(default_root(workspace))
    students = [check_student(who) for who in student] if student else None
    specs = [LabSpec.load(course_lab) for course_lab in (only or known_labs())]
    for spec in specs:
        prepare(spec)
    if not (students or space.students()):
        raise SocklabError(f"no students in {space.root}: `invoke lab.predict NN --student NAME` starts one")
    sheets = grading.read_sheets(space, specs, students)  # a broken sheet stops here, before the lab is used
    lab = _lab(name)
    with lab.using():
        running = _running_lab(lab, "default")
        result = grading.grade_class(space, specs, _answer_key(running), _own_scenario_judge(running), students,
                                     on_lab=lambda who, course_lab: progress.say(f"graded {who}, {course_lab}"),
                                     sheets=sheets)
        kernel = lab.ssh(lab.require().vms[0].name).run("uname -r").stdout.strip()
        lab.close()
    paths = grading.write(result, _results_dir(root, "grade"), kernel)
    for who in result.students():
        right, asked = result.total(who)
        progress.say(f"{who}: {right}/{asked} predictions right")
    progress.say("class table: " + ", ".join(str(p) for p in paths.values()))
    print(paths["csv"])


def _answer_key(lab):
    """A function giving each lab's answer key: one check of the lab on the live kernels."""
    from harness.course.score import AnswerKey
    from harness.course.sheet import questions
    from harness.scenario.check import check

    def key_for(spec):
        progress.say(f"running {spec.name} on the kernels (the answer key)")
        return AnswerKey.from_report(spec.name, check(spec, lab), questions(spec))

    return key_for


def _own_scenario_judge(lab):
    """A function judging a student's own scenario on the kernel and the model, against the lab's exercise."""
    from harness.course.exercise import Exercise, Verdict, judge
    from harness.scenario.check import run_scenario
    from harness.scenario.format import load

    def judge_own(spec, path):
        exercise = Exercise.parse(spec.exercise, str(spec.directory / "lab.yaml"))
        if exercise is None:
            return Verdict("none", "this lab has no own-scenario exercise")
        if not path.is_file():
            return Verdict("missing", f"no {path.name}")
        try:
            scenario = load(path, known_hosts=topology(spec.topology).vms)
        except SocklabError as exc:
            return Verdict("error", str(exc))
        return judge(exercise, scenario, run_scenario(scenario, lab), kernel=True)

    return judge_own


@task(name="matrix", iterable=["kernel", "lab"], help={
    "kernel": "run on this kernel only (6.1, 6.12, 7.2 or a recipe name; repeatable); default: every recipe",
    "lab": "run this lab only (repeatable); default: every lab in labs/",
    "timeout": "seconds to wait for SSH on every guest",
    "out": OUT_HELP,
    "corpus": "after the labs, run the fuzz corpus (tests/corpus/, the files that hold on that kernel) on each kernel",
    "fuzz_steps": "after the labs, a differential fuzz of this many steps on each kernel (0: none; CI runs 5000)",
    "seed": "the seed of that fuzz (default 1)",
})
@_friendly
def matrix_(c, kernel=None, lab=None, timeout="300", out=None, corpus=False, fuzz_steps="0", seed="1"):
    """Every lab on every kernel, one kernel's lab at a time: a lab x kernel table (Markdown in results/)."""
    from harness.fuzz import matrix as differential
    from harness.scenario import matrix
    from harness.scenario.check import LabSpec

    paths = Paths.default()
    root = _results_root(c, out)
    timeout = _number(timeout, "--timeout", "a positive number of seconds")
    steps = 0 if str(fuzz_steps) == "0" else _number(fuzz_steps, "--fuzz-steps", "a number of steps (0: no fuzz)", int)
    seed_value = _seed(seed)
    kernels = [image.resolve(paths.images, k).kernel for k in kernel] if kernel else \
        [r.kernel for r in sorted(image.recipes(paths.images), key=lambda r: tuple(map(int, r.kernel.split("."))))]
    labs = [LabSpec.load(name).name for name in lab] if lab else matrix.all_labs()
    runner = Lab(paths)
    if runner.load() is not None:
        raise SocklabError("a lab is running: the matrix boots one lab per kernel itself; `invoke lab.down` first")

    directory = _results_dir(root, "matrix")
    booted = []

    def boot(series):
        image.build(paths, series, _mirror(c, None))
        runner.up("default", c.config.lab.accel, c.config.lab.segment, boot_timeout=timeout, kernel=series)
        booted.append(series)
        return runner

    def stop(running):
        running.close()
        running.down()

    checks = [differential.corpus_check()] if corpus else []
    if steps:
        checks.append(differential.fuzz_check(steps, seed_value, lambda _lab: directory / f"fuzz-{booted[-1]}",
                                              say=progress.say))
    result = matrix.run(kernels, labs, boot, stop, say=progress.say, checks=checks)
    matrix.save(result, directory)
    sys.stdout.write(matrix.markdown(result))
    progress.say(f"{'[green]PASS[/]' if result.ok else '[red]FAIL[/]'}: {len(labs)} labs x {len(kernels)} kernels; "
                 f"report in {directory / 'matrix.md'}")
    if not result.ok:
        raise Exit(code=1)


@task(name="bench", iterable=["only"], help={
    "repeats": "runs per figure (each figure is the median); default 3",
    "only": "measure just this section (repeatable): build, boot, kernels, latency, stats, model, check, trace, memory, fuzz",
    "out": OUT_HELP,
})
@_friendly
def bench_(c, repeats="3", only=None, out=None):
    """Measure socklab: image build, cold boot vs restore, command latency, stats, model, lab checks, tracing, memory."""
    from harness.perf import bench as benching
    from harness.results import results_root

    root = results_root(out, c.config.results.dir)
    sections = tuple(only or benching.SECTIONS)
    unknown = set(sections) - set(benching.SECTIONS)
    if unknown:
        raise SocklabError(f"--only {', '.join(sorted(unknown))}: sections are {', '.join(benching.SECTIONS)}")
    repeats = _number(repeats, "--repeats", "at least 1", kind=int)
    result = benching.run(Paths.default(), repeats, sections)
    progress.show(benching.table(result))
    if result.ratios:
        progress.show(benching.ratios_table(result))
    progress.say(f"JSON: {benching.save(result, root)}")


@task(name="soak", help={
    "cycles": "how many up -> check -> down cycles (default 30)",
    "lab_name": "the lab each cycle checks, by name or directory (default 03-listen)",
    "name": NAME_HELP,
})
@_friendly
def soak_(c, cycles="30", lab_name="03-listen", name=None):
    """Leak check: cycles of lab.up -> lab.check -> lab.down, counting QEMUs, taps, netns, fds, threads, run files."""
    from harness.scenario.check import LabSpec, prepare
    from harness.perf.soak import soak

    cycles = _number(cycles, "--cycles", "at least 1", kind=int)
    prepare(LabSpec.load(lab_name))  # a lab that cannot be checked stops here, before the first boot
    lab = _lab(name)
    report = soak(lambda: Lab(lab.paths, lab.name), cycles=cycles, lab_name=lab_name,
                  say=lambda line: print(line, flush=True))
    if not report.ok:
        raise Exit(code=1)


@task(name="fuzz", help={
    "steps": "how many call steps to run (default 5000)",
    "seed": "the seed: the same seed runs the same programs (default 1)",
    "model_only": "run the programs on the model alone (no VM): a smoke test of the generator",
    "no_shrink": "report disagreements without shrinking them",
    "out": OUT_HELP + "; the shrunk disagreements go to a fuzz-SEED directory there",
    "name": NAME_HELP,
    "kernel": "the kernel (6.1, 6.12, 7.2): a live run boots the lab on it if none runs (and refuses a running lab "
              "of another); with --model-only, the kernel to model. Live runs model each VM's own kernel",
})
@_friendly
def fuzz_(c, steps="5000", seed="1", model_only=False, no_shrink=False, out=None, name=None, kernel=None):
    """Differential fuzz: random socket programs on the live kernels and the model, disagreements shrunk."""
    from harness.fuzz import cli

    count = _number(steps, "--steps", "a positive number of steps", int)
    seed_value = _seed(seed)
    series = _model_kernel(kernel)
    root = _results_root(c, out)
    if model_only:
        outcome = cli.run(None, count, seed_value, _results_dir(root, f"fuzz-{seed_value}"), progress=progress.say,
                          shrink=not no_shrink, model_kernel=series)
    else:
        lab = _lab(name)
        with lab.using():  # programs bind fixed ports: one fuzz, check or run at a time on this lab
            running = _running_lab(lab, "default", kernel=series if kernel else None)
            try:
                outcome = cli.run(running, count, seed_value, _results_dir(root, f"fuzz-{seed_value}"),
                                  progress=progress.say, shrink=not no_shrink)
            finally:
                running.close()
    print(outcome.text())


@task(name="test", help={
    "unit": "only the unit tests (no VM)",
    "live": "only the live tests (marker vm)",
    "pytest_args": "extra pytest arguments, e.g. '-k ssh -x'",
    "workers": "pytest-xdist workers (default 3; 0 runs in this process): each worker's live tests use a lab "
               "of their own, the first the running lab, worker N the lab '<name>-gwN' (booted, then stopped)",
})
def test_(c, unit=False, live=False, pytest_args="", workers=3):
    """Run the test suite: unit tests, then live VM tests (boots the lab if none runs)."""
    marker = ["-m", "not vm"] if unit else ["-m", "vm"] if live else []
    # loadgroup: a guide's blocks stay in order on one worker (tests/live/test_guides.py). Three
    # workers on two cores: a live test waits on its guests' round trips and scenario sleeps, and a
    # third worker fills that time (0-1 % idle in 10 s samples; 7 min 8 s against 8 min 17 s with two).
    parallel = ["-n", str(int(workers)), "--dist", "loadgroup"] if int(workers) > 0 else []
    try:
        extra = shlex.split(pytest_args)
    except ValueError as exc:
        raise Exit(f"socklab: --pytest-args {pytest_args!r}: {exc}", code=2) from None
    status = _pytest([sys.executable, "-m", "pytest", *parallel, *marker, *extra])
    if status:
        raise Exit(code=status)


def _pytest(argv: list[str]) -> int:
    """Run ``argv`` on this process's own terminal and return its exit status (128 + N for signal N).

    Not invoke's ``c.run``: its threads relay the output and poll stdin every 10 ms, about 2 % of a core
    for the whole run (4.6 s of CPU in a 4.5 min suite). Ctrl-C reaches pytest directly (one process
    group), and pytest stops its workers and their labs; this process waits for that, then exits as
    pytest did.
    """
    previous = signal.signal(signal.SIGINT, lambda number, frame: None)  # a handler, so the child gets the default
    try:
        status = subprocess.Popen(argv).wait()
    finally:
        signal.signal(signal.SIGINT, previous)
    return 128 - status if status < 0 else status


images = Collection("images", build, clean)
lab = Collection("lab", up, down, status, ssh, console, exec_, check_, run_, model_, trace_, predict_, grade, selfcheck,
                 soak_, matrix_, fuzz_)
ns = Collection(images, lab, test_, bench_)
for _task in [*images.tasks.values(), *lab.tasks.values(), bench_]:
    if "debug" in inspect.signature(_task.body).parameters:
        _task.help.setdefault("debug", DEBUG_HELP)
ns.configure(config.DEFAULTS)
