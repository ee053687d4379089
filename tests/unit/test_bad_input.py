"""The bad-input corpus (tests/badinput/cases.yaml): each malformed input gives one line, exit 2, and starts nothing.

Every case runs the real CLI (invoke's own entry point, from the repo root) with its own SOCKLAB_HOME
and an empty SOCKLAB_IMAGES: with no image recipe at all, a CLI that tried to build or boot before
validating fails (and the case with it) instead of booting anything.

A hundred `python -m invoke` starts cost a second of imports each on a loaded two-core machine, so
the cases run in forks of a few pre-imported servers (tests/forkinvoke.py): each case is still a
process of its own with its own environment, stdio and exit status, running invoke's `program.run()`
exactly as `python -m invoke` does. test_forked_runs_match_python_m_invoke checks that the two agree.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.forkinvoke import Forker

REPO_ROOT = Path(__file__).resolve().parents[2]
CORPUS = REPO_ROOT / "tests" / "badinput"
# libyaml's loader where PyYAML has it: every pytest process (each xdist worker too) reads this at
# collection, and the pure-Python one takes a quarter of a second for it.
CASES = yaml.load((CORPUS / "cases.yaml").read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
TIMEOUT = 120.0
CATEGORIES = {"lab.yaml", "scenario", "template", "expectation", "param", "cli", "security", "files", "limits",
              "config", "state", "recipe"}
NOBODY = 65534  # the uid and gid a `nobody: true` case runs as


def _params():
    for case in CASES:
        marks = [pytest.mark.xfail(strict=True, reason=" ".join(case["bug"].split()))] if case.get("bug") else []
        # One worker runs every case (--dist loadgroup): ``outcomes`` runs the cases once, not once per worker.
        yield pytest.param(case, id=case["id"], marks=[*marks, pytest.mark.xdist_group("bad-input")])


@dataclass
class Outcome:
    argv: list[str]
    returncode: int
    stderr: str
    stdout: str
    home: Path
    tmp: Path
    leftovers: list[str]  # what the run started or left behind


def _case_path(case: dict) -> str:
    return str((CORPUS / case["case"]).relative_to(REPO_ROOT)) if case.get("case") else ""


def _qemu_using(*markers: str) -> list[int]:
    """QEMUs whose command line names any of ``markers`` (our own case dirs)."""
    wanted = [marker.encode() for marker in markers]
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if b"qemu-system" in cmdline and any(marker in cmdline for marker in wanted):
                pids.append(int(entry.name))
    return pids


def _results_for(case: dict) -> set[Path]:
    """Report directories a check of this case would write (results/<lab or scenario stem>-<time>)."""
    results = REPO_ROOT / "results"
    if not case.get("case") or not results.is_dir():
        return set()
    path = Path(case["case"])
    return {p for stem in {path.name, path.stem} for p in results.glob(f"{stem}-2*")}


def _subprocess(argv: list[str], env: dict[str, str], uid: int | None = None,
                template_seconds: float | None = None) -> tuple[int, str, str]:
    """`python -m invoke ARGV`, the way a user runs it."""
    assert uid is None, "a case run as another user needs the fork server (this interpreter is in root's home)"
    assert template_seconds is None, "only the fork server can shorten the template time budget"
    try:
        result = subprocess.run([sys.executable, "-m", "invoke", *argv], cwd=REPO_ROOT, env=env, capture_output=True,
                                text=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return -1, "", f"timed out after {TIMEOUT:.0f} s"
    return result.returncode, result.stdout, result.stderr


def _fill(text: str, case: dict, tmp: Path) -> str:
    """{case}, {tmp}, {home} and {private} (the private copy of the case) in an argv entry."""
    return (text.replace("{case}", _case_path(case)).replace("{tmp}", str(tmp)).replace("{home}", str(tmp / "home"))
            .replace("{private}", str(tmp / "private" / Path(case.get("case", "x")).name)))


def _install(case: dict, tmp: Path, home: Path, images: Path) -> set[Path]:
    """What a case sets up before it runs: a damaged state file, a recipe, a private copy of its input.

    Returns the files put into the images directory (the only ones allowed there afterwards).
    """
    if case.get("state"):
        (home / "run").mkdir(mode=0o700)
        shutil.copyfile(CORPUS / case["state"], home / "run" / "lab.json")
    installed = set()
    if case.get("recipe"):
        target = images / f"{Path(case['recipe']).stem}.yaml"
        shutil.copyfile(CORPUS / case["recipe"], target)
        installed.add(target)
    if case.get("private"):
        # A copy only its owner (root) can read, in directories anyone may search: for `nobody: true`.
        tmp.chmod(0o755)
        private = tmp / "private" / Path(case["case"]).name
        source = CORPUS / case["case"]
        if source.is_dir():
            shutil.copytree(source, private)
        else:
            private.parent.mkdir()
            shutil.copyfile(source, private)
        private.parent.chmod(0o755)
        for path in [private, *private.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o600)
    return installed


def _run(case: dict, runner=_subprocess) -> Outcome:
    tmp = Path(tempfile.mkdtemp(prefix=f"socklab-badinput-{case['id']}-"))
    home, images = tmp / "home", tmp / "images"
    home.mkdir()
    images.mkdir()
    installed = _install(case, tmp, home, images)
    argv = [_fill(arg, case, tmp) for arg in case["argv"]]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOCKLAB_")}
    env.update(SOCKLAB_HOME=str(home), SOCKLAB_IMAGES=str(images), SOCKLAB_CACHE=str(tmp / "cache"),
               COLUMNS="200", TERM="dumb")
    before = _results_for(case)
    # `template_seconds: S`: the template time budget is S, not 5 s, in this case's run (the fork server sets it).
    budget = {"template_seconds": case["template_seconds"]} if "template_seconds" in case else {}
    if case.get("nobody"):
        env["HOME"] = str(tmp)  # a student has a home of their own (invoke reads ~/.invoke.yaml)
        returncode, stdout, stderr = runner(argv, env, uid=NOBODY, **budget)
    else:
        returncode, stdout, stderr = runner(argv, env, **budget)
    leftovers = []
    run_files = sorted(p.relative_to(home) for p in (home / "run").rglob("*")) if (home / "run").exists() else []
    if (home / "run").exists() and run_files != [Path("run/lab.json")] * bool(case.get("state")):
        leftovers.append(f"{home / 'run'} exists with {[str(p) for p in run_files]}")
    if case.get("state") and (home / "run" / "lab.json").read_bytes() != (CORPUS / case["state"]).read_bytes():
        leftovers.append("the damaged state file was changed (only lab.down may clear it)")
    if (tmp / "pwned").exists():
        leftovers.append(f"{tmp / 'pwned'} was created: a shell ran user input")
    if set(images.iterdir()) != installed or (tmp / "cache").exists():
        leftovers.append("something was written to the image dirs")
    pids = _qemu_using(str(tmp))
    if pids:
        leftovers.append(f"QEMU started: pids {pids}")
    from harness.lab.state import lab_id
    from harness.paths import Paths

    netns = f"socklab-{lab_id(Paths(images=images, home=home))}"
    if Path("/run/netns", netns).exists():
        leftovers.append(f"netns {netns} exists")
    for stray in _results_for(case) - before:
        leftovers.append(f"{stray} was written: the check ran")
        shutil.rmtree(stray, ignore_errors=True)
    return Outcome(argv, returncode, stderr, stdout, home, tmp, leftovers)


@pytest.fixture(scope="session")
def outcomes(request) -> dict[str, Outcome]:
    """Run every selected case once, in parallel; clean up whatever a case left behind."""
    selected = [item.callspec.params["case"] for item in request.session.items
                if getattr(item, "callspec", None) and "case" in item.callspec.params
                and item.module.__name__ == __name__]
    workers = max(2, os.cpu_count() or 2)

    def run_chunk(chunk: list[dict]) -> list[Outcome]:
        if not chunk:
            return []
        forker = Forker()
        try:
            return [_run(case, forker) for case in chunk]
        finally:
            forker.close()

    chunks = [selected[i::workers] for i in range(workers)]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        done = {case["id"]: outcome for chunk, outcomes in zip(chunks, pool.map(run_chunk, chunks))
                for case, outcome in zip(chunk, outcomes)}
    yield done
    # One look at /proc for all cases (a scan per case made this teardown take seconds), then the dirs.
    for pid in _qemu_using(*(str(outcome.tmp) for outcome in done.values())):  # only ever ours: they name our dirs
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
    for outcome in done.values():
        shutil.rmtree(outcome.tmp, ignore_errors=True)


@pytest.mark.parametrize("case", list(_params()))
def test_bad_input_gives_one_line_and_starts_nothing(case, outcomes):
    outcome = outcomes[case["id"]]
    lines = [line for line in outcome.stderr.splitlines() if line.strip()]
    shown = f"$ invoke {' '.join(outcome.argv)}\nexit {outcome.returncode}\nstderr:\n{outcome.stderr[-3000:]}"
    assert outcome.returncode == case.get("exit", 2), shown
    assert len(lines) == 1, shown
    assert lines[0].startswith("socklab: "), shown
    pattern = (case["error"].replace("{case}", re.escape(_case_path(case)))
               .replace("{home}", re.escape(str(outcome.home))).replace("{tmp}", re.escape(str(outcome.tmp))))
    assert re.search(pattern, lines[0]), f"{shown}\nwanted: {pattern}"
    assert not outcome.leftovers, f"{shown}\nleft behind: {outcome.leftovers}"


def test_the_corpus_is_well_formed():
    ids = [case["id"] for case in CASES]
    assert len(ids) == len(set(ids)), "duplicate ids"
    assert len(CASES) >= 160
    for case in CASES:
        assert set(case) <= {"id", "category", "case", "argv", "error", "bug", "exit", "state", "recipe", "private",
                             "nobody", "template_seconds"}, case["id"]
        assert case.get("exit", 2) in (2, 255), case["id"]
        for field in ("state", "recipe"):
            if case.get(field):
                assert (CORPUS / case[field]).is_file(), case["id"]
        if case.get("private"):
            assert case.get("nobody") and case.get("case"), case["id"]
        assert case["category"] in CATEGORIES, case["id"]
        assert case["error"].startswith("^socklab: "), case["id"]
        re.compile(case["error"].replace("{case}", "x"))
        if case.get("case"):
            assert (CORPUS / case["case"]).exists(), case["id"]
            assert any("{case}" in arg or "{private}" in arg for arg in case["argv"]), case["id"]
    assert {case["category"] for case in CASES} == CATEGORIES


def test_every_corpus_file_is_used():
    used = {CORPUS / case[field] for case in CASES for field in ("case", "state", "recipe") if case.get(field)}
    for path in CORPUS.rglob("*"):
        # .gitkeep keeps a directory that stands where a file belongs (labs/*/steps.yaml/)
        if path.is_file() and path.name not in ("cases.yaml", ".gitkeep") and path.parent.parent.name != "labs":
            assert path in used or any(p in path.parents for p in used), f"{path} belongs to no case"
    for lab in (CORPUS / "labs").iterdir():
        assert lab in used or any(lab in p.parents for p in used), f"{lab} belongs to no case"


def test_the_good_baseline_is_good():
    """The cases that vary one thing of tests/badinput/labs/good fail for that thing, not another."""
    from harness.scenario import expect
    from harness.scenario.check import LabSpec
    from harness.scenario.format import load

    spec = LabSpec.load(str(CORPUS / "labs" / "good"))
    scenario = load(spec.scenarios[0])
    assert scenario.params == {"port": 7000, "backlog": 2}
    assert len(expect.precheck(spec.expected, scenario.params, scenario.hosts)) == 1


@pytest.mark.parametrize("case_id", ["scenario-unknown-call", "cli-timeout-not-a-number", "cli-exec-without-vm",
                                     "scenario-bad-addr-port"])
def test_forked_runs_match_python_m_invoke(case_id):
    """The fork server gives what `python -m invoke` gives: status and stderr (tracebacks aside), for good and bad."""
    case = next(c for c in CASES if c["id"] == case_id)
    forker = Forker()
    try:
        forked = _run(case, forker)
    finally:
        forker.close()
    real = _run(case, _subprocess)
    for outcome in (forked, real):
        shutil.rmtree(outcome.tmp, ignore_errors=True)
    assert forked.returncode == real.returncode
    first = lambda text: text.replace(str(forked.tmp), "TMP").replace(str(real.tmp), "TMP").splitlines()[-1:]  # noqa: E731
    assert first(forked.stderr) == first(real.stderr)
    assert forked.leftovers == real.leftovers == []

