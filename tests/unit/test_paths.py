"""Configured locations: resolved, refused when empty, / or the checkout; a home chmodded only when socklab made it."""

from __future__ import annotations

import stat

import pytest

from harness.paths import HOME_MARKER, REPO_ROOT, PathError, Paths, check_lab_name, check_location


@pytest.mark.parametrize("value,message", [
    ("", "SOCKLAB_HOME is empty"),
    ("   ", "SOCKLAB_HOME is empty"),
    ("/", "is the root directory"),
    (str(REPO_ROOT), "holds this checkout"),
    (str(REPO_ROOT.parent), "holds this checkout"),
    (f"{REPO_ROOT}/harness/..", "holds this checkout"),
])
def test_unusable_locations_are_refused(value, message):
    with pytest.raises(PathError, match=message):
        check_location("SOCKLAB_HOME", value)


def test_a_relative_location_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert check_location("SOCKLAB_HOME", ".socklab") == tmp_path / ".socklab"


def test_the_environment_is_checked(monkeypatch, tmp_path):
    monkeypatch.setenv("SOCKLAB_HOME", "")
    with pytest.raises(PathError, match="SOCKLAB_HOME is empty"):
        Paths.default()
    monkeypatch.setenv("SOCKLAB_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SOCKLAB_CACHE", "/")
    with pytest.raises(PathError, match="SOCKLAB_CACHE='/' is the root directory"):
        Paths.default().cache


def test_a_new_home_is_made_private_and_marked(tmp_path):
    paths = Paths(images=tmp_path, home=tmp_path / "home")
    paths.ensure_private(paths.run)
    assert stat.S_IMODE(paths.home.stat().st_mode) == 0o700
    assert stat.S_IMODE(paths.run.stat().st_mode) == 0o700
    assert (paths.home / HOME_MARKER).exists()


def test_a_directory_socklab_did_not_create_is_neither_chmodded_nor_used(tmp_path):
    home = tmp_path / "someones-dir"
    home.mkdir(mode=0o755)
    home.chmod(0o755)
    (home / "thesis.tex").write_text("mine")
    paths = Paths(images=tmp_path, home=home)
    with pytest.raises(PathError, match="socklab did not create .*thesis.tex"):
        paths.ensure_private(paths.run)
    assert stat.S_IMODE(home.stat().st_mode) == 0o755
    assert not paths.run.exists()


def test_a_home_from_an_earlier_socklab_is_adopted(tmp_path):
    home = tmp_path / "home"
    (home / "keys").mkdir(parents=True)
    (home / "accel-probe.json").write_text("{}")
    paths = Paths(images=tmp_path, home=home)
    paths.ensure_private(paths.run)
    assert (home / HOME_MARKER).exists()


def test_lab_dirs_keep_the_default_where_it_was(tmp_path):
    paths = Paths(images=tmp_path, home=tmp_path / "home")
    assert paths.lab_dir("default") == paths.home
    assert paths.lab_dir("second") == paths.home / "labs" / "second"


@pytest.mark.parametrize("name", ["", "../x", "a/b", "-x", "A", "x" * 33, "a b", "lab;rm"])
def test_bad_lab_names_are_refused(name):
    with pytest.raises(PathError, match="lab name"):
        check_lab_name(name)
