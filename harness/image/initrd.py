"""Write the guest's tiny initrd: busybox, the virtio modules for the root disk, and /init.

Debian's initramfs-tools image is 15 MB of zstd that TCG has to unpack and a
udev run it has to sit through; a lab VM needs two modules and a mount.

Kernels differ in how they ship those modules: bookworm's 6.1 has plain
``.ko`` files, trixie's and forky's compress them (``.ko.xz``, ``.ko.zst``),
and any kernel may build a driver in (listed in ``modules.builtin``). busybox
``insmod`` hands the file to ``init_module`` as it is, so compressed modules are
unpacked here on the host, and built-in ones are left out.
"""

from __future__ import annotations

import gzip
import io
import lzma
import shutil
import stat
import subprocess
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


def read_newc(blob: bytes) -> list[tuple[str, int, bytes, tuple[int, int]]]:
    """The members of an uncompressed newc archive: (name, mode, data, rdev)."""
    members, offset = [], 0
    while blob[offset:offset + 6] == b"070701":
        fields = [int(blob[offset + 6 + 8 * i: offset + 14 + 8 * i], 16) for i in range(13)]
        name_size, file_size = fields[11], fields[6]
        name = blob[offset + 110:offset + 110 + name_size - 1].decode()
        data_start = offset + 110 + name_size + _pad4(110 + name_size)
        if name == "TRAILER!!!":
            break
        members.append((name, fields[1], blob[data_start:data_start + file_size], (fields[9], fields[10])))
        offset = data_start + file_size + _pad4(file_size)
    return members


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


def module_name(path: str) -> str:
    """``kernel/drivers/block/virtio_blk.ko.xz`` -> ``virtio_blk`` (modprobe's spelling: ``-`` is ``_``)."""
    return Path(path).name.split(".ko")[0].replace("-", "_")


def module_load_order(modules_dep: str, wanted: list[str], builtin: str = "") -> list[str]:
    """Resolve ``wanted`` module names against modules.dep, dependencies first.

    Returns paths relative to the modules directory, each once. A module named
    in ``builtin`` (the text of modules.builtin) is part of the kernel image and
    needs no loading.
    """
    built_in = {module_name(line) for line in builtin.split()}
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in modules_dep.splitlines():
        if ":" not in line:
            continue
        path, _, rest = line.partition(":")
        deps[path] = rest.split()
        by_name[module_name(path)] = path
    order: list[str] = []

    def visit(path: str) -> None:
        if path in order:
            return
        for dep in deps.get(path, []):
            visit(dep)
        order.append(path)

    for name in wanted:
        module_path = by_name.get(name.replace("-", "_"))
        if module_path is None and name.replace("-", "_") in built_in:
            continue
        if module_path is None:
            raise KeyError(f"kernel module {name!r} is not in modules.dep")
        visit(module_path)
    return order


def decompress_module(name: str, data: bytes) -> bytes:
    """A module file's ELF bytes, whatever Debian compressed it with (by its name's suffix)."""
    if name.endswith(".ko"):
        return data
    if name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if name.endswith(".ko.gz"):
        return gzip.decompress(data)
    if name.endswith(".ko.zst"):
        if shutil.which("zstd") is None:
            raise OSError(f"{name} is zstd-compressed and the host has no zstd (apt-get install zstd)")
        return subprocess.run(["zstd", "-dc"], input=data, capture_output=True, check=True).stdout
    raise OSError(f"{name}: unknown module compression")


def modules_dir(root: Path, kernel_release: str) -> Path:
    """``lib/modules/<release>`` in a guest root or a ``make modules_install`` tree (usrmerged or not)."""
    for candidate in (root / "usr/lib/modules" / kernel_release, root / "lib/modules" / kernel_release):
        if (candidate / "modules.dep").is_file():
            return candidate
    raise OSError(f"no modules.dep for {kernel_release} under {root}/lib/modules or {root}/usr/lib/modules")


def build_initrd(root: Path, kernel_release: str, modules: list[str], init_script: bytes,
                 busybox: Path | None = None, modules_root: Path | None = None) -> bytes:
    """Build the initrd from files of the freshly bootstrapped guest root ``root``.

    ``modules_root`` is where the kernel's module tree is (default: ``root``
    itself); a user-built kernel brings its own.
    """
    if modules:
        moddir = modules_dir(modules_root or root, kernel_release)
        builtin = moddir / "modules.builtin"
        order = module_load_order((moddir / "modules.dep").read_text(), modules,
                                  builtin.read_text() if builtin.is_file() else "")
    else:  # a kernel with everything built in, and no module tree
        order = []
    names = [Path(p).name.split(".ko")[0] for p in order]
    entries = [
        Entry("bin", stat.S_IFDIR | 0o755),
        Entry("dev", stat.S_IFDIR | 0o755),
        Entry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)),
        Entry("proc", stat.S_IFDIR | 0o755),
        Entry("newroot", stat.S_IFDIR | 0o755),
        Entry("modules", stat.S_IFDIR | 0o755),
        Entry("bin/busybox", stat.S_IFREG | 0o755, (busybox or root / "bin/busybox").read_bytes()),
        Entry("init", stat.S_IFREG | 0o755, init_script),
        Entry("modules.order", stat.S_IFREG | 0o644, ("\n".join(names) + "\n").encode()),
    ]
    for path, name in zip(order, names):
        module = decompress_module(path, (moddir / path).read_bytes())
        entries.append(Entry(f"modules/{name}.ko", stat.S_IFREG | 0o644, module))
    return write_newc(entries)
