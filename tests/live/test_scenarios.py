"""Scenarios on live guests: MSG_ZEROCOPY on loopback and across the lab segment, kernel and model side by side."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.lab.status import markdown
from harness.scenario import expect
from harness.scenario.check import CheckReport, run_scenario
from harness.scenario.format import load

pytestmark = pytest.mark.vm
HERE = Path(__file__).parent / "scenarios"


def test_zerocopy_is_copied_on_loopback_and_in_place_across_the_segment(lab):
    if lab.require().segment != "tap":
        pytest.fail("this needs the tap segment (run as root): the socket segment has no scatter-gather")
    scenario = load(HERE / "zerocopy.yaml", known_hosts=("client", "server"))
    result = run_scenario(scenario, lab)
    report = CheckReport(scenario.name, runs=[result])
    assert result.ok, markdown(report)
    sysctls = {host: snap.sysctls for host, snap in result.kernel_snapshots["after_lab"].items()}
    assertions = expect.load(HERE / "zerocopy.expected.yaml.j2", {**scenario.params, "sysctl": sysctls})
    report.assertions = expect.evaluate(assertions, expect.context(result, scenario.params, sysctls))
    assert report.ok, markdown(report)
