"""Check the host programs socklab runs, and install the missing ones with apt-get as root."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterable, Sequence

from harness.errors import HostToolMissing

# program -> Debian package that ships it
PACKAGE_OF = {
    "qemu-system-x86_64": "qemu-system-x86",
    "qemu-img": "qemu-utils",
    "mmdebstrap": "mmdebstrap",
    "mke2fs": "e2fsprogs",
    "ssh-keygen": "openssh-client",
    "ssh": "openssh-client",
    "ip": "iproute2",
    # Decompress a zstd or lz4 kernel into the ELF a VM boots at its PVH entry (harness/image/pvh.py).
    "zstd": "zstd",
    "lz4": "lz4",
}

IMAGE_TOOLS = ("mmdebstrap", "mke2fs", "ssh-keygen", "zstd", "lz4")
LAB_TOOLS = ("qemu-system-x86_64", "qemu-img", "ip", "ssh-keygen")

Which = Callable[[str], "str | None"]
Runner = Callable[[Sequence[str]], int]


def _apt_get(argv: Sequence[str]) -> int:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    return subprocess.run(list(argv), env=env, stdin=subprocess.DEVNULL).returncode


def install_command(packages: Iterable[str]) -> str:
    """The exact command a non-root user has to run."""
    return "sudo apt-get install -y --no-install-recommends " + " ".join(sorted(set(packages)))


def missing(tools: Iterable[str], which: Which = shutil.which) -> list[str]:
    return [tool for tool in tools if which(tool) is None]


def ensure(
    tools: Iterable[str],
    *,
    which: Which = shutil.which,
    is_root: bool | None = None,
    run: Runner = _apt_get,
    say: Callable[[str], None] = print,
) -> None:
    """Make sure every tool is on PATH.

    As root, missing tools are installed with apt-get (one ``update`` first, so a
    fresh machine's empty package lists do not fail the install). Otherwise the
    error names the exact command to run.
    """
    absent = missing(tools, which)
    if not absent:
        return
    packages = sorted({PACKAGE_OF.get(tool, tool) for tool in absent})
    if is_root is None:
        is_root = os.geteuid() == 0
    if not is_root:
        raise HostToolMissing(
            f"missing host tools: {', '.join(absent)}; install them with: {install_command(packages)}"
        )
    say(f"installing host packages: {' '.join(packages)}")
    if run(["apt-get", "update", "-q"]) != 0:
        raise HostToolMissing("apt-get update failed; cannot install " + " ".join(packages))
    if run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages]) != 0:
        raise HostToolMissing("apt-get install failed for " + " ".join(packages))
    still = missing(absent, which)
    if still:
        raise HostToolMissing(f"installed {' '.join(packages)} but still missing: {', '.join(still)}")
