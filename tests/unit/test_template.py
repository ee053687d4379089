"""harness/template.py: templates render in the sandbox within their budget of output and time, or stop."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from harness import template


def _render(text: str) -> str:
    return template.render_budgeted(template.sandbox().from_string(text), {})


@pytest.mark.parametrize("text, message", [
    ("{% set s = namespace(v='x') %}{% for i in range(60) %}{% set s.v = s.v ~ s.v %}{% endfor %}", "more than"),
    ("{% set s = namespace(v=[1]) %}{% for i in range(60) %}{% set s.v = s.v + s.v %}{% endfor %}", "more than"),
    ("{{ 10 ** 10 ** 10 }}", "too large a number"),
    ("{{ 'x' * 10 ** 9 }}", "too long"),
    ("{{ 'x'|center(10 ** 9) }}", "width or count"),
    ("{{ '%999999999d' % 1 }}", "huge or computed width"),
    ("{{ '{:>999999999}'.format(1) }}", "huge or computed width"),
])
def test_templates_that_would_allocate_without_end_are_stopped_before_they_do(text, message):
    with pytest.raises(template.TemplateLimit, match=message):
        _render(text)


def test_the_wall_clock_budget_stops_a_loop_that_makes_no_call(monkeypatch):
    monkeypatch.setattr(template, "TEMPLATE_SECONDS", 0.3)
    started = time.monotonic()
    with pytest.raises(template.TemplateLimit, match="took longer than 0.3 s"):
        with template.template_budget(0.3):
            _render("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}")
    assert time.monotonic() - started < 2


def test_the_budget_also_holds_off_the_main_thread(monkeypatch):
    import threading

    monkeypatch.setattr(template, "TEMPLATE_SECONDS", 0.3)
    caught = []

    def work():
        try:
            _render("{% for i in range(100000) %}{% for j in range(1000) %}{{ '' }}{% endfor %}{% endfor %}")
        except template.TemplateLimit as exc:
            caught.append(exc)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(10)
    assert caught and "took longer" in str(caught[0])


def test_output_past_the_cap_is_stopped(monkeypatch):
    monkeypatch.setattr(template, "MAX_TEMPLATE_CHARS", 1000)
    with pytest.raises(template.TemplateLimit, match="output is larger than"):
        _render("{% for i in range(10000) %}xxxxxxxxxx{% endfor %}")


def test_an_ordinary_template_renders_and_the_alarm_is_put_back():
    import signal

    before = signal.getsignal(signal.SIGALRM)
    assert _render("{% for i in range(3) %}{{ i ~ 'a' }}{{ i * 2 }}{% endfor %}") == "0a01a22a4"
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    assert signal.getsignal(signal.SIGALRM) is before


def test_reading_inputs_does_not_import_jinja2():
    """lab.up reads YAML (config, topology, state) but renders nothing: jinja2 stays out of its imports."""
    probe = "import sys, harness.load, harness.config, harness.lab.lifecycle; print('jinja2' in sys.modules)"
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    assert run.stdout.strip() == "False"
