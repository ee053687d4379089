"""Every lab without a VM: its lab.yaml and scenarios load, the model alone meets every `expect:`, the guide is complete."""

from __future__ import annotations

import re

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


@pytest.mark.parametrize("name", LABS)
def test_the_model_alone_meets_every_expect(name):
    report = check(LabSpec.load(name), None)
    assert report.runs, name
    for run in report.runs:
        assert run.error is None, f"{run.scenario.path.name}: {run.error}"
        bad = [f"step {r.step.index} {r.step.describe()}: {'; '.join(r.verdict.problems)}"
               for r in run.records if r.verdict is not None and not r.verdict.ok]
        assert not bad, f"{run.scenario.path.name}:\n" + "\n".join(bad)
    # Every call step was judged, and most say what they must return.
    records = [r for run in report.runs for r in run.records if r.step.kind == "call"]
    assert records and all(r.verdict is not None for r in records)


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
