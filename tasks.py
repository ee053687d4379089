"""socklab tasks: `invoke --list` shows them, `invoke TASK --help` explains one.

Kept thin on purpose: every task parses its arguments, calls the harness and
prints. Errors a user can act on come out as one line and exit status 2.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
from pathlib import Path

from invoke import Collection, Exit, task
from rich.markup import escape

from harness import config, image, progress
from harness.errors import SocklabError
from harness.lab import Lab, check_up_args, topology
from harness.lab import topology as topology_of
from harness.paths import DEFAULT_LAB, Paths, check_lab_name

NAME_HELP = "which lab of this checkout (default: $SOCKLAB_LAB or 'default'); each name is a lab of its own"

# invoke reads invoke.yaml right after this import, with no check of its own: check it first.
config.check_at_import(Path(__file__).resolve().parent)


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

    complete_context._socklab = True
    ParseMachine.complete_context = complete_context


_let_tasks_check_their_vm_name()


def _friendly(fn):
    """Turn SocklabError into `socklab: <message>` and exit 2; SIGTERM behaves like Ctrl-C."""

    @functools.wraps(fn)
    def wrapper(c, *args, **kwargs):
        # invoke hands `--help` to a task's positional argument (`invoke lab.ssh --help`
        # would try to reach a VM called "--help"); show the task's help instead.
        for flag in ("--help", "-h"):
            if flag in args or flag in kwargs.values():
                where = sys.argv.index(flag) if flag in sys.argv else 0
                task_name = sys.argv[where - 1] if where > 0 else fn.__name__
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

    return wrapper


def _left_running() -> str:
    """What an interrupted command leaves, as seen now (not assumed): which labs of this install are up, or none."""
    from harness.lab import lab_names

    paths = Paths.default()
    up, stale = [], []
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
    from harness.lab import lab_names

    paths = Paths.default()
    running = lab_names(paths)
    if running:
        downs = ", ".join(f"`invoke lab.down{'' if n == DEFAULT_LAB else ' --name ' + n}`" for n in running)
        raise SocklabError(f"labs run on these images ({', '.join(running)}): {downs} first")
    removed = image.clean(paths, keys=all)
    progress.say(f"removed {len(removed)} item(s)" + "".join(f"\n  {p}" for p in removed))


@task(help={
    "topology": "which VMs to boot: default (client + server), single (server) or mixed (client 6.1, server 7.2)",
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


@task(help={"live": "also ask each guest for its lab NIC's offloads (ethtool -k over SSH)", "name": NAME_HELP})
@_friendly
def status(c, live=True, name=None):
    """Show the lab: VMs, pids, ports, accelerator, segment mode, offloads, uptime."""
    lab = _lab(name)
    state = lab.load()
    if state is None:
        progress.say("no lab is running")
        return
    _print_status(lab, state, live=live)
    lab.close()


def _print_status(lab, state, live):
    from harness.report import status_table

    progress.show(status_table(lab, state, live=live))


@task(positional=["vm"], help={"vm": "VM name, e.g. client or server", "name": NAME_HELP})
@_friendly
def ssh(c, vm=None, name=None):
    """Open an interactive SSH session to a VM (host key pinned, project key only)."""
    argv = _lab(name).ssh_argv(_vm_name(vm))
    os.execvp(argv[0], argv)


@task(positional=["vm"], help={"vm": "VM name, e.g. client or server", "name": NAME_HELP})
@_friendly
def console(c, vm=None, name=None):
    """Attach to a VM's serial console (Ctrl-] leaves)."""
    from harness.console import interact

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
    from harness import remote

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


def _running_lab(lab: Lab, topology: str) -> Lab:
    """``lab``, booted here if it does not run (it is left running for the next check)."""
    state = lab.load()
    if state is None or not state.ready or not all(lab.alive(state).values()):
        progress.say(f"no lab is running; booting one ({topology}) and leaving it up for the next check")
        image.build(lab.paths, "bookworm")
        lab.up(topology)
    elif tuple(vm.name for vm in state.vms) != topology_of(topology).vms:
        # Another topology with the same VMs (`mixed`: other kernels) runs the lab as well.
        raise SocklabError(f"the running lab is {state.topology!r} but this needs {topology!r}: `{_down_hint(lab)}` first")
    return lab


def _model_kernel(kernel) -> str:
    """A --kernel option as a series the model knows (a recipe name is taken too)."""
    if not kernel:
        return "6.1"
    from harness.model.versions import KERNELS

    if str(kernel) in KERNELS:
        return str(kernel)
    return image.resolve(Paths.default().images, str(kernel)).kernel


def _show_and_save(root, report, name: str) -> None:
    from harness.report import assertion_table, markdown, step_table, trace_panels, write_junit

    for result in report.runs:
        progress.show(step_table(result, kernel=report.kernel))
        for panel in trace_panels(result):
            progress.show(panel)
    if report.assertions:
        progress.show(assertion_table(report.assertions))
    for note in report.notes:
        progress.say(f"note: {note}")
    directory = _results_dir(root, name)
    try:
        write_junit(report, directory / "junit.xml")
        (directory / "report.md").write_text(markdown(report))
    except OSError as exc:
        # The tables above are the results; only the files are missing (a full disk, say): say where.
        verdict = "passed" if report.ok else "failed"
        raise SocklabError(f"the check {verdict} (tables above), but its report could not be written: "
                           f"{exc.filename or directory}: {exc.strerror or exc}") from None
    counts = report.counts
    verdict = "[green]PASS[/]" if report.ok else "[red]FAIL[/]"
    progress.show(f"{verdict}: {counts['steps'] - counts['step_failures']}/{counts['steps']} steps agree, "
                 f"{counts['assertions'] - counts['assertion_failures']}/{counts['assertions']} expectations hold; "
                 f"report in {directory}")
    if not report.ok:
        raise Exit(code=1)


def _trace_options(trace, depth, function=None):
    """--trace [--depth N] [--function NAME] -> TraceOptions (None without --trace); checked before any VM."""
    from harness.trace import TraceError, TraceOptions, check_depth, check_function

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
    "lab_name": "the course lab, e.g. 03-listen (see labs/README.md)",
    "param": "override a scenario parameter, e.g. --param backlog=4 (repeatable)",
    "model_only": "run on the reference model alone (no VM; the kernel expectations are skipped)",
    "out": OUT_HELP,
    "name": NAME_HELP,
    "kernel": "with --model-only: the kernel to model (6.1, 6.12, 7.2); live checks model each VM's own kernel",
    **TRACE_HELP,
})
@_friendly
def check_(c, lab_name, param=None, model_only=False, out=None, name=None, kernel=None, trace=False, depth=None):
    """Check a lab: its scenarios on the live kernels and the model, then its expectations. Exit 0 only if all agree."""
    from harness.scenario.check import LabSpec, check, prepare
    from harness.scenario.format import parse_params

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
    _show_and_save(root, report, spec.name)


@task(name="run", iterable=["param"], help={
    "file": "a scenario file (YAML)",
    "param": "override a scenario parameter, e.g. --param port=7001 (repeatable)",
    "out": OUT_HELP,
    "name": NAME_HELP,
    **TRACE_HELP,
})
@_friendly
def run_(c, file, param=None, out=None, name=None, trace=False, depth=None):
    """Run any scenario file on the live kernels and the model, step by step."""
    from pathlib import Path

    from harness.scenario.check import CheckReport, run_scenario
    from harness.scenario.format import load, parse_params

    root = _results_root(c, out)
    path = Path(file)
    options = _trace_options(trace, depth)
    scenario = load(path, parse_params(param or []), known_hosts=topology("default").vms)
    lab = _lab(name)
    with lab.using():
        report = CheckReport(scenario.name, runs=[run_scenario(scenario, _running_lab(lab, "default"),
                                                               trace=options)])
        lab.close()
    _show_and_save(root, report, path.stem)


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

    from harness import remote
    from harness.trace import TraceError, trace_program

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
})
@_friendly
def model_(c, file, param=None, no_sg=False, out=None, kernel=None):
    """Run a scenario on the reference model alone (no VM): predict, then check on the lab."""
    from pathlib import Path

    from harness.scenario.check import CheckReport, run_scenario
    from harness.scenario.format import load, parse_params

    root = _results_root(c, out)
    scenario = load(Path(file), parse_params(param or []), known_hosts=topology("default").vms)
    series = _model_kernel(kernel)
    report = CheckReport(scenario.name, runs=[run_scenario(scenario, None, scatter_gather=not no_sg,
                                                           model_kernel=series)], kernel=False)
    progress.say(f"model of Linux {series}")
    _show_and_save(root, report, Path(file).stem)


@task(iterable=["only"], help={
    "student": "the name on the report (default: $USER)",
    "only": "grade just this lab (repeatable); default: every lab in labs/",
    "out": OUT_HELP,
    "name": NAME_HELP,
})
@_friendly
def grade(c, student=None, only=None, out=None, name=None):
    """Run every lab's check on the live lab and write a per-student grade report (Markdown and CSV)."""
    import getpass

    from harness import grade as grading

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
    directory = _results_dir(root, f"grade-{student}")
    grading.write(student, grades, reports, directory, kernel)
    progress.say(f"{sum(g.passed for g in grades)}/{len(grades)} labs pass; report: {directory / 'grade.md'}, "
                 f"{directory / 'grade.csv'}")
    if not all(g.passed for g in grades):
        raise Exit(code=1)


@task(name="matrix", iterable=["kernel", "lab"], help={
    "kernel": "run on this kernel only (6.1, 6.12, 7.2 or a recipe name; repeatable); default: every recipe",
    "lab": "run this lab only (repeatable); default: every lab in labs/",
    "timeout": "seconds to wait for SSH on every guest",
    "out": OUT_HELP,
})
@_friendly
def matrix_(c, kernel=None, lab=None, timeout="300", out=None):
    """Every lab on every kernel, one kernel's lab at a time: a lab x kernel table (Markdown in results/)."""
    from harness import matrix
    from harness.scenario.check import LabSpec

    paths = Paths.default()
    root = _results_root(c, out)
    timeout = _number(timeout, "--timeout", "a positive number of seconds")
    kernels = [image.resolve(paths.images, k).kernel for k in kernel] if kernel else \
        [r.kernel for r in sorted(image.recipes(paths.images), key=lambda r: tuple(map(int, r.kernel.split("."))))]
    labs = [LabSpec.load(name).name for name in lab] if lab else matrix.all_labs()
    runner = Lab(paths)
    if runner.load() is not None:
        raise SocklabError("a lab is running: the matrix boots one lab per kernel itself; `invoke lab.down` first")

    def boot(series):
        image.build(paths, series, _mirror(c, None))
        runner.up("default", c.config.lab.accel, c.config.lab.segment, boot_timeout=timeout, kernel=series)
        return runner

    def stop(running):
        running.close()
        running.down()

    result = matrix.run(kernels, labs, boot, stop, say=progress.say)
    directory = _results_dir(root, "matrix")
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
    from harness import bench as benching
    from harness.results import results_root

    root = results_root(out, c.config.results.dir)
    sections = tuple(only or benching.SECTIONS)
    unknown = set(sections) - set(benching.SECTIONS)
    if unknown:
        raise SocklabError(f"--only {', '.join(sorted(unknown))}: sections are {', '.join(benching.SECTIONS)}")
    repeats = _number(repeats, "--repeats", "at least 1", kind=int)
    result = benching.run(Paths.default(), repeats, sections)
    progress.show(benching.table(result))
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
    from harness.soak import soak

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
    "kernel": "with --model-only: the kernel to model (6.1, 6.12, 7.2); live runs model each VM's own kernel",
})
@_friendly
def fuzz_(c, steps="5000", seed="1", model_only=False, no_shrink=False, out=None, name=None, kernel=None):
    """Differential fuzz: random socket programs on the live kernels and the model, disagreements shrunk."""
    from harness.fuzz import cli

    count = _number(steps, "--steps", "a positive number of steps", int)
    try:
        seed_value = int(seed)
    except ValueError:
        raise SocklabError(f"--seed must be an integer, not {seed!r}") from None
    if kernel and not model_only:
        raise SocklabError("--kernel goes with --model-only: a live fuzz models each VM's own kernel "
                           "(boot another with `invoke lab.up --kernel K`)")
    series = _model_kernel(kernel)
    root = _results_root(c, out)
    if model_only:
        outcome = cli.run(None, count, seed_value, _results_dir(root, f"fuzz-{seed_value}"), progress=progress.say,
                          shrink=not no_shrink, model_kernel=series)
    else:
        lab = _lab(name)
        with lab.using():  # programs bind fixed ports: one fuzz, check or run at a time on this lab
            running = _running_lab(lab, "default")
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
})
def test_(c, unit=False, live=False, pytest_args=""):
    """Run the test suite: unit tests, then live VM tests (boots the lab if none runs)."""
    marker = "-m 'not vm'" if unit else "-m vm" if live else ""
    result = c.run(f"{sys.executable} -m pytest {marker} {pytest_args}", pty=sys.stdout.isatty(), warn=True)
    if result.exited:
        raise Exit(code=result.exited)


images = Collection("images", build, clean)
lab = Collection("lab", up, down, status, ssh, console, exec_, check_, run_, model_, trace_, grade, soak_, matrix_, fuzz_)
ns = Collection(images, lab, test_, bench_)
ns.configure(config.DEFAULTS)
