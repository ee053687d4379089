"""Recipes and labs found through config, not the checkout (harness/paths.py's precedence)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from harness import paths
from harness.image import build as image
from harness.paths import PACKAGE_RECIPES, REPO_ROOT, Paths, PathError, labs_dir
from harness.scenario.check import LabSpec, known_labs


@pytest.fixture(autouse=True)
def clean(monkeypatch):
    for name in ("SOCKLAB_IMAGES", "SOCKLAB_LABS", "SOCKLAB_CACHE", "SOCKLAB_HOME"):
        monkeypatch.delenv(name, raising=False)
    yield
    paths.configure()


def test_the_recipes_ship_inside_the_package():
    assert PACKAGE_RECIPES.is_relative_to(REPO_ROOT / "harness")
    assert {r.name for r in image.recipes(PACKAGE_RECIPES)} == {"bookworm", "trixie", "forky"}
    assert (PACKAGE_RECIPES / "rootfs" / "etc" / "socklab" / "rc").is_file()
    assert (PACKAGE_RECIPES / "initrd" / "init").is_file()


def test_checkout_defaults_keep_the_cache_and_home_where_they_were(monkeypatch):
    monkeypatch.setattr(paths, "IN_CHECKOUT", True)
    found = Paths.default()
    assert (found.images, found.cache, found.home) == (PACKAGE_RECIPES, REPO_ROOT / "images" / "cache",
                                                       REPO_ROOT / ".socklab")
    assert labs_dir() == REPO_ROOT / "labs"


def test_the_shipped_recipes_named_explicitly_keep_the_default_cache(monkeypatch, tmp_path):
    """SOCKLAB_IMAGES=<the package's recipes> (live tests pass paths.images to their subprocesses) must
    not make a cache inside the package: that built a whole image under harness/image/recipes/cache."""
    monkeypatch.setattr(paths, "IN_CHECKOUT", True)
    monkeypatch.setenv("SOCKLAB_IMAGES", str(PACKAGE_RECIPES))
    assert Paths.default().cache == REPO_ROOT / "images" / "cache"
    assert Paths(images=PACKAGE_RECIPES, home=tmp_path / "own-home").cache == REPO_ROOT / "images" / "cache"
    monkeypatch.setenv("SOCKLAB_IMAGES", str(tmp_path / "mine"))
    assert Paths.default().cache == tmp_path / "mine" / "cache"


def test_installed_defaults_are_the_users_dirs(monkeypatch, tmp_path):
    monkeypatch.setattr(paths, "IN_CHECKOUT", False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.chdir(tmp_path)
    found = Paths.default()
    assert (found.images, found.cache, found.home) == (PACKAGE_RECIPES, tmp_path / "cache" / "socklab" / "images",
                                                       tmp_path / "state" / "socklab")
    assert labs_dir() == tmp_path / "labs" and paths.project_root() == tmp_path


def test_environment_beats_invoke_config_which_beats_the_default(monkeypatch, tmp_path):
    paths.configure(images=str(tmp_path / "from-config"), labs=str(tmp_path / "labs-config"))
    assert Paths.default().images == tmp_path / "from-config"
    assert Paths.default().cache == tmp_path / "from-config" / "cache"  # a recipe dir keeps its cache beside it
    assert labs_dir() == tmp_path / "labs-config"
    monkeypatch.setenv("SOCKLAB_IMAGES", str(tmp_path / "from-env"))
    monkeypatch.setenv("SOCKLAB_LABS", str(tmp_path / "labs-env"))
    assert Paths.default().images == tmp_path / "from-env" and labs_dir() == tmp_path / "labs-env"
    monkeypatch.setenv("SOCKLAB_LABS", " ")
    with pytest.raises(PathError, match="SOCKLAB_LABS is empty"):
        labs_dir()


def test_labs_are_looked_up_where_config_says(monkeypatch, tmp_path):
    shutil.copytree(REPO_ROOT / "labs" / "03-listen", tmp_path / "mine" / "03-listen")
    monkeypatch.setenv("SOCKLAB_LABS", str(tmp_path / "mine"))
    assert known_labs() == ["03-listen"]
    assert LabSpec.load("03").directory == tmp_path / "mine" / "03-listen"


def _invoke(tmp_path, *args, env=None):
    run_env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "SOCKLAB_HOME": str(tmp_path / "home"), **(env or {})}
    return subprocess.run([sys.executable, "-m", "invoke", *args], cwd=REPO_ROOT, env=run_env, capture_output=True,
                          text=True, timeout=120)


def test_a_lab_directory_anywhere_is_checked_by_path_and_labs_dir_by_invoke_config(tmp_path):
    outside = tmp_path / "course" / "03-listen"
    shutil.copytree(REPO_ROOT / "labs" / "03-listen", outside)
    by_path = _invoke(tmp_path, "lab.check", str(outside), "--model-only", "--out", str(tmp_path / "out"))
    assert by_path.returncode == 0, by_path.stderr
    assert "PASS: " in by_path.stdout
    config = tmp_path / "socklab.yaml"
    config.write_text(f"lab:\n  labs_dir: {outside.parent}\n")
    unknown = _invoke(tmp_path, "-f", str(config), "lab.check", "04-accept", "--model-only")
    assert unknown.returncode == 2 and "unknown lab '04-accept'" in unknown.stderr
    assert "03-listen" in unknown.stderr  # what that labs dir holds
