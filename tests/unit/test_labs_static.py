"""Every lab without a VM: its lab.yaml and scenarios load, the model alone meets every `expect:`, the guide is complete."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from harness.scenario.check import LABS_DIR, LabSpec, check, known_labs
from harness.scenario.format import declared_params, load

LABS = known_labs()

# The sections every guide has (labs/README.md explains the shape).
REQUIRED_SECTIONS = (
    "## Objectives",
    "## Background",
    "## Steps",
    "## Predict, then observe",
    "## What to look for",
    "## Where the article simplifies",
    "## Explore",
)
LAB_NAME = re.compile(r"^\d\d-[a-z0-9-]+$")


def test_the_course_has_its_labs():
    assert LABS[:8] == ["01-sockets-are-files", "02-bind", "03-listen", "04-accept", "05-proto-ops",
                        "06-buffers", "07-zerocopy", "08-readiness"]


@pytest.mark.parametrize("name", LABS)
def test_lab_yaml_loads(name):
    spec = LabSpec.load(name)
    assert LAB_NAME.match(name)
    assert spec.title and spec.title != name
    assert spec.topology == "default"
    assert spec.scenarios and spec.expected is not None
    import yaml

    raw = yaml.safe_load((spec.directory / "lab.yaml").read_text())
    assert isinstance(raw.get("minutes"), int) and 10 <= raw["minutes"] <= 90
    assert "§" in str(raw.get("article", "")), "lab.yaml names the article's sections (§)"


@pytest.mark.parametrize("name", LABS)
def test_every_scenario_parses(name):
    spec = LabSpec.load(name)
    for path in spec.scenarios:
        scenario = load(path, known_hosts=("client", "server"))
        assert scenario.steps, path
        assert scenario.description, f"{path.name}: say what the scenario shows in `description:`"


@pytest.mark.parametrize("scatter_gather", [True, False], ids=["tap", "no-sg"])
@pytest.mark.parametrize("name", LABS)
def test_the_model_alone_meets_every_expect(name, scatter_gather):
    """On the tap's NIC and on one without scatter-gather (the socket segment, a lab started without root)."""
    report = check(LabSpec.load(name), None, scatter_gather=scatter_gather)
    assert report.runs, name
    for run in report.runs:
        assert run.error is None, f"{run.scenario.path.name}: {run.error}"
        bad = [f"step {r.step.index} {r.step.describe()}: {'; '.join(r.verdict.problems)}"
               for r in run.records if r.verdict is not None and not r.verdict.ok]
        assert not bad, f"{run.scenario.path.name}:\n" + "\n".join(bad)
    # Every call step was judged, and most say what they must return.
    records = [r for run in report.runs for r in run.records if r.step.kind == "call"]
    assert records and all(r.verdict is not None for r in records)
    assert all(a.ok for a in report.assertions if a.predicted), [a.name for a in report.assertions if not a.ok]


@pytest.mark.parametrize("name", LABS)
def test_the_guide_has_every_section(name):
    guide = LABS_DIR / name / "README.md"
    assert guide.is_file(), f"labs/{name}/README.md is missing"
    text = guide.read_text()
    headings = [line.strip() for line in text.splitlines() if line.startswith("## ")]
    for section in REQUIRED_SECTIONS:
        assert any(h.startswith(section) for h in headings), f"labs/{name}/README.md lacks a '{section}' section"


@pytest.mark.parametrize("name", LABS)
def test_the_guide_gives_the_commands_to_run(name):
    text = (LABS_DIR / name / "README.md").read_text()
    spec = LabSpec.load(name)
    assert "invoke lab.up" in text
    assert f"invoke lab.check {name}" in text
    for path in spec.scenarios:
        assert f"invoke lab.model labs/{name}/{path.name}" in text, f"predict {path.name} with lab.model first"
    assert re.search(r"invoke lab\.exec (server|client) -- ", text), "show the student a guest command (ss, ethtool, /proc)"


@pytest.mark.parametrize("name", LABS)
def test_the_guide_explores_a_real_parameter(name):
    """The Explore part changes a parameter some scenario of the lab declares."""
    text = (LABS_DIR / name / "README.md").read_text()
    explore = text.split("## Explore", 1)[1]
    declared = {key for path in LabSpec.load(name).scenarios for key in declared_params(path)}
    used = set(re.findall(r"--param (\w+)=", explore))
    assert used, f"labs/{name}/README.md: the Explore section changes no --param"
    assert used <= declared, f"labs/{name}/README.md: unknown --param {sorted(used - declared)}"


def test_the_course_guide_lists_every_lab():
    text = (LABS_DIR / "README.md").read_text()
    for name in LABS:
        assert f"]({name}/" in text or f"({name}/README.md)" in text, f"labs/README.md does not link {name}"
    assert "invoke lab.up" in text and "invoke lab.grade" in text


@pytest.mark.parametrize("name", LABS)
def test_the_minutes_agree_in_lab_yaml_the_guide_and_the_course_path(name):
    import yaml

    minutes = yaml.safe_load((LABS_DIR / name / "lab.yaml").read_text())["minutes"]
    guide = (LABS_DIR / name / "README.md").read_text()
    assert re.search(rf"^\*{minutes} minutes", guide, re.M), f"labs/{name}/README.md does not say {minutes} minutes"
    row = next(line for line in (LABS_DIR / "README.md").read_text().splitlines() if f"[{name}](" in line)
    assert f"| {minutes} |" in row, f"labs/README.md gives {name} other minutes than lab.yaml ({minutes})"


@pytest.mark.parametrize("name", LABS)
def test_the_scenarios_carry_no_answer_comments(name):
    """Students read the scenarios; what a step returns and why lives in ANSWERS.md (for the teacher)."""
    spec = LabSpec.load(name)
    for path in spec.scenarios:
        body = path.read_text().split("\n---\n", 1)[1]
        comments = [line for line in body.splitlines() if re.match(r"^\s*#", line) or re.search(r"\}\s+#", line)]
        assert not comments, f"{path.name}: move these to ANSWERS.md: {comments[:2]}"
    assert (LABS_DIR / name / "ANSWERS.md").is_file()
    assert "<summary>Answers</summary>" not in (LABS_DIR / name / "README.md").read_text()


def _answers(scenario) -> set[str]:
    """Every value a step of the scenario must return, as words: errno names and numbers of 10 or more."""
    found: set[str] = set()

    def walk(value):
        if isinstance(value, dict):
            for item in value.values():
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)
        elif isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10:
            found.add(str(value))

    for step in scenario.steps:
        if step.expect is not None:
            if step.expect.errno:
                found.add(step.expect.errno)
            walk(step.expect.ret)
    return found


def _given(scenario) -> set[str]:
    """What the scenario itself says (its params and arguments): naming those reveals nothing."""
    words = set(re.findall(r"[A-Z][A-Z0-9_]+|-?\d+", repr(scenario.params) + repr([s.args for s in scenario.steps])))
    return words


def answer_leaks(directory: Path) -> list[str]:
    """What the student-facing files of a lab directory give away: each problem as a sentence.

    Students open the scenarios (and run them blind) before they predict; the answers live in
    key/<file>. A scenario carries no `expect:` of its own, and neither its description nor any of
    its comments names an errno or a number that one of its steps must return, unless the scenario
    gives it as a parameter or an argument. (Every scenario file of the directory counts, also one
    only a guide runs, such as lab 06's pressure.yaml.)
    """
    problems = []
    for path in sorted(directory.glob("*.yaml")):
        if path.name == "lab.yaml":
            continue
        text = path.read_text()
        if re.search(r"\bexpect\s*:", text):
            problems.append(f"{path.name}: move its expect: values to key/{path.name}")
        if not (directory / "key" / path.name).is_file():
            problems.append(f"{path.name} has no answer key key/{path.name}")
        scenario = load(path)
        secret = _answers(scenario) - _given(scenario)
        description = re.search(r"^description:(.*)$", text, re.M)
        shown = [description[1]] if description else []
        shown += re.findall(r"#(.*)$", text, re.M) + re.findall(r"\{#(.*?)#\}", text, re.S)
        for words in shown:
            leaked = sorted(word for word in secret if re.search(rf"(?<![\w-]){re.escape(word)}(?!\w)", words))
            if leaked:
                problems.append(f"{path.name} tells the answer {leaked} in: {words.strip()[:120]}")
    return problems


@pytest.mark.parametrize("name", LABS)
def test_no_student_facing_file_reveals_an_answer(name):
    assert answer_leaks(LABS_DIR / name) == []


def test_the_answer_leak_check_catches_a_leak(tmp_path):
    """The check above is not vacuous: an errno or a number a step returns, in a description or a comment,
    and a stray expect:, are each found."""
    lab = tmp_path / "01-x"
    shutil.copytree(LABS_DIR / "01-sockets-are-files", lab)
    assert answer_leaks(lab) == []
    scenario = lab / "files.yaml"
    original = scenario.read_text()
    scenario.write_text(original.replace("description: ", "description: listen(0) says ENOTSOCK; "))
    [problem] = answer_leaks(lab)
    assert problem.startswith("files.yaml tells the answer ['ENOTSOCK'] in: listen(0) says ENOTSOCK;")
    scenario.write_text(original.replace("label: getfl-flagged}", "label: getfl-flagged}  # 2050: O_RDWR|O_NONBLOCK"))
    assert answer_leaks(lab) == ["files.yaml tells the answer ['2050'] in: 2050: O_RDWR|O_NONBLOCK"]
    scenario.write_text(original.replace("label: socket-plain}", "label: socket-plain, expect: 3}"))
    assert answer_leaks(lab) == ["files.yaml: move its expect: values to key/files.yaml"]


def test_the_guides_send_students_to_the_key_only_after_predicting():
    """A guide names a scenario's answer key only as something to open after predicting."""
    for guide in sorted(LABS_DIR.glob("[0-9]*/README.md")):
        text = " ".join(guide.read_text().split())
        assert "itself is the answer key" not in text, guide
        for match in re.finditer(r"`key/[a-z-]+\.yaml`", text):
            nearby = text[max(0, match.start() - 200): match.end() + 200]
            assert "after you have predicted" in nearby, (guide, nearby)


@pytest.mark.parametrize("name", LABS)
def test_the_expectations_evaluate_on_the_model(name):
    """A model-only check runs the expectation template on the model's predictions; what it predicts holds,
    and what it does not simulate is marked as such instead of passing or failing."""
    report = check(LabSpec.load(name), None)
    assert report.assertions, f"{name}: a model-only check evaluated no expectation"
    wrong = [(a.assertion.name, a.value, a.assertion.describe(), a.error) for a in report.assertions
             if a.predicted and not a.ok]
    assert not wrong
    predicted = [a for a in report.assertions if a.predicted]
    assert len(predicted) >= len(report.assertions) // 2, f"{name}: the model predicts under half its figures"
    for outcome in report.assertions:
        if not outcome.predicted:
            assert outcome.error.startswith("the model does not"), outcome.error
