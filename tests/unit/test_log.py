"""The debug log (harness/log.py): off by default and silent, on with --debug / SOCKLAB_DEBUG, and what it shows."""

from __future__ import annotations

import io
import json
import logging
import os
from pathlib import Path

import pytest

from harness import log as debug_log
from harness.guest.ssh import GuestSSH
from harness.vm import qemu
from tests import forkinvoke

from .fakes import FakePopen, FakeSSHServer
from .test_agent_client import LocalGuestSSH, local_agent, remote_dir  # noqa: F401 - remote_dir is a fixture
from .test_qemu import make_spec
from .test_ssh import keygen

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def shown():
    """Debug on into a buffer for the test, then back to the quiet setup the CLI has by default."""
    stream = io.StringIO()
    debug_log.configure(True, stream=stream)
    yield stream
    debug_log.configure(False)
    logging.getLogger("harness").setLevel(logging.NOTSET)


def test_env_debug_reads_the_usual_spellings():
    assert debug_log.env_debug({"SOCKLAB_DEBUG": "1"}) and debug_log.env_debug({"SOCKLAB_DEBUG": "yes"})
    assert not any(debug_log.env_debug({"SOCKLAB_DEBUG": value}) for value in ("", "0", "false", "off", "no"))
    assert not debug_log.env_debug({})


def test_truncate_keeps_one_line_and_says_what_it_cut():
    assert debug_log.truncate("a\nb") == "a\\nb"
    cut = debug_log.truncate("x" * 400, limit=10)
    assert cut.startswith("x" * 10) and "390 more chars" in cut


def test_quiet_setup_drops_library_records_and_debug_shows_them_once(capsys):
    debug_log.configure(False)
    logging.getLogger("paramiko.transport").error("Socket exception: connection refused")
    logging.getLogger("qemu.qmp.protocol").error("wedged")
    logging.getLogger("harness.vm.qemu").debug("not shown")
    assert capsys.readouterr() == ("", "")
    assert not debug_log.enabled()
    stream = io.StringIO()
    debug_log.configure(True, stream=stream)
    debug_log.configure(True, stream=stream)  # idempotent: still one handler each
    try:
        assert debug_log.enabled()
        logging.getLogger("paramiko.transport").info("Connected (version 2.0)")
        logging.getLogger("paramiko.transport").debug("packet noise")
        logging.getLogger("harness.guest.ssh").debug("server: ssh true")
    finally:
        debug_log.configure(False)
        logging.getLogger("harness").setLevel(logging.NOTSET)
    lines = stream.getvalue().splitlines()
    assert [line.split(" ms ", 1)[1] for line in lines] == ["paramiko.transport: Connected (version 2.0)",
                                                           "harness.guest.ssh: server: ssh true"]
    assert capsys.readouterr() == ("", "")


def test_the_modules_no_longer_configure_library_loggers_at_import():
    for path in (REPO / "harness").rglob("*.py"):
        text = path.read_text()
        for library in debug_log.LIBRARIES:
            assert f'getLogger("{library}").propagate' not in text, path
            assert f'getLogger("{library}").addHandler' not in text, path


def test_qemu_start_logs_its_argv_and_time(tmp_path, shown):
    spec = make_spec(tmp_path)
    popen = FakePopen(effect=lambda argv: spec.pidfile.write_text("4242\n"))
    qemu.start(spec, popen=popen)
    text = shown.getvalue()
    assert "harness.vm.qemu: " in text and "qemu-system-x86_64 " in text and "daemonized in" in text
    assert "-name" in text  # the whole argv, not its first word


def test_every_ssh_command_is_logged_with_status_and_time(tmp_path, shown):
    keygen(tmp_path / "client")
    keygen(tmp_path / "host")
    host_pub = (tmp_path / "host.pub").read_text().strip()
    server = FakeSSHServer(tmp_path / "host", (tmp_path / "client.pub").read_text())
    try:
        with GuestSSH("server", server.port, tmp_path / "client", host_pub).connect(timeout=5) as guest:
            guest.run(["echo", "a b"])
            guest.run("exit 3")
    finally:
        server.close()
    text = shown.getvalue()
    assert "server: SSH connected in" in text
    assert "server: ssh echo 'a b'" in text and "server: exit 3 in " in text


def test_agent_requests_and_replies_are_logged_truncated(remote_dir, shown):  # noqa: F811 - the fixture
    ssh = LocalGuestSSH()
    try:
        with local_agent(ssh, remote_dir) as agent:
            agent.call("socket", family="AF_INET", type="SOCK_STREAM", protocol=0)
            agent.call("send", fd=3, data=b"x" * 2000)
    finally:
        ssh.kill_all()
    lines = [line for line in shown.getvalue().splitlines() if "harness.guest.client" in line]
    assert any('<- {"id":' in line and '"op":"socket"' in line for line in lines)
    assert any("-> {" in line and " ms" in line.rsplit("in", 1)[-1] for line in lines)
    assert all(len(line) < debug_log.LIMIT + 150 for line in lines)
    assert any("more chars" in line for line in lines)


def _invoke(*args, env_extra=None, home):
    env = {**os.environ, "PYTHONPATH": str(REPO), "SOCKLAB_HOME": str(home), **(env_extra or {})}
    env.pop("SOCKLAB_DEBUG", None) if not env_extra or "SOCKLAB_DEBUG" not in env_extra else None
    # Forked from a pre-imported server (tests/forkinvoke.py): a process of its own, with real stdio.
    return forkinvoke.invoke(list(args), env, timeout=120)


def test_cli_debug_goes_to_stderr_only_and_is_off_by_default(tmp_path):
    home = tmp_path / "home"
    quiet = _invoke("lab.down", "--name", "logtest", home=home)
    flagged = _invoke("lab.down", "--name", "logtest", "--debug", home=home)
    by_env = _invoke("lab.down", "--name", "logtest", env_extra={"SOCKLAB_DEBUG": "1"}, home=home)
    assert quiet.returncode == flagged.returncode == by_env.returncode == 0
    assert "harness." not in quiet.stderr
    for debugged in (flagged, by_env):
        assert debugged.stdout == quiet.stdout
        assert " ms harness.host.net: host: ip " in debugged.stderr


def test_status_json_without_a_lab(tmp_path):
    result = _invoke("lab.status", "--json", "--name", "logtest", home=tmp_path / "home")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"lab": "logtest", "running": False}
    assert result.stderr == ""


def test_check_json_is_the_only_stdout_and_has_the_documented_keys(tmp_path):
    result = _invoke("lab.check", "03", "--model-only", "--json", "--out", str(tmp_path / "out"), home=tmp_path / "home")
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)
    assert set(record) == {"lab", "title", "ok", "on_kernel", "counts", "report_dir", "notes", "scenarios",
                           "expectations"}
    assert (record["lab"], record["ok"], record["on_kernel"]) == ("03-listen", True, False)
    step = record["scenarios"][0]["steps"][1]
    assert set(step) == {"index", "host", "user", "call", "kernel", "model", "expected", "verdict", "problems"}
    assert step["model"] is None  # blind without --reveal, as the tables are
    assert Path(record["report_dir"], "report.md").is_file()
    assert "PASS: " in result.stderr


def test_status_record_has_the_documented_keys():
    from harness.lab.state import LabState, VMState
    from harness.lab.status import status_record

    class FakeLab:
        def alive(self, state):
            return {"client": True, "server": False}

        def paused(self, vm):
            return False

        def ssh(self, name, timeout):
            raise AssertionError("live=False asks no guest")

    state = LabState("abc", "default", name="obs", accel="tcg", segment="socket", started_at=0.0,
                     vms=[VMState("client", 0, 2201, "198.51.100.1", "m", "l", kernel="6.1.0-1", pid=7),
                          VMState("server", 1, 2202, "198.51.100.2", "m", "l")])
    record = status_record(FakeLab(), state, live=False)
    assert (record["lab"], record["topology"], record["uptime_seconds"]) == ("obs", "default", None)
    assert [(vm["name"], vm["state"], vm["pid"], vm["sg"]) for vm in record["vms"]] == \
        [("client", "running", 7, None), ("server", "dead", None, None)]
    json.dumps(record)


def test_status_table_and_json_are_on_stdout_so_grep_sees_them(tmp_path):
    from harness.lab.lifecycle import Lab
    from harness.lab.state import LabState, VMState
    from harness.paths import PACKAGE_RECIPES, Paths

    home = tmp_path / "home"
    lab = Lab(Paths(images=PACKAGE_RECIPES, home=home), "logtest")
    lab.save(LabState("abc", "default", name="logtest", accel="tcg", segment="socket",
                      vms=[VMState("client", 0, 2201, "198.51.100.1", "m", "l"),
                           VMState("server", 1, 2202, "198.51.100.2", "m", "l")]))
    table = _invoke("lab.status", "--no-live", "--name", "logtest", home=home)
    assert table.returncode == 0, table.stderr
    assert [line for line in table.stdout.splitlines() if "client" in line and "dead" in line]
    assert "client" not in table.stderr
    record = json.loads(_invoke("lab.status", "--no-live", "--json", "--name", "logtest", home=home).stdout)
    assert record["running"] and [vm["state"] for vm in record["vms"]] == ["dead", "dead"]
