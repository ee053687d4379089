"""The fuzz engine against a kernel side that is the model itself, with a bug planted in it.

The kernel side runs each batch through the guest agent's own ``Batch`` (references, loops,
settling), so the wire format is exercised as on a VM; only the system calls are the model's.
"""

from __future__ import annotations

import errno as errno_mod


from harness.fuzz import cli
from harness.fuzz.coverage import model_rules, rule_id
from harness.fuzz.engine import corpus_text, fuzz, shrink, scenario_of
from harness.fuzz.generate import Program, generate, port_block
from harness.guest.inside import agent as guest
from harness.model import Network
from harness.scenario.compare import Outcome
from harness.scenario.format import load
from harness.scenario.runner import LAB_ADDRESSES, ModelBackend, run


class ModelKernel:
    """A fake kernel: a second model, driven through the guest's Batch; ``plant`` rewrites some answers."""

    def __init__(self, plant=None) -> None:
        self.plant = plant
        self.net: Network | None = None
        self.round_trips = 0

    def begin(self, program: Program) -> None:
        self.net = Network()
        for host in program.hosts:
            self.net.add_host(host, addrs=[LAB_ADDRESSES[host]], sysctls=program.sysctls.get(host, {}))

    def run_segment(self, host, user, steps):
        self.round_trips += 1
        session = _Session(self, host, user)
        replies = guest.Batch(session).run([{**s, "args": _ints(s["args"])} for s in steps])
        return [Outcome(ret=_keys(r["ret"]), errno=r["errno"], blocked=bool(r.get("blocked")), extra=r["extra"])
                for r in replies]

    def sleep(self, seconds):
        self.net.advance(seconds)

    def snapshot(self, name):
        return {}


class _Session:
    def __init__(self, kernel: ModelKernel, host: str, user: str) -> None:
        self.block_ms, self.t_ns, self.dt_ns = 0, 0, 0
        self.handlers = _Handlers(kernel, host, user)


class _Handlers(dict):
    def __init__(self, kernel, host, user):
        super().__init__()
        self.kernel, self.host, self.user = kernel, host, user

    def get(self, op, default=None):
        def handler(args):
            result = self.kernel.net[self.host].call(op, args, user=self.user)
            if self.kernel.plant is not None:
                result = self.kernel.plant(op, args, result)
            number = getattr(errno_mod, result.errno, 22) if result.errno else 0
            ret = {str(k): v for k, v in result.ret.items()} if isinstance(result.ret, dict) else result.ret
            return guest.Outcome(list(ret) if isinstance(ret, tuple) else ret, number, {}, bool(result.blocked))
        return handler


def _ints(args):
    from harness.guest.client import encode_args
    return encode_args("x", args)


def _keys(ret):
    if isinstance(ret, dict) and all(isinstance(k, str) and k.lstrip("-").isdigit() for k in ret):
        return {int(k): v for k, v in ret.items()}
    return tuple(ret) if isinstance(ret, list) and len(ret) in (2, 4) and isinstance(ret[0], str) else ret


def listen_zero_is_einval(op, args, result):
    """The planted bug: listen(fd, 0) fails as if backlog 0 were invalid."""
    if op == "listen" and args.get("backlog") == 0 and result.ok:
        from harness.model.result import Result
        return Result(op, -1, "EINVAL", "planted", "planted")
    return result


def test_the_same_seed_generates_the_same_programs_and_another_seed_others():
    assert generate(7, 3).steps == generate(7, 3).steps
    assert generate(7, 3).steps != generate(8, 3).steps
    assert generate(7, 3).steps != generate(7, 4).steps
    assert set(port_block(7, 3)).isdisjoint(port_block(7, 4))


def test_generated_programs_are_valid_scenarios_that_cover_every_call_family_and_user():
    calls, users, families = set(), set(), set()
    for number in range(60):
        program = generate(1, number)
        scenario_of(program)  # raises ScenarioError if the generator wrote something invalid
        for step in program.steps:
            calls.add(step["call"])
            users.add(step.get("user", "root"))
            families.add(step["args"].get("family"))
    assert {"socket", "bind", "listen", "connect", "accept", "accept4", "setsockopt", "getsockopt", "send",
            "sendto", "sendmsg", "recv", "recvmsg", "poll", "shutdown", "close", "fcntl", "epoll_create1",
            "epoll_ctl", "epoll_wait"} <= calls
    assert users == {"root", "student"}
    assert {"AF_INET", "AF_INET6", "AF_UNIX"} <= families


def test_the_model_agrees_with_itself_through_the_batch_wire_format():
    report = fuzz(1500, seed=3, kernel=ModelKernel())
    assert report.steps >= 1500 and report.disagreements == []
    assert report.coverage.reached_rules


def test_a_planted_bug_is_found_shrunk_to_a_minimal_program_and_written_as_a_scenario(tmp_path):
    report = fuzz(3000, seed=5, kernel=ModelKernel(listen_zero_is_einval))
    assert len(report.disagreements) == 1
    found = report.disagreements[0]
    assert found.signature == "listen: kernel EINVAL, model ok int"
    shrunk = found.shrunk
    # socket() and listen(0) are all it takes (a bind may stay when the listen needs it).
    assert 2 <= len(shrunk.steps) <= 3 and shrunk.steps[-1]["call"] == "listen"
    assert shrunk.steps[-1]["args"]["backlog"] == 0
    path = tmp_path / "found.yaml"
    path.write_text(corpus_text(found))
    scenario = load(path)
    assert "The kernel said -1 EINVAL; the model said 0" in scenario.description
    assert scenario.steps[-1].label == "disagreement" and scenario.steps[-1].expect.errno == "EINVAL"
    # The file is an ordinary scenario: the model alone runs it, and fails it until the model is fixed.
    result = run(scenario, None, ModelBackend(scenario))
    assert not result.ok and result.record("disagreement").verdict.problems == (
        "model gave 0, expected -1 EINVAL",)


def test_shrinking_keeps_the_disagreement_and_gives_up_within_its_budget():
    program = generate(5, 0)
    calls = []

    def always(candidate):
        calls.append(candidate)
        return len(candidate.steps) - 1

    smallest, index = shrink(program, always, budget=20)
    assert len(calls) <= 21 and len(smallest.steps) < len(program.steps) and index == len(smallest.steps) - 1
    unchanged, index = shrink(program, lambda candidate: None)
    assert unchanged is program and index == -1


def test_coverage_reads_rules_from_the_model_source_and_counts_what_ran():
    rules = model_rules()
    assert rule_id("inet_csk_bind_conflict", "EADDRINUSE") in rules or any(r.endswith(":EADDRINUSE") for r in rules)
    assert all(not rule.startswith("model:") for rule in rules)
    report = fuzz(300, seed=2, kernel=None)
    cov = report.coverage
    assert 0 < len(cov.reached_rules & rules) < len(rules)
    assert cov.never_reached and "exercised" in cov.summary()


def test_the_fuzz_report_prints_steps_disagreements_shrunk_and_coverage(tmp_path):
    outcome = cli.run(None, 200, 4, tmp_path)
    text = outcome.text()
    for line in ("steps run: ", "disagreements found: 0", "shrunk: 0", "rule coverage: model rules exercised",
                 "kernel functions never reached", "throughput: model"):
        assert line in text
    assert cli.run(None, 200, 4, tmp_path).text().splitlines()[:4] == text.splitlines()[:4]  # reproducible


def test_a_disagreement_filed_as_open_is_counted_but_not_reported_again(tmp_path):
    report = fuzz(3000, seed=5, kernel=ModelKernel(listen_zero_is_einval))
    (tmp_path / "open.yaml").write_text(corpus_text(report.disagreements[0], reason="OPEN: planted."))
    from harness.fuzz.engine import known_signatures

    known = known_signatures(tmp_path)
    assert list(known) == ["listen: kernel EINVAL, model ok int"]
    again = fuzz(3000, seed=5, kernel=ModelKernel(listen_zero_is_einval), known=known, do_shrink=False)
    assert again.disagreements == [] and again.known_met["listen: kernel EINVAL, model ok int"] >= 1
    text = cli.FuzzRun(again, (), 1, None).text()
    assert f"  open: listen: kernel EINVAL, model ok int  [{again.known_met['listen: kernel EINVAL, model ok int']}x]" in text


def test_a_relocated_program_uses_another_program_s_ports_and_names_only():
    from harness.fuzz.generate import low_port, relocate

    program = generate(3, 9)
    moved = relocate(program, 2600)
    old = set(port_block(3, 9)) | {low_port(3, 9)}
    text = repr(moved.steps)
    assert not any(f", {port}]" in text for port in old) and "fz3-9-" not in text
    assert len(moved.steps) == len(program.steps)
    assert [s["call"] for s in moved.steps] == [s["call"] for s in program.steps]
    scenario_of(moved)


def test_epoll_steps_reach_insert_modify_remove_and_wait_on_the_model():
    report = fuzz(6000, seed=1, kernel=None)
    for rule in ("ep_insert:ok", "ep_modify:ok", "ep_remove:ok", "ep_send_events:ok", "do_epoll_ctl:ENOENT"):
        assert rule in report.reached, rule


def test_a_call_the_model_says_blocks_is_confirmed_with_the_short_guard_and_epoll_waits_only_for_nothing():
    from harness.scenario import batch

    sent = []

    class Recorder:
        def run_segment(self, host, user, steps):
            sent.extend(steps)
            return [Outcome(ret=None, errno=None, blocked=True) if s["op"] == "recv" else Outcome(ret={}, errno=None)
                    for s in steps]

    from harness.scenario.format import from_body
    scenario = from_body("t", ("server",), {"steps": [
        {"on": "server", "call": "socket", "args": {"family": "AF_INET", "type": "SOCK_DGRAM"}, "as": "u"},
        {"on": "server", "call": "recv", "args": {"fd": "$u", "length": 1}},
        {"on": "server", "call": "epoll_create1", "args": {"flags": 0}, "as": "e"},
        {"on": "server", "call": "epoll_ctl", "args": {"epfd": "$e", "op": "EPOLL_CTL_ADD", "fd": "$u",
                                                       "events": "EPOLLOUT"}},
        {"on": "server", "call": "epoll_wait", "args": {"epfd": "$e", "timeout": 0}, "compare": "eventually"},
    ]})
    model = ModelBackend(scenario)
    records = [batch.StepRecord(step) for step in scenario.steps]
    names = batch.SocketNames()
    for record in records:
        record.model = batch._call(model, record.step, names)
    sent.clear()
    batch._kernel_segment(Recorder(), records, batch.SocketNames(), 200)
    recv = next(s for s in sent if s["op"] == "recv")
    assert recv["args"]["block_ms"] == batch.CONFIRM_BLOCK_MS  # the model says it sleeps: 100 ms confirm it
    assert "block_ms" not in next(s for s in sent if s["op"] == "socket")["args"]
    wait = next(s for s in sent if s["op"] == "epoll_wait")
    assert wait["await"] == {"errno": None, "ready": 1}  # the model has the socket writable
    assert guest.Batch.transient("epoll_wait", {}, {"errno": None, "ret": {}}, wait["await"])
    assert not guest.Batch.transient("epoll_wait", {}, {"errno": None, "ret": {"5": 4}}, wait["await"])
    assert not guest.Batch.transient("epoll_wait", {}, {"errno": None, "ret": {}}, {"errno": None, "ready": 0})


def test_the_live_kernel_starts_agents_up_front_and_resets_a_host_whose_sysctls_changed(monkeypatch):
    from harness.fuzz import live

    batches = []
    sent_no_modprobe: list[dict] = []

    class FakeAgent:
        def __init__(self, ssh, host, user, block_ms):
            self.key = (host, user)

        def start(self):
            return self

        def batch(self, steps, block_ms=None):
            batches.append((self.key, [s["op"] for s in steps]))
            sent_no_modprobe.extend(s["args"] for s in steps if s["args"].get("name") == "kernel.modprobe")
            return [guest_reply(s) for s in steps]

        def close(self):
            pass

    def guest_reply(step):
        from harness.guest.client import AgentReply
        return AgentReply(id=0, op=step["op"], ret=0, errno=None, t_ns=0, dt_ns=0)

    class FakeLab:
        def ssh(self, host, timeout=None):
            return host

    monkeypatch.setattr(live, "Agent", FakeAgent)
    kernel = live.LiveKernel(FakeLab())
    kernel.start(("server", "client"))
    assert set(kernel.agents) == {(h, u) for h in ("server", "client") for u in ("root", "student")}
    with_sysctl = Program(1, 0, ("server", "client"), {"server": {"net.core.somaxconn": 4}}, [])
    kernel.begin(with_sysctl)
    kernel.run_segment("client", "student", [{"op": "socket", "args": {}}])
    assert batches[-2] == (("server", "root"), ["sysctl_set"])
    kernel.begin(Program(1, 1, ("server", "client"), {}, []))  # runs nothing as root on the server
    assert batches[-1] == (("server", "root"), ["reset"])
    assert kernel.round_trips == 3 and kernel.steps == 1
    # Each host's root agent turned module autoloading off as it started, before any program.
    assert {key for key, _ in batches[:2]} == {("server", "root"), ("client", "root")}
    assert sent_no_modprobe == [{"name": "kernel.modprobe", "value": "\n", "restore": "exit"}] * 2


def test_an_agent_started_on_first_use_finds_module_autoloading_off(monkeypatch):
    from harness.fuzz import live

    started = []

    class FakeAgent:
        def __init__(self, ssh, host, user, block_ms):
            self.key = (host, user)
            started.append(self.key)

        def start(self):
            return self

        def batch(self, steps, block_ms=None):
            from harness.guest.client import AgentReply
            return [AgentReply(id=0, op=s["op"], ret=0, errno=None, t_ns=0, dt_ns=0) for s in steps]

    class FakeLab:
        def ssh(self, host, timeout=None):
            return host

    monkeypatch.setattr(live, "Agent", FakeAgent)
    kernel = live.LiveKernel(FakeLab())
    kernel.run_segment("client", "student", [{"op": "socket", "args": {}}])
    assert started == [("client", "root"), ("client", "student")]  # root first: it turns autoloading off


def test_an_until_loop_is_settled_only_while_its_first_call_says_not_yet():
    """compare: eventually on a loop: rerun while it stopped at call 0 by a transient errno the model's did not."""
    from harness.scenario import batch
    from harness.scenario.format import from_body

    scenario = from_body("t", ("server",), {"steps": [
        {"on": "server", "call": "socket", "args": {"family": "AF_INET", "type": "SOCK_STREAM"}, "as": "s"},
        {"on": "server", "call": "send", "args": {"fd": "$s", "length": 1}, "until": "EAGAIN", "max": 5,
         "compare": "eventually"},
    ]})
    loop = scenario.steps[1]
    wanted = batch.wanted(loop, Outcome(ret={"calls": 0, "total": 0, "stopped": "ECONNREFUSED"}))
    assert wanted == {"stopped": "ECONNREFUSED"}
    not_yet = {"ret": {"calls": 0, "total": 0, "stopped": "EAGAIN"}}
    assert guest.Batch.transient_loop("send", not_yet, wanted)
    assert not guest.Batch.transient_loop("send", {"ret": {"calls": 2, "total": 2, "stopped": "EAGAIN"}}, wanted)
    assert not guest.Batch.transient_loop("send", not_yet, {"stopped": "EAGAIN"})
    assert not guest.Batch.transient_loop("send", {"ret": {"calls": 0, "total": 0, "stopped": "EPIPE"}}, wanted)

    class Session:
        t_ns = dt_ns = 0

    answers = iter([guest.Outcome(None, errno_mod.EAGAIN), guest.Outcome(None, errno_mod.EAGAIN),
                    guest.Outcome(None, errno_mod.ECONNREFUSED)])
    runner = guest.Batch(Session())
    response = runner.settle_loop("send", lambda args: next(answers), {}, "EAGAIN", 5,
                                  runner.repeat("send", lambda args: next(answers), {}, "EAGAIN", 5), wanted, 1000)
    assert response["ret"]["stopped"] == "ECONNREFUSED" and response["extra"]["settled"] == 2
