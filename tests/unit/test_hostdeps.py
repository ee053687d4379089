"""Host tool checks: install as root, print the exact command otherwise."""

from __future__ import annotations

import pytest

from harness.host import deps as hostdeps
from harness.errors import HostToolMissing


def test_nothing_missing_installs_nothing():
    hostdeps.ensure(["qemu-img"], which=lambda tool: f"/usr/bin/{tool}", run=lambda argv: pytest.fail("no apt"))


def test_not_root_gets_the_exact_command():
    with pytest.raises(HostToolMissing) as error:
        hostdeps.ensure(["qemu-system-x86_64", "qemu-img", "mke2fs"], which=lambda tool: None, is_root=False)
    assert str(error.value) == (
        "missing host tools: qemu-system-x86_64, qemu-img, mke2fs; install them with: "
        "sudo apt-get install -y --no-install-recommends e2fsprogs qemu-system-x86 qemu-utils"
    )


def test_root_installs_missing_packages_after_an_update():
    installed: set[str] = set()
    calls = []

    def run(argv):
        calls.append(argv)
        if argv[1] == "install":
            installed.update(["qemu-img"])
        return 0

    hostdeps.ensure(["qemu-img"], which=lambda tool: "/usr/bin/x" if tool in installed else None,
                    is_root=True, run=run, say=lambda text: None)
    assert calls[0][:2] == ["apt-get", "update"]
    assert calls[1][:2] == ["apt-get", "install"] and calls[1][-1] == "qemu-utils"


def test_failed_install_is_one_clear_error():
    with pytest.raises(HostToolMissing, match="apt-get install failed for mmdebstrap"):
        hostdeps.ensure(["mmdebstrap"], which=lambda tool: None, is_root=True,
                        run=lambda argv: 0 if argv[1] == "update" else 100, say=lambda text: None)
