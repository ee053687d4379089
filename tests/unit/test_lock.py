"""Locks that name their holder: a refusal for changes, a 'waiting for' line and a turn for users."""

from __future__ import annotations

import os
import threading
import time

import pytest

from harness.lab import lock
from harness.errors import LabError


def test_a_change_lock_held_elsewhere_is_refused_with_its_holder(tmp_path):
    path = tmp_path / "lab.lock"
    with lock.held(path):
        with pytest.raises(LabError, match=f"changing this lab \\(pid {os.getpid()}\\), running `.*` for 0 s"):
            with lock.held(path):
                pass


def test_a_use_lock_waits_its_turn_and_says_whom_it_waits_for(tmp_path):
    path = tmp_path / "use.lock"
    lines, order = [], []
    first_in = threading.Event()

    def first():
        with lock.held(path, wait=True, what="using lab 'default'", say=lines.append):
            order.append("first in")
            first_in.set()
            time.sleep(0.6)
            order.append("first out")

    thread = threading.Thread(target=first)
    thread.start()
    first_in.wait(5)
    started = time.monotonic()
    with lock.held(path, wait=True, what="using lab 'default'", say=lines.append):
        order.append("second in")
        waited = time.monotonic() - started
    thread.join()
    assert order == ["first in", "first out", "second in"]
    assert waited >= 0.3
    assert lines == [f"waiting for another socklab command (pid {os.getpid()}, running `{lock.command_line()}` "
                     "for 0 s), which is using lab 'default'"]


def test_a_released_lock_names_nobody(tmp_path):
    path = tmp_path / "lab.lock"
    with lock.held(path):
        pass
    assert lock.holder(path) == ("another process", "")
