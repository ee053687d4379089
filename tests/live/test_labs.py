"""Every lab in labs/ checked against the live kernels, the model and its expectations: one test per lab.

Each is `invoke lab.check NAME`, the command the lab's guide gives, run through ``guide_shell``: when the
guide test has run it already (tests/live/test_guides.py), this test reads that run instead of
checking the lab a second time. It then reads the JUnit report the check wrote.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from harness.scenario.check import LabSpec, known_labs

pytestmark = pytest.mark.vm


@pytest.mark.parametrize("name", [pytest.param(name, marks=pytest.mark.xdist_group(f"guide-{name}"))
                                  for name in known_labs()])
def test_lab_passes_on_the_kernel_and_the_model(lab, guide_shell, name):
    spec = LabSpec.load(name)
    assert lab.require().topology == spec.topology, f"{name} needs the {spec.topology} topology"
    run = guide_shell(f"invoke lab.check {name}\n")
    shown = run.shown(name)
    assert run.returncode == 0 and "Traceback (most recent call last)" not in run.output, shown
    reports = sorted(run.results.glob("*/junit.xml"))
    assert len(reports) == 1, f"{shown}\nreports written: {reports}"
    suites = ET.parse(reports[0]).getroot().findall("testsuite")
    steps = sum(int(suite.get("tests")) for suite in suites if suite.get("name") != "expectations")
    bad = sum(int(suite.get("failures")) + int(suite.get("errors")) for suite in suites)
    assert steps > 0 and bad == 0, f"{shown}\n{steps} steps, {bad} failures or errors in {reports[0]}"
