"""Report directories: where they go, and that two runs never share one."""

from __future__ import annotations

import os
import time

import pytest

from harness.errors import SocklabError
from harness.results import DEFAULT_ROOT, new_run_dir, results_root


def test_the_option_beats_the_environment_which_beats_the_config(monkeypatch, tmp_path):
    monkeypatch.delenv("SOCKLAB_RESULTS", raising=False)
    assert results_root() == DEFAULT_ROOT
    assert results_root(None, str(tmp_path / "conf")) == tmp_path / "conf"
    monkeypatch.setenv("SOCKLAB_RESULTS", str(tmp_path / "env"))
    assert results_root(None, str(tmp_path / "conf")) == tmp_path / "env"
    assert results_root(str(tmp_path / "opt"), str(tmp_path / "conf")) == tmp_path / "opt"


def test_an_empty_directory_name_is_refused(monkeypatch):
    monkeypatch.delenv("SOCKLAB_RESULTS", raising=False)
    with pytest.raises(SocklabError, match="results directory is empty"):
        results_root(" ")


def test_two_runs_in_one_second_get_two_directories(tmp_path):
    frozen = time.localtime(0)
    first = new_run_dir(tmp_path, "03-listen", clock=lambda: frozen)
    second = new_run_dir(tmp_path, "03-listen", clock=lambda: frozen)
    assert first != second and first.is_dir() and second.is_dir()
    assert second.name == first.name + "-2"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through a read-only mode")
def test_an_unwritable_root_is_named_in_one_line(tmp_path):
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(SocklabError, match=f"cannot write reports to {tmp_path}/r: .*--out DIR"):
            new_run_dir(tmp_path / "r", "x")
    finally:
        tmp_path.chmod(0o700)


def test_a_file_in_the_way_is_named_in_one_line(tmp_path):
    (tmp_path / "r").write_text("")
    with pytest.raises(SocklabError, match=f"cannot write reports to {tmp_path}/r"):
        new_run_dir(tmp_path / "r", "x")
