"""The invoke tasks as a user meets them: --help everywhere, one-line errors with exit 2 on bad input."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time

import pytest

from harness.paths import REPO_ROOT
from tests import forkinvoke

TASKS = ["images.build", "images.clean", "lab.up", "lab.down", "lab.status", "lab.ssh", "lab.console",
         "lab.exec", "test"]


def invoke(*args: str, home) -> subprocess.CompletedProcess:
    """`invoke ARGS` from the checkout, forked from a pre-imported server (tests/forkinvoke.py).

    The tests below that run `python -m invoke` itself (another working directory, SOCKLAB_LAB) keep
    the real start.
    """
    return forkinvoke.invoke(list(args), dict(os.environ, SOCKLAB_HOME=str(home)))


@pytest.mark.parametrize("name", TASKS)
def test_every_task_explains_itself(name, tmp_path):
    result = invoke(name, "--help", home=tmp_path)
    assert result.returncode == 0
    assert "Docstring:" in result.stdout and len(result.stdout.split("Docstring:")[1].strip()) > 20


@pytest.mark.parametrize("args,message", [
    (["lab.up", "--topology", "mesh"], "socklab: unknown topology 'mesh'; known: default, lossy, mixed, single"),
    (["lab.up", "--accel", "hvf"], "socklab: unknown accelerator 'hvf'; use one of: auto, kvm, tcg"),
    (["lab.up", "--segment", "vde"], "socklab: unknown segment mode 'vde'"),
    (["lab.up", "--timeout", "-5"], "socklab: --timeout must be a positive number of seconds"),
    (["lab.console", "server"], "socklab: no lab is running"),
    (["images.build", "--recipe", "sid"], "socklab: unknown kernel or image recipe 'sid'"),
    (["lab.exec"], "socklab: name a VM: client or server"),
    (["lab.exec", "--", "ls"], "socklab: name a VM: client or server"),
    (["lab.ssh"], "socklab: name a VM: client or server"),
    (["lab.ssh", "client", "--", "uname", "-a"], "socklab: lab.ssh opens an interactive session and runs no command"),
    (["lab.console"], "socklab: name a VM: client or server"),
    (["lab.exec", "server"], "socklab: no command: put it after --"),
    (["lab.check", "01-sockets-are-files", "--out", ""], "socklab: the results directory is empty"),
    (["lab.down", "--name", "../x"], "socklab: lab name '../x': use 1-32 of a-z, 0-9"),
    (["lab.up", "--name", "Big Lab"], "socklab: lab name 'Big Lab'"),
    (["lab.status", "--name", "a/b"], "socklab: lab name 'a/b'"),
])
def test_bad_input_is_one_line_and_exit_2(args, message, tmp_path):
    result = invoke(*args, home=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(message)
    assert not (tmp_path / "run").exists()  # nothing was started


def test_exec_says_no_lab_with_ssh_s_own_failure_status(tmp_path):
    """socklab's own failures exit 255, so they never look like the guest command's status."""
    result = invoke("lab.exec", "server", "--", "true", home=tmp_path)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert (result.returncode, lines) == (255, ["socklab: no lab is running: start one with `invoke lab.up`"])


def test_status_without_a_lab(tmp_path):
    result = invoke("lab.status", home=tmp_path)
    assert result.returncode == 0 and "no lab is running" in result.stderr


def test_down_without_a_lab_succeeds_twice(tmp_path):
    assert invoke("lab.down", home=tmp_path).returncode == 0
    assert invoke("lab.down", home=tmp_path).returncode == 0


@pytest.mark.parametrize("home,message", [
    ("", "socklab: SOCKLAB_HOME is empty"),
    ("/", "socklab: SOCKLAB_HOME='/' is the root directory"),
    (str(REPO_ROOT), "socklab: SOCKLAB_HOME="),
])
def test_an_unusable_home_is_one_line_and_touches_nothing(home, message, tmp_path):
    """An empty home once made lab.down delete ./run and chmod the current directory to 0700."""
    (tmp_path / "run").mkdir()
    tmp_path.chmod(0o755)
    env = dict(os.environ, SOCKLAB_HOME=home)
    result = subprocess.run([sys.executable, "-m", "invoke", "--search-root", str(REPO_ROOT), "lab.down"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith(message), result.stderr
    assert (tmp_path / "run").is_dir() and (tmp_path.stat().st_mode & 0o777) == 0o755


def test_a_named_lab_uses_its_own_directory(tmp_path):
    result = invoke("lab.status", "--name", "second", home=tmp_path)
    assert result.returncode == 0 and "no lab is running" in result.stderr
    result = invoke("lab.down", home=tmp_path, **{})
    assert result.returncode == 0
    env_result = subprocess.run([sys.executable, "-m", "invoke", "lab.down"], cwd=REPO_ROOT,
                                env=dict(os.environ, SOCKLAB_HOME=str(tmp_path), SOCKLAB_LAB="bad name"),
                                capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert env_result.returncode == 2 and "socklab: lab name 'bad name'" in env_result.stderr


def _tasks_module(monkeypatch, home):
    import importlib.util

    monkeypatch.setenv("SOCKLAB_HOME", str(home))
    spec = importlib.util.spec_from_file_location("socklab_tasks_under_test", REPO_ROOT / "tasks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_interrupted_says_nothing_is_left_when_no_lab_runs(monkeypatch, tmp_path):
    tasks = _tasks_module(monkeypatch, tmp_path)
    assert tasks._left_running() == "no lab is running (nothing was left started)"


def test_interrupted_says_the_lab_stays_up_when_it_does(monkeypatch, tmp_path):
    from harness.lab import lifecycle as lab_mod
    from harness.lab.lifecycle import Lab
    from harness.lab.state import LabState, VMState

    tasks = _tasks_module(monkeypatch, tmp_path)
    vm = VMState(name="server", index=1, ssh_port=1, lab_ip="198.51.100.2/24", mgmt_mac="m", lab_mac="l", pid=4242)
    Lab().save(LabState(lab_id="x", topology="single", vms=[vm]))
    monkeypatch.setattr(lab_mod.qemu, "is_running", lambda pid, name: pid == 4242)
    assert tasks._left_running() == "the lab stays up (server; `invoke lab.down` stops it)"
    monkeypatch.setattr(lab_mod.qemu, "is_running", lambda pid, name: False)
    assert "not running but its state is left" in tasks._left_running()


def test_interrupted_with_damaged_state_names_it(monkeypatch, tmp_path):
    tasks = _tasks_module(monkeypatch, tmp_path)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "lab.json").write_text("[]")
    assert "unreadable lab state" in tasks._left_running()


def _good_report():
    from harness.scenario.check import CheckReport, run_scenario
    from harness.scenario.format import load

    scenario = load(REPO_ROOT / "tests" / "badinput" / "labs" / "good" / "scenario.yaml")
    return CheckReport("good", runs=[run_scenario(scenario, None)], kernel=False)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to an unprivileged user")
def test_a_read_only_results_root_is_named_after_the_tables(monkeypatch, tmp_path):
    """A student's read-only checkout: the tables are printed, then one line says where the report could not go."""
    import rich._emoji_codes  # noqa: F401 - the child cannot read root's site-packages to import it late
    import rich.panel  # noqa: F401 - likewise, for the traced-step panels
    import html  # noqa: F401 - the HTML report's escaping, imported late by the report writer
    import harness.lab.status  # noqa: F401
    from tests.unit.test_load import as_nobody

    tasks = _tasks_module(monkeypatch, tmp_path)
    root = tmp_path / "results"  # under pytest's 0700 tmp dir: uid 65534 cannot create it
    message = as_nobody(tasks._show_and_save, root, _good_report(), "read-only-checkout-test")
    assert message == (f"SocklabError: cannot write reports to {root}: Permission denied; "
                       "choose another place with --out DIR or SOCKLAB_RESULTS"), message


def test_a_report_file_that_cannot_be_written_says_the_check_s_verdict_and_where(monkeypatch, tmp_path):
    import errno

    from harness.lab import status as report_mod
    from harness.errors import SocklabError

    tasks = _tasks_module(monkeypatch, tmp_path)

    def disk_full(report, path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(report_mod, "write_junit", disk_full)
    with pytest.raises(SocklabError, match=r"^the check passed \(tables above\), but its report could not be "
                                           r"written: \S+/junit\.xml: No space left on device$"):
        tasks._show_and_save(tmp_path / "results", _good_report(), "disk-full-test")



@pytest.mark.parametrize("kwargs,wanted,unwanted", [
    ({}, ["-n 3 --dist loadgroup"], ["-m vm", "-m 'not vm'"]),
    ({"workers": 0}, [], ["-n ", "--dist"]),
    ({"workers": "2", "live": True}, ["-n 2 --dist loadgroup", "-m vm"], []),
    ({"unit": True, "pytest_args": "-k ssh"}, ["-n 3", "-m 'not vm'", "-k ssh"], []),
])
def test_invoke_test_runs_pytest_in_workers_unless_told_not_to(kwargs, wanted, unwanted, monkeypatch, tmp_path):
    tasks = _tasks_module(monkeypatch, tmp_path)
    ran = []
    monkeypatch.setattr(tasks, "_pytest", lambda argv: ran.append(shlex.join(argv)) or 0)
    tasks.test_.body(None, **kwargs)
    assert len(ran) == 1 and f"{ran[0]} ".startswith(f"{shlex.quote(sys.executable)} -m pytest ")
    assert all(text in ran[0] for text in wanted) and not any(text in ran[0] for text in unwanted), ran[0]


def test_invoke_test_passes_on_pytests_status_and_a_signal_as_128_plus_it(monkeypatch, tmp_path):
    tasks = _tasks_module(monkeypatch, tmp_path)
    assert tasks._pytest([sys.executable, "-c", "raise SystemExit(5)"]) == 5
    assert tasks._pytest([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGTERM)"]) == 143
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back after


def test_ctrl_c_in_invoke_test_lets_pytest_finish_its_teardown(tmp_path):
    """Ctrl-C reaches the whole foreground group: pytest gets it, and `invoke test` waits for its teardown."""
    child = ("import sys, time\nprint('started', flush=True)\ntry:\n    time.sleep(60)\n"
             "except KeyboardInterrupt:\n    time.sleep(1)\n    print('torn down', flush=True)\n    sys.exit(2)\n")
    parent = (f"import sys; sys.path.insert(0, {str(REPO_ROOT)!r}); import tasks; "
              f"sys.exit(tasks._pytest([sys.executable, '-c', {child!r}]))")
    proc = subprocess.Popen([sys.executable, "-c", parent], cwd=tmp_path, stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    assert proc.stdout.readline() == "started\n"
    time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
    out, _ = proc.communicate(timeout=30)
    assert (proc.returncode, out) == (2, "torn down\n")


class _FakeLab:
    """What _running_lab asks of a lab: its state, which VMs live, up(); records the boots."""

    name = "default"

    def __init__(self, kernels):
        from harness.lab.state import LabState, VMState

        self.paths = None
        self.boots = []
        self.state = None if kernels is None else LabState(lab_id="x", topology="default", ready=True, vms=[
            VMState(name=name, index=i, ssh_port=1, lab_ip="198.51.100.1/24", mgmt_mac="m", lab_mac="l", pid=1,
                    kernel=kernel) for i, (name, kernel) in enumerate(zip(("client", "server"), kernels))])

    def load(self):
        return self.state

    def alive(self, state):
        return {vm.name: True for vm in state.vms}

    def up(self, topology, kernel="bookworm"):
        self.boots.append((topology, kernel))


def test_a_live_fuzz_with_kernel_boots_the_lab_on_it_and_refuses_a_running_lab_of_another(monkeypatch, tmp_path):
    from harness.errors import SocklabError

    tasks = _tasks_module(monkeypatch, tmp_path)
    built = []
    monkeypatch.setattr(tasks.image, "build", lambda paths, recipe: built.append(recipe))
    idle = _FakeLab(None)
    assert tasks._running_lab(idle, "default", kernel="6.12") is idle
    assert built == ["6.12"] and idle.boots == [("default", "6.12")]

    newer = _FakeLab(["6.12.118+deb13-cloud-amd64", "6.12.118+deb13-cloud-amd64"])
    assert tasks._running_lab(newer, "default", kernel="6.12") is newer and newer.boots == []
    older = _FakeLab(["6.1.0-57-cloud-amd64", "6.1.0-57-cloud-amd64"])
    with pytest.raises(SocklabError, match=r"the running lab runs 6\.1, not 7\.2: `invoke lab.down` first"):
        tasks._running_lab(older, "default", kernel="7.2")
    assert tasks._running_lab(older, "default") is older and older.boots == []  # no --kernel: any kernel will do
