"""socklab tasks: `invoke --list` shows them, `invoke TASK --help` explains one.

Kept thin on purpose: every task parses its arguments, calls the harness and
prints. Errors a user can act on come out as one line and exit status 2.
"""

from __future__ import annotations

import functools
import os
import signal
import sys

from invoke import Collection, Exit, task
from rich.markup import escape

from harness import image, progress
from harness.errors import SocklabError
from harness.lab import Lab, check_up_args, topology
from harness.paths import Paths


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
            progress.console.print("[yellow]socklab: interrupted; everything started was stopped[/]")
            raise Exit(code=130) from None

    return wrapper


def _number(text, option: str, what: str, kind=float):
    """A number given on the command line; invoke would otherwise turn a typo into a traceback."""
    try:
        value = kind(text)
    except (TypeError, ValueError):
        raise SocklabError(f"{option} must be {what}, not {text!r}") from None
    if value <= 0:
        raise SocklabError(f"{option} must be {what}, not {text}")
    return value


def _vm_name(name) -> str:
    if not name:
        raise SocklabError("name a VM: client or server (e.g. `invoke lab.ssh server`)")
    return name


def _mirror(c, mirror):
    return mirror or os.environ.get("SOCKLAB_MIRROR") or c.config.images.mirror or None


@task(help={
    "recipe": "image recipe in images/ (default: bookworm)",
    "force": "rebuild even when a complete cache entry exists",
    "mirror": "Debian mirror for mmdebstrap (default: mmdebstrap's own; also SOCKLAB_MIRROR or images.mirror in invoke.yaml)",
})
@_friendly
def build(c, recipe=None, force=False, mirror=None):
    """Build the Debian guest image (mmdebstrap), cached by recipe hash; a no-op when cached."""
    img, built = image.build(Paths.default(), recipe or c.config.images.recipe, _mirror(c, mirror), force=force)
    state = "built" if built else "cached"
    progress.say(f"image {state}: {img.directory}  (kernel {img.kernel_release})")


@task(help={"all": "also remove the per-install SSH key (the next build makes a new one)"})
@_friendly
def clean(c, all=False):
    """Remove the image cache (and with --all the SSH key). The running lab must be down."""
    paths = Paths.default()
    if Lab(paths).load() is not None:
        raise SocklabError("a lab is running on these images: `invoke lab.down` first")
    removed = image.clean(paths, keys=all)
    progress.say(f"removed {len(removed)} item(s)" + "".join(f"\n  {p}" for p in removed))


@task(help={
    "topology": "which VMs to boot: default (client + server) or single (server)",
    "accel": "auto (probe KVM, fall back to TCG), kvm or tcg",
    "segment": "lab segment: auto (tap as root, else socket), tap or socket",
    "timeout": "seconds to wait for SSH on every guest",
    "cold": "boot from scratch even when a ready snapshot exists (and save no new one)",
})
@_friendly
def up(c, topology=None, accel=None, segment=None, timeout="120", cold=False):
    """Boot the lab: build the image if needed, start the VMs, wait until SSH answers.

    The first boot saves a ready snapshot of every VM; later ones resume it
    (about a second) unless --cold is given or the image or VM setup changed.
    """
    topology, accel = topology or c.config.lab.topology, accel or c.config.lab.accel
    segment = segment or c.config.lab.segment
    timeout = _number(timeout, "--timeout", "a positive number of seconds")
    check_up_args(topology, accel, segment, timeout)
    paths = Paths.default()
    image.build(paths, c.config.images.recipe, _mirror(c, None))
    lab = Lab(paths)
    state, started = lab.up(topology, accel, segment, boot_timeout=timeout, cold=cold)
    try:
        if not started:
            progress.say("a lab is already running; not starting another (`invoke lab.down` stops it)")
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


@task
@_friendly
def down(c):
    """Stop the lab: QMP quit, kill leftovers, remove taps, netns, overlays and state. Idempotent."""
    Lab().down()


@task(help={"live": "also ask each guest for its lab NIC's offloads (ethtool -k over SSH)"})
@_friendly
def status(c, live=True):
    """Show the lab: VMs, pids, ports, accelerator, segment mode, offloads, uptime."""
    lab = Lab()
    state = lab.load()
    if state is None:
        progress.say("no lab is running")
        return
    _print_status(lab, state, live=live)
    lab.close()


def _print_status(lab, state, live):
    from harness.report import status_table

    progress.console.print(status_table(lab, state, live=live))


@task(positional=["name"], help={"name": "VM name, e.g. client or server"})
@_friendly
def ssh(c, name=None):
    """Open an interactive SSH session to a VM (host key pinned, project key only)."""
    argv = Lab().ssh_argv(_vm_name(name))
    os.execvp(argv[0], argv)


@task(positional=["name"], help={"name": "VM name, e.g. client or server"})
@_friendly
def console(c, name=None):
    """Attach to a VM's serial console (Ctrl-] leaves)."""
    from harness.console import interact

    vm = Lab().require().vm(_vm_name(name))
    interact(vm.console_path, name)


@task(name="exec", positional=["name"], help={"name": "VM name; the command follows `--`, e.g. invoke lab.exec server -- ss -ltn"})
@_friendly
def exec_(c, name=None, timeout="60"):
    """Run one command on a VM over SSH and print its output; exits with its status."""
    name = _vm_name(name)
    timeout = _number(timeout, "--timeout", "a positive number of seconds")
    command = c.remainder.strip()
    if not command:
        raise SocklabError("no command: put it after --, e.g. `invoke lab.exec server -- ss -ltn`")
    lab = Lab()
    result = lab.ssh(name).run(command, timeout=timeout)
    sys.stdout.write(result.stdout)
    sys.stderr.write(result.stderr)
    lab.close()
    if result.exit_status:
        raise Exit(code=result.exit_status)


def _results_dir(name: str):
    import time
    from harness.paths import REPO_ROOT

    directory = REPO_ROOT / "results" / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def _running_lab(topology: str):
    """The running lab (booted here if none runs; it is left running for the next check)."""
    lab = Lab()
    state = lab.load()
    if state is None or not all(lab.alive(state).values()):
        progress.say(f"no lab is running; booting one ({topology}) and leaving it up for the next check")
        image.build(lab.paths, "bookworm")
        lab.up(topology)
    elif state.topology != topology:
        raise SocklabError(f"the running lab is {state.topology!r} but this needs {topology!r}: `invoke lab.down` first")
    return lab


def _show_and_save(report, name: str) -> None:
    from harness.report import assertion_table, markdown, step_table, write_junit

    for result in report.runs:
        progress.console.print(step_table(result, kernel=report.kernel))
    if report.assertions:
        progress.console.print(assertion_table(report.assertions))
    for note in report.notes:
        progress.say(f"note: {note}")
    directory = _results_dir(name)
    write_junit(report, directory / "junit.xml")
    (directory / "report.md").write_text(markdown(report))
    counts = report.counts
    verdict = "[green]PASS[/]" if report.ok else "[red]FAIL[/]"
    progress.say(f"{verdict}: {counts['steps'] - counts['step_failures']}/{counts['steps']} steps agree, "
                 f"{counts['assertions'] - counts['assertion_failures']}/{counts['assertions']} expectations hold; "
                 f"report in {directory}")
    if not report.ok:
        raise Exit(code=1)


@task(name="check", iterable=["param"], help={
    "name": "the lab, e.g. 03-listen (see labs/README.md)",
    "param": "override a scenario parameter, e.g. --param backlog=4 (repeatable)",
    "model_only": "run on the reference model alone (no VM; the kernel expectations are skipped)",
})
@_friendly
def check_(c, name, param=None, model_only=False):
    """Check a lab: its scenarios on the live kernels and the model, then its expectations. Exit 0 only if all agree."""
    from harness.scenario.check import LabSpec, check, prepare
    from harness.scenario.format import parse_params

    spec = LabSpec.load(name)
    overrides = parse_params(param or [])
    prepare(spec, overrides)  # every input checked before a VM is booted or touched
    lab = None if model_only else _running_lab(spec.topology)
    report = check(spec, lab, overrides)
    if lab is not None:
        lab.close()
    _show_and_save(report, spec.name)


@task(name="run", iterable=["param"], help={
    "file": "a scenario file (YAML)",
    "param": "override a scenario parameter, e.g. --param port=7001 (repeatable)",
})
@_friendly
def run_(c, file, param=None):
    """Run any scenario file on the live kernels and the model, step by step."""
    from pathlib import Path

    from harness.scenario.check import CheckReport, run_scenario
    from harness.scenario.format import load, parse_params

    path = Path(file)
    scenario = load(path, parse_params(param or []), known_hosts=topology("default").vms)
    lab = _running_lab("default")
    report = CheckReport(scenario.name, runs=[run_scenario(scenario, lab)])
    lab.close()
    _show_and_save(report, path.stem)


@task(name="model", iterable=["param"], help={
    "file": "a scenario file (YAML)",
    "param": "override a scenario parameter (repeatable)",
    "no_sg": "model a lab NIC without scatter-gather (as in socket-segment mode)",
})
@_friendly
def model_(c, file, param=None, no_sg=False):
    """Run a scenario on the reference model alone (no VM): predict, then check on the lab."""
    from pathlib import Path

    from harness.scenario.check import CheckReport, run_scenario
    from harness.scenario.format import load, parse_params

    scenario = load(Path(file), parse_params(param or []), known_hosts=topology("default").vms)
    report = CheckReport(scenario.name, runs=[run_scenario(scenario, None, scatter_gather=not no_sg)], kernel=False)
    _show_and_save(report, Path(file).stem)


@task(iterable=["only"], help={
    "student": "the name on the report (default: $USER)",
    "only": "grade just this lab (repeatable); default: every lab in labs/",
})
@_friendly
def grade(c, student=None, only=None):
    """Run every lab's check on the live lab and write a per-student grade report (Markdown and CSV)."""
    import getpass

    from harness import grade as grading

    from harness.scenario.check import LabSpec, prepare

    student = student or os.environ.get("USER") or getpass.getuser()
    for name in only or []:
        prepare(LabSpec.load(name))  # a misspelt --only stops here, before a boot
    lab = _running_lab("default")

    def show(name, report):
        verdict = "[red]cannot run[/]" if report is None else "[green]pass[/]" if report.ok else "[red]FAIL[/]"
        progress.say(f"{name}: {verdict}")

    grades, reports = grading.grade(lab, list(only or []) or None, on_lab=show)
    kernel = lab.ssh(lab.require().vms[0].name).run("uname -r").stdout.strip()
    lab.close()
    directory = _results_dir(f"grade-{student}")
    grading.write(student, grades, reports, directory, kernel)
    progress.say(f"{sum(g.passed for g in grades)}/{len(grades)} labs pass; report: {directory / 'grade.md'}, "
                 f"{directory / 'grade.csv'}")
    if not all(g.passed for g in grades):
        raise Exit(code=1)


@task(name="bench", iterable=["only"], help={
    "repeats": "runs per figure (each figure is the median); default 3",
    "only": "measure just this section (repeatable): build, boot, latency, stats, model, check, memory",
})
@_friendly
def bench_(c, repeats="3", only=None):
    """Measure socklab: image build, cold boot vs restore, command latency, stats, model, lab checks, memory."""
    from harness import bench as benching
    from harness.paths import REPO_ROOT

    sections = tuple(only or benching.SECTIONS)
    unknown = set(sections) - set(benching.SECTIONS)
    if unknown:
        raise SocklabError(f"--only {', '.join(sorted(unknown))}: sections are {', '.join(benching.SECTIONS)}")
    repeats = _number(repeats, "--repeats", "at least 1", kind=int)
    result = benching.run(Paths.default(), repeats, sections)
    progress.console.print(benching.table(result))
    progress.say(f"JSON: {benching.save(result, REPO_ROOT / 'results')}")


@task(name="soak", help={
    "cycles": "how many up -> check -> down cycles (default 30)",
    "lab_name": "the lab each cycle checks, by name or directory (default 03-listen)",
})
@_friendly
def soak_(c, cycles="30", lab_name="03-listen"):
    """Leak check: cycles of lab.up -> lab.check -> lab.down, counting QEMUs, taps, netns, fds, threads, run files."""
    from harness.soak import soak

    cycles = _number(cycles, "--cycles", "at least 1", kind=int)
    report = soak(Paths.default(), cycles=cycles, lab_name=lab_name, say=lambda line: print(line, flush=True))
    if not report.ok:
        raise Exit(code=1)


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
lab = Collection("lab", up, down, status, ssh, console, exec_, check_, run_, model_, grade, soak_)
ns = Collection(images, lab, test_, bench_)
ns.configure({
    "images": {"recipe": "bookworm", "mirror": None},
    "lab": {"topology": "default", "accel": "auto", "segment": "auto"},
})
