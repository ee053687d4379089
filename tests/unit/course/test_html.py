"""The HTML report and the class view: pictures written and referenced, and (with Chromium) rendered cleanly."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

import pytest

from harness.course import browser
from harness.course import grade as grading
from harness.course.exercise import Verdict
from harness.course.html import occupancy_svg, sequence_svg, write_report
from harness.course.workspace import Workspace
from harness.scenario.check import LabSpec, check

from .conftest import FakeLab

needs_chromium = pytest.mark.skipif(browser.chromium() is None, reason="headless Chromium is not installed")


def test_a_run_gets_a_sequence_diagram_of_both_hosts(mini_lab):
    report = check(mini_lab, FakeLab())
    svg = sequence_svg(report.runs[0])
    root = ET.fromstring(svg)
    texts = [t.text for t in root.iter("{http://www.w3.org/2000/svg}text")]
    assert "server" in texts and "client" in texts
    assert any(t and t.startswith("bind($m") for t in texts)
    assert "marker-end" in svg  # the connects reach the other host
    assert "inet_csk_get_port" in svg and "inet_csk_get_port" not in sequence_svg(report.runs[0], blind=True)


def test_the_report_references_only_pictures_it_wrote(mini_lab, tmp_path):
    report = check(mini_lab, FakeLab())
    page = write_report(report, tmp_path)
    sources = re.findall(r'<img src="([^"]+)"', page.read_text())
    assert sources and all((tmp_path / src).is_file() for src in sources)
    for src in sources:
        ET.fromstring((tmp_path / src).read_text())  # well-formed SVG


def test_nothing_to_plot_without_snapshots_that_moved(mini_lab):
    report = check(mini_lab, FakeLab())
    assert occupancy_svg(report.runs[0]) is None  # the fake kernel's snapshots have no ss sockets


def _class(tmp_path, mini_lab):
    workspace = Workspace(tmp_path / "work")
    for name in ("alice", "bob"):
        workspace.lab_dir(name, mini_lab.name).mkdir(parents=True)
    from harness.course.score import AnswerKey

    result = grading.grade_class(workspace, [mini_lab], lambda spec: AnswerKey(spec.name),
                                 lambda spec, path: Verdict("missing"))
    return grading.write(result, tmp_path / "out", kernel="6.1.0-test")


@needs_chromium
def test_the_run_report_renders_in_chromium_with_every_image(tmp_path):
    report = check(LabSpec.load("08"), None)
    page = write_report(report, tmp_path)
    seen = browser.check_page(page, screenshot=tmp_path / "report.png")
    assert seen.images and seen.images_loaded == seen.images, seen
    assert not seen.console, seen.console
    assert (tmp_path / "report.png").stat().st_size > 10_000


@needs_chromium
def test_the_class_view_renders_in_chromium(tmp_path, mini_lab):
    paths = _class(tmp_path, mini_lab)
    seen = browser.check_page(paths["html"])
    assert seen.ok, seen
    assert "alice" in seen.dom and "bob" in seen.dom


@needs_chromium
def test_the_browser_check_catches_a_broken_page(tmp_path):
    page = tmp_path / "broken.html"
    page.write_text('<!DOCTYPE html><html><body><img src="missing.svg"><script>console.error("boom")</script>'
                    '<script>window.addEventListener("load", function () { document.documentElement.setAttribute('
                    '"data-images-loaded", Array.prototype.filter.call(document.images, function (i) {'
                    ' return i.naturalWidth > 0; }).length + "/" + document.images.length); });</script></body></html>')
    seen = browser.check_page(page)
    assert not seen.ok and seen.images_loaded == 0 and seen.images == 1
    assert any("boom" in line for line in seen.console)
