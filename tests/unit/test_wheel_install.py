"""A wheel install runs a lab directory outside the checkout (issue #13's "done when").

Builds socklab's wheel from a copy of the source, installs it (not editable) into a new venv
and runs what a user of an installed socklab runs, the ``socklab`` command, on a lab copied
outside the checkout, with no PYTHONPATH: the recipes, topologies and tasks must all come
from the wheel. The venv sees the system's site-packages for socklab's dependencies, so no
network is needed when setuptools and wheel are installed; otherwise pip fetches them for
the build as usual.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from harness.image import build as image
from harness.paths import PACKAGE_RECIPES, REPO_ROOT, Paths

# One worker runs the module (--dist loadgroup): the wheel is built and installed once, not once per worker.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("wheel-install")]

# What a checkout holds that is not source: never copied into the build.
NOT_SOURCE = shutil.ignore_patterns(".git", ".socklab", "cache", "results", "work", "build", "*.egg-info",
                                    "__pycache__", ".pytest_cache", ".hypothesis", "*.pyc")


def _can_build_offline() -> bool:
    if importlib.util.find_spec("wheel") is None or importlib.util.find_spec("setuptools") is None:
        return False
    import setuptools

    return int(setuptools.__version__.split(".")[0]) >= 64


def _run(argv, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=600, **kwargs)
    assert result.returncode == 0, f"{argv}: exit {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(venv bin dir, environment without the checkout) of a fresh venv with socklab's wheel installed."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "src"
    shutil.copytree(REPO_ROOT, source, ignore=NOT_SOURCE)
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PYTHON", "SOCKLAB_", "PIP_"))}
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp / "dist"), str(source)]
    if _can_build_offline():
        build[4:4] = ["--no-build-isolation", "--no-index"]
    _run(build, env=env, cwd=tmp)
    wheel, = (tmp / "dist").glob("socklab-*.whl")
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], env=env)
    python = venv / "bin" / "python"
    # The system's pip, run by the venv's python, installs into the venv.
    _run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--force-reinstall", str(wheel)],
         env=env, cwd=tmp)
    env.update(SOCKLAB_HOME=str(tmp / "home"), XDG_CACHE_HOME=str(tmp / "xdg-cache"),
               XDG_STATE_HOME=str(tmp / "xdg-state"), SOCKLAB_CACHE=str(tmp / "images-cache"))
    return venv / "bin", env, tmp


def test_the_installed_package_is_the_wheels_not_the_checkout(installed):
    bin_dir, env, tmp = installed
    where = _run([str(bin_dir / "python"), "-c", "import harness, tasks; print(harness.__file__); print(tasks.__file__)"],
                 env=env, cwd=tmp).stdout.split()
    assert all(Path(path).is_relative_to(bin_dir.parent) for path in where), where


def test_socklab_runs_lab_model_on_a_lab_directory_outside_the_checkout(installed):
    bin_dir, env, tmp = installed
    elsewhere = tmp / "course"
    shutil.copytree(REPO_ROOT / "labs" / "03-listen", elsewhere / "03-listen")
    result = _run([str(bin_dir / "socklab"), "lab.model", "--file", "03-listen/backlog.yaml", "--out", "out",
                   "--reveal"], env=env, cwd=elsewhere)
    assert "model of Linux 6.1" in result.stderr
    assert "PASS: " in result.stdout and "backlog-overflow" in result.stdout
    report, = (elsewhere / "out").glob("backlog-*/report.md")
    assert report.read_text().startswith("# backlog-overflow")


def test_socklab_checks_labs_found_by_path_and_by_socklab_labs(installed):
    bin_dir, env, tmp = installed
    elsewhere = tmp / "course2"
    shutil.copytree(REPO_ROOT / "labs" / "02-bind", elsewhere / "02-bind")
    by_path = _run([str(bin_dir / "socklab"), "lab.check", "./02-bind", "--model-only", "--json", "--out", "out"],
                   env=env, cwd=elsewhere)
    assert json.loads(by_path.stdout)["lab"] == "02-bind"
    by_env = _run([str(bin_dir / "socklab"), "lab.check", "02", "--model-only", "--out", "out"],
                  env={**env, "SOCKLAB_LABS": str(elsewhere)}, cwd=tmp)
    assert "PASS: " in by_env.stdout


def test_the_wheels_recipes_build_the_same_image_as_the_checkout(installed):
    bin_dir, env, tmp = installed
    key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFixedKeyForTheHashOnly socklab"
    code = ("import sys; from harness.paths import Paths; from harness.image import build as b; "
            "p = Paths.default(); print(p.images); print(b.recipe_hash(p, b.resolve(p.images, 'bookworm'), sys.argv[1]))")
    images, digest = _run([str(bin_dir / "python"), "-c", code, key], env=env, cwd=tmp).stdout.split()
    assert Path(images).is_relative_to(bin_dir.parent)
    here = Paths(images=PACKAGE_RECIPES, home=tmp / "unused")
    assert digest == image.recipe_hash(here, image.resolve(here.images, "bookworm"), key)
