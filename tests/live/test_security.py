"""What is sealed, proven: the guests' reach, the SSH door, the template sandbox, user strings as data, private files.

docs/security.md states the threat model and points at each test here. Tests marked ``vm`` need the
live lab (the ``lab`` fixture boots one if none runs); the others are pure and run with the unit tests.

Network probes from inside a guest target only 10.0.2.2 and 10.0.2.3 (QEMU's user-net gateway and
DNS, which slirp answers inside the QEMU process) and 203.0.113.1 (TEST-NET-3, never routed): every
one must fail at once.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import stat
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import paramiko
import pytest

from harness.errors import LabError, SSHError
from harness.paths import REPO_ROOT
from harness.scenario import expect
from harness.scenario.format import ScenarioError, Scenario, load, parse_params, render, sandbox
from harness.scenario.runner import RunResult
from harness.guest.ssh import GuestSSH, parse_host_key

vm = pytest.mark.vm


# -------------------------------------------------------------------------------------------- helpers

def _new_ed25519(directory: Path, name: str) -> tuple[Path, str]:
    """A fresh ed25519 key pair: (private key file, 0600, OpenSSH format; public key line)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    path = directory / name
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                       serialization.NoEncryption()))
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return path, public.decode() + " not-socklab"


def _invoke(*args: str, home: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, SOCKLAB_HOME=str(home))
    return subprocess.run([sys.executable, "-m", "invoke", *args], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=120, stdin=subprocess.DEVNULL)


def _one_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, (result.returncode, result.stderr)
    return lines[0]


def _guest_python(guest, code: str, timeout: float = 60) -> str:
    result = guest.run(f"python3 -I -c {shlex.quote(textwrap.dedent(code))}", timeout=timeout)
    assert result.exit_status == 0, result.stderr
    return result.stdout


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# Connection attempts from inside a guest that must fail, and fast. 10.0.2.2 is the host as slirp
# presents it: without restrict=on, 10.0.2.2:<port> reaches the host's 127.0.0.1:<port>, so each VM's
# own SSH forward (which does listen on the host's loopback) is the sharpest target there is.
PROBE = """
import errno, json, socket, sys, time
out = []
for host, port in json.loads(sys.argv[1]):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(5)
    started = time.monotonic()
    try:
        s.connect((host, port))
        result = "CONNECTED"
    except socket.timeout:
        result = "TIMEOUT"
    except OSError as exc:
        result = errno.errorcode.get(exc.errno, str(exc))
    finally:
        s.close()
    out.append([host, port, result, round(time.monotonic() - started, 2)])
print(json.dumps(out))
"""


# -------------------------------------------------------------------------------------------- the guests' reach

@vm
@pytest.mark.parametrize("name", ["client", "server"])
def test_guest_has_no_default_route(lab, name):
    """Nothing but the management /24 and the lab segment is routed: no way out, v4 or v6."""
    guest = lab.ssh(name)
    routes = guest.run("ip -4 route show; echo ---; ip -6 route show", timeout=30, check=True).stdout
    v4, v6 = routes.split("---")
    assert "default" not in routes, routes
    assert sorted(line.split()[0] for line in v4.strip().splitlines()) == ["10.0.2.0/24", "198.51.100.0/24"]
    assert all(not line.startswith(("::/0", "default")) for line in v6.strip().splitlines())
    assert guest.run("cat /proc/sys/net/ipv6/conf/mgmt0/disable_ipv6", check=True).stdout.strip() == "1"


@vm
@pytest.mark.parametrize("name", ["client", "server"])
def test_guest_cannot_reach_the_host_or_outside(lab, name):
    """TCP from the guest to the host (10.0.2.2, even its listening SSH forwards), slirp's DNS and the world fails at once."""
    state = lab.require()
    targets = [["10.0.2.2", 22], ["10.0.2.2", 80], ["10.0.2.3", 53]]
    targets += [["10.0.2.2", vm_.ssh_port] for vm_ in state.vms]  # listening on the host's 127.0.0.1
    targets += [["203.0.113.1", 80], ["203.0.113.1", 443]]
    results = json.loads(_guest_python(lab.ssh(name), PROBE.replace("sys.argv[1]", repr(json.dumps(targets)))))
    for host, port, result, seconds in results:
        assert result != "CONNECTED", f"{name} reached {host}:{port}"
        # slirp with restrict=on resets a guest's connection; TEST-NET-3 has no route at all.
        expected = "ENETUNREACH" if host == "203.0.113.1" else "ECONNREFUSED"
        assert result == expected, (host, port, result)
        assert seconds < 3, f"{host}:{port} took {seconds} s to fail; it must fail fast"


@vm
def test_ssh_forwards_listen_on_loopback_only(lab):
    """Each QEMU's only listening sockets are on 127.0.0.1: the SSH forward (and the socket segment's port)."""
    state = lab.require()
    for vm_ in state.vms:
        inodes = set()
        for fd in Path(f"/proc/{vm_.pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[len("socket:["):-1])
        listening, bound_udp = [], []
        for table in ("tcp", "tcp6", "udp", "udp6"):
            for line in Path(f"/proc/{vm_.pid}/net/{table}").read_text().splitlines()[1:]:
                fields = line.split()
                local, state_hex, inode = fields[1], fields[3], fields[9]
                if inode not in inodes:
                    continue
                address, port = local.split(":")
                if table.startswith("tcp") and state_hex == "0A":
                    listening.append((table, address, int(port, 16)))
                elif table.startswith("udp"):
                    bound_udp.append((table, address, int(port, 16)))
        loopback = "0100007F"  # 127.0.0.1, little-endian as /proc/net/tcp prints it
        assert ("tcp", loopback, vm_.ssh_port) in listening, (vm_.name, listening)
        assert all(table == "tcp" and address == loopback for table, address, _port in listening), (vm_.name, listening)
        assert all(address == loopback for _table, address, _port in bound_udp), (vm_.name, bound_udp)
        if state.segment == "tap":
            assert [port for *_, port in listening] == [vm_.ssh_port], (vm_.name, listening)


@vm
def test_lab_segment_is_a_closed_bridge(lab):
    """The lab segment joins the VMs and nothing else: no uplink, no host address, no route out."""
    state = lab.require()
    if state.segment == "socket":
        # A point-to-point QEMU socket netdev between the two QEMUs, on the host's loopback.
        pytest.skip("socket segment: covered by test_ssh_forwards_listen_on_loopback_only")

    def ip(*args: str, netns: str | None = None):
        argv = ["ip", "-j", *(["-n", netns] if netns else []), *args]
        return json.loads(subprocess.run(argv, capture_output=True, text=True, check=True, timeout=30).stdout or "[]")

    taps = sorted(vm_.tap for vm_ in state.vms)
    links = {link["ifname"]: link for link in ip("link", "show", netns=state.netns)}
    assert sorted(links) == sorted(["lo", "br-lab", *taps]), sorted(links)  # no veth, no uplink
    assert sorted(name for name, link in links.items() if link.get("master") == "br-lab") == taps
    assert [a for link in ip("-4", "addr", "show", netns=state.netns) for a in link.get("addr_info", [])] == []
    assert ip("-4", "route", "show", netns=state.netns) == []
    assert not [link["ifname"] for link in ip("link", "show") if link["ifname"] in taps]


# -------------------------------------------------------------------------------------------- the SSH door

@vm
def test_ssh_refuses_any_key_but_the_projects(lab, tmp_path):
    """A stranger's ed25519 key is refused, and said so; the project key gets in."""
    state = lab.require()
    stranger, _public = _new_ed25519(tmp_path, "id_stranger")
    for vm_ in state.vms:
        with pytest.raises(SSHError, match=f"{vm_.name}: the guest refused the socklab key {stranger}"):
            GuestSSH(vm_.name, vm_.ssh_port, stranger, state.host_key).connect(timeout=20)
        with GuestSSH(vm_.name, vm_.ssh_port, lab.paths.client_key, state.host_key).connect(timeout=20) as ok:
            assert ok.run("id -u", check=True).stdout.strip() == "0"


@vm
@pytest.mark.parametrize("user", ["root", "student"])
def test_ssh_offers_publickey_only_and_refuses_passwords(lab, user):
    """sshd offers publickey and nothing else; a password (even the user name, even empty) is refused."""
    state = lab.require()
    server = state.vm("server")
    sock = socket.create_connection(("127.0.0.1", server.ssh_port), timeout=10)
    transport = paramiko.Transport(sock)
    try:
        transport.start_client(timeout=15)
        assert transport.get_remote_server_key().asbytes() == parse_host_key(state.host_key).asbytes()
        with pytest.raises(paramiko.BadAuthenticationType) as offered:
            transport.auth_none(user)
        assert offered.value.allowed_types == ["publickey"]
        for password in (user, "", "socklab"):
            with pytest.raises(paramiko.AuthenticationException):
                transport.auth_password(user, password)
        assert not transport.is_authenticated()
    finally:
        transport.close()


@vm
def test_sshd_configuration_is_keys_only(lab):
    """What sshd itself says it enforces (sshd -T), and that no account has a usable password."""
    for name in ("client", "server"):
        guest = lab.ssh(name)
        config = dict(line.split(" ", 1) for line in guest.run("sshd -T", timeout=30, check=True).stdout.lower().splitlines()
                      if " " in line)
        assert config["passwordauthentication"] == "no"
        assert config["kbdinteractiveauthentication"] == "no"
        assert config["permitemptypasswords"] == "no"
        assert config["permitrootlogin"] in ("without-password", "prohibit-password")
        assert config["pubkeyauthentication"] == "yes"
        shadow = guest.run("cut -d: -f1,2 /etc/shadow", check=True).stdout.splitlines()
        usable = [entry for entry in shadow if entry.split(":", 1)[1][:1] not in ("!", "*")]
        assert usable == [], usable


@vm
def test_a_changed_host_key_is_refused_clearly(lab, tmp_path):
    """A guest that shows another host key than the pinned one is refused, with a message saying so."""
    state = lab.require()
    _key, other_public = _new_ed25519(tmp_path, "id_other_host")
    server = state.vm("server")
    with pytest.raises(SSHError, match=r"server: the guest's host key changed \(got [0-9a-f]{16}…\): it is not the image"):
        GuestSSH("server", server.ssh_port, lab.paths.client_key, other_public).connect(timeout=20)


@vm
def test_interactive_ssh_pins_the_host_key(lab, tmp_path):
    """`invoke lab.ssh` runs OpenSSH with the pinned key (0600 known_hosts, strict checking, project key only)."""
    argv = lab.ssh_argv("server")
    options = {argv[i + 1].split("=", 1)[0]: argv[i + 1].split("=", 1)[1] for i, arg in enumerate(argv) if arg == "-o"}
    assert options["StrictHostKeyChecking"] == "yes" and options["IdentitiesOnly"] == "yes"
    known_hosts = Path(options["UserKnownHostsFile"])
    assert _mode(known_hosts) == 0o600
    state = lab.require()
    assert known_hosts.read_text() == f"[127.0.0.1]:{state.vm('server').ssh_port} {state.host_key}\n"

    def ssh(known: Path) -> subprocess.CompletedProcess:
        line = [a.replace(str(known_hosts), str(known)) for a in argv[:-1]]
        line += ["-o", "BatchMode=yes", "-o", "ConnectTimeout=20", "-o", "LogLevel=ERROR", argv[-1], "true"]
        return subprocess.run(line, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)

    assert ssh(known_hosts).returncode == 0
    _key, other_public = _new_ed25519(tmp_path, "id_other_host")
    forged = tmp_path / "known_hosts"
    forged.write_text(f"[127.0.0.1]:{state.vm('server').ssh_port} {other_public}\n")
    refused = ssh(forged)
    assert refused.returncode == 255
    assert "host key" in refused.stderr.lower(), refused.stderr


# -------------------------------------------------------------------------------------------- the template sandbox

ESCAPES = [
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ joiner.__init__.__globals__ }}",
    "{{ namespace.__init__.__globals__ }}",
    "{{ lipsum.__globals__ }}",
    "{{ lipsum.__code__ }}",
    "{{ range.__self__ }}",
    "{{ cycler.reset.__func__ }}",
    "{{ self._TemplateReference__context }}",
    "{{ port.__class__ }}",
    "{{ ''|attr('__class__') }}",
    "{{ '{0.__class__.__base__}'.format(port) }}",
    "{{ '%s'|format(''.__class__) }}",
    "{{ (range(3)|map('abs')).gi_frame }}",
    "{% for c in ''.__class__.__mro__ %}{{ c }}{% endfor %}",
    "{% set f = ''.__class__ %}{{ f }}",
]


@pytest.mark.parametrize("template", ESCAPES)
def test_scenario_templates_cannot_reach_python_internals(template):
    """Every classic jinja2 escape stops with a ScenarioError, never with Python objects in the output.

    Attributes that start with ``_`` are refused by the sandbox (unsafe); the sandbox's own ``range``
    and the bound methods of its helpers have no such attribute at all (undefined, also an error).
    """
    with pytest.raises(ScenarioError, match=r"^t\.yaml(:\d+)?: template( tried something unsafe: |: .* has no attribute '_)"):
        render(template, {"port": 7000}, "t.yaml")


def test_the_template_environment_is_the_sandbox():
    from jinja2.sandbox import SandboxedEnvironment

    env = sandbox()
    assert isinstance(env, SandboxedEnvironment) and not env.autoescape
    assert render("{{ port + 1 }} {{ range(2)|list }}", {"port": 7000}, "t.yaml") == "7001 [0, 1]"


@pytest.mark.parametrize("template", ESCAPES[:4] + ["{{ sysctl.server.__class__.__init__.__globals__ }}"])
def test_expectation_templates_cannot_reach_python_internals(template, tmp_path):
    """expected.yaml.j2 is rendered in the same sandbox, before any run (the precheck)."""
    path = tmp_path / "expected.yaml.j2"
    path.write_text(f"- name: x\n  value: 1\n  equals: {template}\n")
    with pytest.raises(ScenarioError, match="template tried something unsafe"):
        expect.precheck(path, {"port": 7000}, ("server",))


VALUE_ESCAPES = [
    "trace._records",
    "trace.__class__",
    "trace.step.__func__.__globals__",
    "delta.__globals__",
    "delta.__code__",
    "model._hosts",
    "before.__dict__",
    "before.server.__class__.__init__.__globals__",
    "sysctl.__class__.__mro__",
    "''.__class__.__mro__",
    "cycler.__init__.__globals__",
    "'{0.__class__}'.format(1)",
]


def test_expectation_values_cannot_reach_python_internals():
    """Value expressions run sandboxed over the run's objects: private state and dunders fail the assertion."""
    scenario = Scenario(path=Path("s.yaml"), name="s", description="", hosts=("server",), params={}, sysctls={},
                        steps=())
    result = RunResult(scenario, kernel_snapshots={"before": {"server": {"listeners": 1}}},
                       model_snapshots={"before": {"server": {"listeners": 1}}})
    names = expect.context(result, {"port": 7000}, {"server": {"somaxconn": 4096}})
    control = expect.Assertion("control", "port + 1", "equals", 7001, 1)
    escapes = [expect.Assertion(value, value, "equals", 0, 1) for value in VALUE_ESCAPES]
    outcomes = expect.evaluate([control, *escapes], names)
    assert outcomes[0].ok and outcomes[0].value == 7001
    for outcome in outcomes[1:]:
        assert not outcome.ok and outcome.value is None, outcome
        assert outcome.error.startswith(("unsafe expression: ", "UndefinedError: ")), outcome
        assert "unsafe" in outcome.error, outcome


# -------------------------------------------------------------------------------------------- user strings are data

def test_no_host_code_builds_a_shell_from_strings():
    """The host side never hands a string to a shell: no shell=True, os.system or os.popen anywhere."""
    offenders = []
    for path in [REPO_ROOT / "tasks.py", *sorted((REPO_ROOT / "harness").rglob("*.py"))]:
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if any(bad in line for bad in ("shell=True", "os.system(", "os.popen(", "getoutput(")):
                offenders.append(f"{path.relative_to(REPO_ROOT)}:{number}: {line.strip()}")
    assert offenders == []


def test_params_with_shell_metacharacters_are_yaml_data():
    assert parse_params(["port=7000; touch /tmp/pwned", "name=$(id)`id`"]) == {
        "port": "7000; touch /tmp/pwned", "name": "$(id)`id`"}
    with pytest.raises(ScenarioError, match=r"^--param 'port;id=1': use name=value"):
        parse_params(["port;id=1"])


@vm
@pytest.mark.parametrize("task", ["lab.exec", "lab.ssh", "lab.console"])
def test_vm_names_with_shell_metacharacters_are_unknown_vms(lab, task, tmp_path):
    """`invoke lab.exec 'server;touch …' -- true` is one line refusing the name; nothing runs."""
    pwned = tmp_path / "pwned"
    name = f"server;touch {pwned}"
    args = [task, name, "--", "true"] if task == "lab.exec" else [task, name]
    line = _one_line(_invoke(*args, home=lab.paths.home))
    assert line.startswith(f"socklab: {name!r} is not a VM name")
    assert not pwned.exists()
    with pytest.raises(LabError, match="no VM named 'server;id'"):
        lab.ssh("server;id")


@vm
def test_cli_params_with_shell_metacharacters_stay_data(lab, tmp_path):
    """`invoke lab.run FILE --param 'port=7000; touch X'` fails on the port's type; X is never created."""
    pwned = tmp_path / "pwned"
    scenario = tmp_path / "meta.yaml"
    scenario.write_text("name: meta\nhosts: [server]\nparams: {port: 7000}\n---\nsteps:\n"
                        "  - {on: server, call: socket, args: {family: AF_INET, type: SOCK_STREAM}, as: l}\n"
                        "  - {on: server, call: bind, args: {fd: $l, addr: [0.0.0.0, \"{{ port }}\"]}}\n")
    for value in (f"7000; touch {pwned}", f"$(touch {pwned})", f"7000 && touch {pwned} | cat"):
        line = _one_line(_invoke("lab.run", str(scenario), "--param", f"port={value}", home=lab.paths.home))
        assert line.startswith(f"socklab: {scenario}:7: step 2: bind() argument addr: ")
        assert line.endswith(f"not ['0.0.0.0', {value!r}]")
    # A backquote cannot start a YAML scalar: rejected as a value before anything else.
    line = _one_line(_invoke("lab.run", str(scenario), "--param", f"port=`touch {pwned}`", home=lab.paths.home))
    assert line == f"socklab: --param 'port=`touch {pwned}`': the value is not valid YAML"
    assert not pwned.exists()
    assert lab.ssh("server").run(f"test -e {shlex.quote(str(pwned))}").exit_status == 1


@vm
def test_scenario_strings_reach_the_kernel_as_data(lab, tmp_path):
    """A socket path and a payload full of shell syntax are bound and sent byte for byte; no shell sees them."""
    from harness.scenario.check import run_scenario

    tag = uuid.uuid4().hex[:8]
    sock_path = f"/tmp/sl-{tag};touch pwned-{tag}-a;$(touch pwned-{tag}-b)`touch pwned-{tag}-c`|&<>*?'\""
    payload = f"$(touch /tmp/pwned-{tag}-d); touch /tmp/pwned-{tag}-e && `touch /tmp/pwned-{tag}-f` | ' \" \\ $HOME"
    scenario_file = tmp_path / "data.yaml"
    scenario_file.write_text(textwrap.dedent("""\
        name: strings-are-data
        hosts: [server]
        params: {path: x, payload: x}
        ---
        steps:
          - {on: server, call: socket, args: {family: AF_UNIX, type: SOCK_DGRAM}, as: rx}
          - {on: server, call: bind, args: {fd: $rx, addr: {{ path | tojson }}}, label: bind}
          - {on: server, call: socket, args: {family: AF_UNIX, type: SOCK_DGRAM}, as: tx}
          - {on: server, call: connect, args: {fd: $tx, addr: {{ path | tojson }}}, label: connect}
          - {on: server, call: send, args: {fd: $tx, data: {{ payload | tojson }}}, label: send}
          - {on: server, call: recv, args: {fd: $rx, length: 512}, label: recv}
          - {on: server, call: getsockname, args: {fd: $rx}, label: name}
        """))
    scenario = load(scenario_file, {"path": sock_path, "payload": payload}, known_hosts=("client", "server"))
    server = lab.ssh("server")
    try:
        result = run_scenario(scenario, lab)
        kernel = {record.step.label: record.kernel for record in result.records}
        assert result.error is None, result.error
        assert kernel["bind"].errno is None and kernel["connect"].errno is None, (kernel["bind"], kernel["connect"])
        assert kernel["send"].ret == len(payload.encode())
        assert kernel["recv"].extra["data"] == payload.encode()
        assert kernel["name"].ret == sock_path
        # The agent removes the paths it bound when it closes: the literal name, and nothing else, is gone.
        left = server.run(f"ls -a /tmp | grep -c -F sl-{tag}", timeout=30).stdout.strip()
        assert left == "0", "the socket path was not one literal file name"
        found = server.run(f"ls -a / /tmp /root /run/socklab /home/student 2>/dev/null | grep -c pwned-{tag}",
                           timeout=30).stdout.strip()
        assert found == "0", "a shell ran part of a scenario string on the guest"
        assert not list(Path("/tmp").glob(f"pwned-{tag}*")) and not list(REPO_ROOT.glob(f"pwned-{tag}*"))
    finally:
        server.run(f"rm -f -- {shlex.quote(sock_path)}", timeout=30)


@vm
def test_student_steps_cannot_change_what_root_runs(lab):
    """`user: student` steps run as uid 1000 without capabilities; the agent root runs is root's, 0644, in a 0755 dir.

    The agent server that forks the agents is root's too, and the student cannot ask it for anything.
    """
    from harness.guest.client import Agent

    server = lab.ssh("server")
    Agent(server, "server").start().close()  # root's agent writes the compiled code the student's reads
    agent = Agent(server, "server", "student").start()
    try:
        assert agent.request("socket", {"family": "AF_INET", "type": "SOCK_RAW", "protocol": 6}).errno == "EPERM"
    finally:
        agent.close()
    files = "/run/socklab/agent /run/socklab/agent/*.py /run/socklab/agent/__pycache__ /run/socklab/agent/__pycache__/*"
    listing = server.run(f"stat -c '%U %a %n' {files}", check=True).stdout
    assert "/run/socklab/agent/__pycache__/agent_" in listing  # the compiled agent is there, and root's
    for line in listing.splitlines():
        owner, mode, name = line.split(" ", 2)
        assert owner == "root" and mode in ("755", "644"), line
    as_student = ("setpriv --reuid=1000 --regid=1000 --init-groups --reset-env sh -c "
                  f"'for f in {files}; do touch \"$f\" 2>/dev/null && echo \"$f\"; done; "
                  "echo x > /run/socklab/agent/new 2>/dev/null && echo created; "
                  "echo x > /run/socklab/agent/__pycache__/new 2>/dev/null && echo created; "
                  "id -u; grep CapEff /proc/self/status'")
    result = server.run(as_student, check=True).stdout.split()
    assert result == ["1000", "CapEff:", "0000000000000000"], result
    # The agent server forks root's agents: only root may ask it, through a FIFO in a 0700 directory.
    serve = server.run("stat -c '%U %a %F %n' /run/socklab/agent/*.serve /run/socklab/agent/*.serve/requests",
                       check=True).stdout.splitlines()
    assert [line.split(" ", 2)[:2] for line in serve] == [["root", "700"], ["root", "600"]], serve
    assert "fifo" in serve[1]
    requests = serve[1].split(" ", 3)[3]
    ask = ("setpriv --reuid=1000 --regid=1000 --init-groups --reset-env sh -c "
           f"'echo \"$$ root 0 x\" > {requests} 2>/dev/null && echo asked; "
           f"ls {requests.rsplit('/', 1)[0]} 2>/dev/null && echo listed; echo done'")
    assert server.run(ask, check=True).stdout.split() == ["done"]
    # A restored guest is woken from ttyS1 (a new crng seed and the clock): the student may not write to it or read it.
    tty = ("setpriv --reuid=1000 --regid=1000 --init-groups --reset-env sh -c "
           "'echo wake > /dev/ttyS1 2>/dev/null && echo wrote; head -c1 /dev/ttyS1 2>/dev/null && echo read; echo done'")
    assert server.run(tty, check=True, timeout=30).stdout.split() == ["done"]
    assert server.run("stat -c '%U %a' /dev/ttyS1", check=True).stdout.split() == ["root", "600"]


# -------------------------------------------------------------------------------------------- QEMU's confinement

@vm
def test_qemu_runs_under_seccomp(lab):
    """Every lab QEMU has its seccomp filter on (-sandbox) and carries the UUID the lab gave it."""
    from harness.vm import owner

    for vm_ in lab.require().vms:
        assert "Seccomp:\t2" in Path(f"/proc/{vm_.pid}/status").read_text()
        info = owner.process_info(vm_.pid)
        assert owner.argv_uuid(info.argv) == vm_.uuid and info.start_ticks == vm_.start_ticks


# -------------------------------------------------------------------------------------------- private files

@vm
def test_keys_state_and_run_dir_are_private(lab):
    """The key, the state file and their directories are the user's alone: 0600 files, 0700 directories."""
    paths = lab.paths
    assert _mode(paths.home) == 0o700
    assert _mode(paths.keys) == 0o700
    assert _mode(paths.client_key) == 0o600
    assert _mode(lab.run_dir) == 0o700
    assert _mode(lab.state_file) == 0o600
    state = lab.require()
    for vm_ in state.vms:
        assert _mode(Path(vm_.overlay)) == 0o600  # the guest's disk: its host key and whatever ran there
    for vm_ in state.vms:  # QMP can make QEMU run host commands (migrate to exec:); only the owner may reach it
        assert Path(vm_.qmp).parent == lab.run_dir and Path(vm_.console).parent == lab.run_dir
        assert Path(vm_.qmp).with_suffix(".wake").is_socket()  # the wake port: in the private run dir too
    # The image entry holds the guest's private host key (in rootfs.ext4) and RAM snapshots.
    assert _mode(Path(state.image)) == 0o700
    assert _mode(Path(state.image) / "snapshots") == 0o700
