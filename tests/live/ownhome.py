"""A socklab home of a test's own that boots the same cached image as the install's lab."""

from __future__ import annotations

import shutil
from pathlib import Path

from harness.paths import Paths


def own_home(install: Paths, home: Path) -> Paths:
    """``home`` with the install's client key (the image authorises it) and its KVM verdict, if one was probed.

    A host whose KVM is known not to run the lab kernel (PVM) never writes a verdict file.
    """
    shutil.copytree(install.keys, home / "keys")
    probe = install.home / "accel-probe.json"
    if probe.exists():
        shutil.copy(probe, home / "accel-probe.json")
    return Paths(images=install.images, home=home)
