"""A damaged cached image is found by its recorded digests and rebuilt, never booted (a real rebuild, ~65 s)."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from harness.image import build as image
from harness.errors import LabError
from harness.lab.lifecycle import Lab
from harness.paths import Paths

pytestmark = pytest.mark.vm


@pytest.fixture
def scratch_cache(lab, monkeypatch):
    """A copy of the current cache entry in a cache of its own (same file system: sparse copies are cheap)."""
    current = image.find(lab.paths)
    with tempfile.TemporaryDirectory(prefix="socklab-damage-", dir=lab.paths.images) as scratch:
        subprocess.run(["cp", "-a", "--sparse=always", str(current.directory), scratch], check=True)
        shutil.rmtree(Path(scratch) / current.directory.name / "snapshots", ignore_errors=True)
        monkeypatch.setenv("SOCKLAB_CACHE", scratch)
        yield Path(scratch) / current.directory.name


def test_altered_root_is_refused_then_rebuilt(lab, scratch_cache, tmp_path):
    rootfs = scratch_cache / image.ROOTFS
    rootfs.chmod(0o644)
    with open(rootfs, "r+b") as handle:  # same size, other bytes
        handle.seek(rootfs.stat().st_size // 2)
        handle.write(b"socklab was here")
    own = Lab(Paths(images=lab.paths.images, home=tmp_path / "home"))
    shutil.copytree(lab.paths.keys, own.paths.keys)
    with pytest.raises(LabError, match="is damaged .*rootfs.ext4"):
        own.up("single")
    assert not own.run_dir.exists()  # nothing was started

    rebuilt, built = image.build(lab.paths)
    assert built and rebuilt.directory == scratch_cache
    assert rebuilt.damaged(full=True) == []
