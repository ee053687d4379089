"""A damaged cached image is found by its recorded digests, refused by lab.up and rebuilt, never booted.

The refusal is the real thing: ``lab.up`` on a cache entry whose root file system was altered. The
rebuild runs the real ``image.build`` (digest check, build lock, work directory, the swap that puts
the damaged entry aside and deletes it) with one stand-in: the mmdebstrap + mke2fs stage, which
made this test a two-minute image build, writes the pristine entry's files instead. What that stage
makes of a recipe is proven by every first build (CI's `invoke lab.up` on a fresh machine, and the
6.12 and 7.2 builds of its matrix step); this test is about what happens to a damaged entry.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from harness.errors import LabError
from harness.image import build as image
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
        yield current, Path(scratch) / current.directory.name


def test_altered_root_is_refused_then_rebuilt(lab, scratch_cache, tmp_path, monkeypatch):
    pristine, entry = scratch_cache
    rootfs = entry / image.ROOTFS
    rootfs.chmod(0o644)
    with open(rootfs, "r+b") as handle:  # same size, other bytes
        handle.seek(rootfs.stat().st_size // 2)
        handle.write(b"socklab was here")
    damaged_inode = rootfs.stat().st_ino
    own = Lab(Paths(images=lab.paths.images, home=tmp_path / "home"))
    shutil.copytree(lab.paths.keys, own.paths.keys)
    with pytest.raises(LabError, match="is damaged .*rootfs.ext4"):
        own.up("single")
    assert not own.run_dir.exists()  # nothing was started

    stages = []

    def pristine_stage(paths, recipe, key, work, client_pubkey, mirror):
        """The build stage's result without mmdebstrap: the files the pristine entry was built with."""
        stages.append(work)
        assert key == pristine.recipe_hash and work.parent == entry.parent and work != entry
        # The PVH ELF is there when the build could extract one from the kernel (harness/image/pvh.py).
        optional = [image.PVH_KERNEL] if (pristine.directory / image.PVH_KERNEL).exists() else []
        for name in (image.ROOTFS, image.KERNEL, image.INITRD, image.MANIFEST, image.HOST_KEY, *optional):
            subprocess.run(["cp", "--sparse=always", str(pristine.directory / name), str(work / name)], check=True)
        return image.Image.load(work)

    monkeypatch.setattr(image, "_build_into", pristine_stage)
    rebuilt, built = image.build(lab.paths)
    assert built and len(stages) == 1, "the damaged entry was taken as cached"
    assert rebuilt.directory == entry
    assert rebuilt.damaged(full=True) == []
    assert (entry / image.ROOTFS).stat().st_ino != damaged_inode  # swapped for the new one, not patched
    assert sorted(p.name for p in entry.parent.iterdir() if p.name != ".lock") == [entry.name]  # the damaged one is gone
    assert image.build(lab.paths) == (image.Image.load(entry), False)  # and the next build finds it whole
