"""Which kernel a VM boots: an image's own, or one the user built (``--kernel-image``).

A user-built kernel boots over an image's userland. Its modules (from
``make modules_install INSTALL_MOD_PATH=DIR``) go on a small read-only ext4
disk that the initrd mounts over ``/usr/lib/modules``; its initrd is made
here from the userland image's busybox and /init plus the kernel's own virtio
modules. Everything is checked before a VM starts: the file must be a bzImage,
the module tree must be of the kernel's version and must have the virtio
drivers a lab VM needs. Prepared kernels are cached in ``home/kernels/``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from harness.image import build as image
from harness.image.build import Image
from harness.errors import ImageError
from harness.image.initrd import build_initrd, module_name, modules_dir, read_newc

# Drivers a lab VM cannot do without: the root disk (PCI transport, block) and both NICs.
VIRTIO_DRIVERS = ("virtio_pci", "virtio_blk", "virtio_net")
# bzImage setup header (Documentation/arch/x86/boot.rst): "HdrS" at 0x202, the
# offset of the version string (minus 0x200) at 0x20e.
HEADER_MAGIC_AT = 0x202
VERSION_POINTER_AT = 0x20E


@dataclass(frozen=True)
class Boot:
    """What one VM boots: a kernel, its initrd, the userland image, and maybe a module disk."""

    image: Image
    kernel: Path
    initrd: Path
    release: str
    sha256: dict
    modules_disk: Path | None = None
    custom: bool = False
    # The user's own file, for lab.status (the VM boots the cached copy beside its initrd).
    source: str = ""

    @classmethod
    def of_image(cls, img: Image) -> "Boot":
        return cls(img, img.boot_kernel, img.initrd, img.kernel_release, img.sha256)


def bzimage_release(path: Path) -> str:
    """The release (``uname -r``) a bzImage was built as, from its setup header; ImageError if it is none."""
    try:
        with path.open("rb") as handle:
            head = handle.read(0x10000)  # the setup code, where the version string lives
    except OSError as exc:
        raise ImageError(f"--kernel-image {path}: {exc.strerror}") from None
    if len(head) < 0x210 or head[HEADER_MAGIC_AT:HEADER_MAGIC_AT + 4] != b"HdrS" or head[0x1FE:0x200] != b"\x55\xaa":
        raise ImageError(f"--kernel-image {path} is not a bzImage (no x86 boot header): give arch/x86/boot/bzImage")
    pointer = int.from_bytes(head[VERSION_POINTER_AT:VERSION_POINTER_AT + 2], "little") + 0x200
    version = head[pointer:pointer + 256].split(b"\0", 1)[0].decode(errors="replace")
    release = version.split(" ", 1)[0]
    if not release:
        raise ImageError(f"--kernel-image {path}: its boot header has no version string")
    return release


def module_releases(modules: Path) -> list[str]:
    """Kernel releases a ``modules_install`` tree holds (``DIR/lib/modules/*`` or ``DIR/usr/lib/modules/*``)."""
    found = []
    for base in (modules / "lib/modules", modules / "usr/lib/modules"):
        if base.is_dir() and not base.is_symlink():
            found += [p.name for p in base.iterdir() if (p / "modules.dep").is_file()]
    return sorted(set(found))


def _module_names(moddir: Path) -> set[str]:
    names = set()
    for listing in ("modules.dep", "modules.builtin"):
        path = moddir / listing
        if path.is_file():
            for line in path.read_text().splitlines():
                if line.strip():
                    names.add(module_name(line.split(":", 1)[0]))
    return names


def check_custom(kernel_image: Path, modules: Path | None) -> tuple[str, Path | None]:
    """Check a user's kernel and module tree before anything boots. Returns (release, modules dir)."""
    release = bzimage_release(kernel_image)
    if modules is None:
        return release, None
    if not modules.is_dir():
        raise ImageError(f"--modules {modules} is not a directory (give INSTALL_MOD_PATH of `make modules_install`)")
    releases = module_releases(modules)
    if release not in releases:
        other = f"modules of {', '.join(releases)}" if releases else "no lib/modules/<release>/modules.dep"
        raise ImageError(f"--modules {modules} has {other}, but the kernel {kernel_image} is {release}: "
                         "pass the INSTALL_MOD_PATH of this kernel's own build")
    moddir = modules_dir(modules, release)
    missing = [name for name in VIRTIO_DRIVERS if name not in _module_names(moddir)]
    if missing:
        raise ImageError(f"kernel {release} has no virtio drivers ({', '.join(missing)} neither built in nor "
                         "modules): enable CONFIG_VIRTIO_PCI, CONFIG_VIRTIO_BLK and CONFIG_VIRTIO_NET")
    return release, moddir


def _tree_digest(path: Path) -> str:
    digest = hashlib.sha256()
    for item in sorted(path.rglob("*")):
        info = item.lstat()
        digest.update(f"{item.relative_to(path)}\0{info.st_size}\0{info.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def prepare(home: Path, kernel_image: Path, modules: Path | None, userland: image.Image,
            initrd_modules: tuple[str, ...]) -> Boot:
    """A Boot for a user-built kernel over ``userland``, made once and cached in ``home/kernels/``."""
    release, moddir = check_custom(kernel_image, modules)
    kernel_sha = image.file_sha256(kernel_image)
    key = hashlib.sha256(json.dumps({"kernel": kernel_sha, "modules": _tree_digest(moddir) if moddir else None,
                                     "userland_initrd": userland.sha256.get(image.INITRD),
                                     "initrd_modules": initrd_modules}).encode()).hexdigest()[:16]
    final = home / "kernels" / f"{release}-{key}"
    if not (final / "boot.json").is_file():
        final.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        work = Path(tempfile.mkdtemp(prefix=".tmp-", dir=final.parent))
        try:
            _prepare_into(work, kernel_image, release, modules, moddir, userland, initrd_modules)
            shutil.rmtree(final, ignore_errors=True)
            work.rename(final)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    meta = json.loads((final / "boot.json").read_text())
    disk = final / "modules.ext4" if moddir else None
    return Boot(userland, final / image.KERNEL, final / image.INITRD, release, meta["sha256"], disk, custom=True,
                source=str(kernel_image.resolve()))


def _prepare_into(work: Path, kernel_image: Path, release: str, modules: Path | None, moddir: Path | None,
                  userland: image.Image, initrd_modules: tuple[str, ...]) -> None:
    members = {name: data for name, _mode, data, _rdev in read_newc(userland.initrd.read_bytes())}
    busybox = work / "busybox"
    busybox.write_bytes(members["bin/busybox"])
    if modules is not None:
        # ext4 may be a module too (Debian builds it in); built-in ones are skipped.
        try:
            blob = build_initrd(modules, release, [*initrd_modules, "ext4"], members["init"], busybox=busybox,
                                modules_root=modules)
        except KeyError as exc:  # a driver the root disk needs is neither built in nor a module
            raise ImageError(f"kernel {release} cannot mount the lab's root disk: {exc.args[0]} "
                             "(enable CONFIG_EXT4_FS and the virtio drivers)") from None
    else:
        blob = build_initrd(modules or work, release, [], members["init"], busybox=busybox, modules_root=None)
    busybox.unlink()
    (work / image.INITRD).write_bytes(blob)
    shutil.copyfile(kernel_image, work / image.KERNEL)
    if moddir is not None:
        used = sum(p.lstat().st_size for p in moddir.rglob("*"))
        size_mib = used * 13 // 10 // (1 << 20) + 16
        tree = work / "tree"
        tree.mkdir()
        # The disk is mounted at /usr/lib/modules: it holds <release>/ at its top.
        shutil.copytree(moddir, tree / release, symlinks=True,
                        ignore=lambda d, names: [n for n in names if n in ("build", "source")])
        result = subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-L", "socklab-mods", "-d", str(tree),
                                 str(work / "modules.ext4"), f"{size_mib}M"], capture_output=True, text=True,
                                stdin=subprocess.DEVNULL)
        shutil.rmtree(tree)
        if result.returncode != 0:
            raise ImageError(f"mke2fs of the module disk failed: {result.stderr.strip()[-300:]}")
    sums = {name: image.file_sha256(work / name) for name in (image.KERNEL, image.INITRD)}
    for name in os.listdir(work):
        (work / name).chmod(stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
    (work / "boot.json").write_text(json.dumps({"release": release, "source": str(kernel_image),
                                                "sha256": sums}, indent=2) + "\n")
