"""Write the guest's tiny initrd: busybox, the virtio modules for the root disk, and /init.

Debian's initramfs-tools image is 15 MB of zstd that TCG has to unpack and a
udev run it has to sit through; a lab VM needs two modules and a mount.
"""

from __future__ import annotations

import io
import stat
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Entry:
    """One cpio member: a directory, a regular file or a character device."""

    name: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def _pad4(n: int) -> int:
    return (4 - n % 4) % 4


def write_newc(entries: list[Entry]) -> bytes:
    """Serialise entries as an uncompressed SVR4 ``newc`` cpio archive, the format the kernel unpacks."""
    out = io.BytesIO()
    for ino, entry in enumerate([*entries, Entry("TRAILER!!!", 0)], start=1):
        name = entry.name.encode() + b"\0"
        fields = (
            ino, entry.mode, 0, 0, 1, 0, len(entry.data),
            0, 0, entry.rdev[0], entry.rdev[1], len(name), 0,
        )
        header = b"070701" + b"".join(b"%08X" % value for value in fields)
        out.write(header + name + b"\0" * _pad4(len(header) + len(name)))
        out.write(entry.data + b"\0" * _pad4(len(entry.data)))
    return out.getvalue()


def module_load_order(modules_dep: str, wanted: list[str]) -> list[str]:
    """Resolve ``wanted`` module names against modules.dep, dependencies first.

    Returns paths relative to the modules directory, each once.
    """
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in modules_dep.splitlines():
        if ":" not in line:
            continue
        path, _, rest = line.partition(":")
        deps[path] = rest.split()
        by_name[Path(path).name.split(".ko")[0].replace("-", "_")] = path
    order: list[str] = []

    def visit(path: str) -> None:
        if path in order:
            return
        for dep in deps.get(path, []):
            visit(dep)
        order.append(path)

    for name in wanted:
        path = by_name.get(name.replace("-", "_"))
        if path is None:
            raise KeyError(f"kernel module {name!r} is not in modules.dep")
        visit(path)
    return order


def build_initrd(root: Path, kernel_release: str, modules: list[str], init_script: bytes) -> bytes:
    """Build the initrd from files of the freshly bootstrapped guest root ``root``."""
    moddir = root / "usr/lib/modules" / kernel_release
    order = module_load_order((moddir / "modules.dep").read_text(), modules)
    names = [Path(p).name.split(".ko")[0] for p in order]
    entries = [
        Entry("bin", stat.S_IFDIR | 0o755),
        Entry("dev", stat.S_IFDIR | 0o755),
        Entry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)),
        Entry("proc", stat.S_IFDIR | 0o755),
        Entry("newroot", stat.S_IFDIR | 0o755),
        Entry("modules", stat.S_IFDIR | 0o755),
        Entry("bin/busybox", stat.S_IFREG | 0o755, (root / "bin/busybox").read_bytes()),
        Entry("init", stat.S_IFREG | 0o755, init_script),
        Entry("modules.order", stat.S_IFREG | 0o644, ("\n".join(names) + "\n").encode()),
    ]
    for path, name in zip(order, names):
        entries.append(Entry(f"modules/{name}.ko", stat.S_IFREG | 0o644, (moddir / path).read_bytes()))
    return write_newc(entries)
