"""Every lab in labs/ checked against the live kernels, the model and its expectations: one test per lab."""

from __future__ import annotations

import pytest

from harness.lab.status import markdown
from harness.scenario.check import LabSpec, check, known_labs

pytestmark = pytest.mark.vm


@pytest.mark.parametrize("name", known_labs())
def test_lab_passes_on_the_kernel_and_the_model(lab, name):
    spec = LabSpec.load(name)
    assert lab.require().topology == spec.topology, f"{name} needs the {spec.topology} topology"
    report = check(spec, lab)
    assert report.ok, markdown(report)
    assert report.counts["steps"] > 0
