"""A user's kernel (--kernel-image, --modules): every bad input is caught before a VM starts."""

from __future__ import annotations

import lzma
import stat

import pytest

from harness.image import kernel
from harness.errors import ImageError
from harness.image.initrd import Entry, build_initrd, read_newc, write_newc


def fake_bzimage(path, version: bytes = b"6.12.99-test (me@box) #1 SMP"):
    """The few bytes of an x86 boot header that name a kernel's release."""
    blob = bytearray(0x1000)
    blob[0x1FE:0x200] = b"\x55\xaa"
    blob[0x202:0x206] = b"HdrS"
    blob[0x20E:0x210] = (0x800 - 0x200).to_bytes(2, "little")
    blob[0x800:0x800 + len(version) + 1] = version + b"\0"
    path.write_bytes(bytes(blob))
    return path


def module_tree(root, release="6.12.99-test", dep="kernel/virtio_pci.ko.xz:\nkernel/virtio_blk.ko.xz:\n",
                builtin="kernel/drivers/net/virtio_net.ko\n"):
    moddir = root / "lib/modules" / release
    (moddir / "kernel").mkdir(parents=True)
    (moddir / "modules.dep").write_text(dep)
    (moddir / "modules.builtin").write_text(builtin)
    for line in dep.splitlines():
        (moddir / line.split(":")[0]).write_bytes(lzma.compress(b"\x7fELF " + line.encode()))
    return root


def test_the_release_is_read_from_the_boot_header(tmp_path):
    assert kernel.bzimage_release(fake_bzimage(tmp_path / "bzImage")) == "6.12.99-test"


def test_a_file_that_is_not_a_bzimage_is_refused(tmp_path):
    (tmp_path / "vmlinux").write_bytes(b"\x7fELF" + b"\0" * 4096)
    with pytest.raises(ImageError, match="is not a bzImage"):
        kernel.bzimage_release(tmp_path / "vmlinux")
    with pytest.raises(ImageError, match="No such file"):
        kernel.bzimage_release(tmp_path / "absent")


def test_modules_of_another_release_are_refused_by_name(tmp_path):
    bz = fake_bzimage(tmp_path / "bzImage")
    module_tree(tmp_path / "mods", release="6.1.0-57-cloud-amd64")
    with pytest.raises(ImageError, match="has modules of 6.1.0-57-cloud-amd64, but the kernel .* is 6.12.99-test"):
        kernel.check_custom(bz, tmp_path / "mods")


def test_a_kernel_without_virtio_drivers_is_refused(tmp_path):
    bz = fake_bzimage(tmp_path / "bzImage")
    module_tree(tmp_path / "mods", dep="kernel/e1000.ko.xz:\n", builtin="")
    with pytest.raises(ImageError, match="no virtio drivers .*virtio_pci, virtio_blk, virtio_net"):
        kernel.check_custom(bz, tmp_path / "mods")


def test_built_in_and_modular_virtio_both_count(tmp_path):
    bz = fake_bzimage(tmp_path / "bzImage")
    release, moddir = kernel.check_custom(bz, module_tree(tmp_path / "mods"))
    assert release == "6.12.99-test" and moddir == tmp_path / "mods/lib/modules/6.12.99-test"


def test_the_initrd_holds_decompressed_modules_and_skips_built_in_ones(tmp_path):
    mods = module_tree(tmp_path / "mods", builtin="kernel/fs/ext4/ext4.ko\n")
    (tmp_path / "busybox").write_bytes(b"bb")
    blob = build_initrd(mods, "6.12.99-test", ["virtio_pci", "virtio_blk", "ext4"], b"#!init", busybox=tmp_path / "busybox",
                        modules_root=mods)
    members = {name: data for name, _mode, data, _rdev in read_newc(blob)}
    assert members["modules.order"] == b"virtio_pci\nvirtio_blk\n"
    assert members["modules/virtio_blk.ko"].startswith(b"\x7fELF")
    assert members["bin/busybox"] == b"bb" and members["init"] == b"#!init"


def test_read_newc_reads_what_write_newc_wrote():
    entries = [Entry("a", stat.S_IFREG | 0o644, b"abc"), Entry("d", stat.S_IFDIR | 0o755)]
    assert [(n, m, d) for n, m, d, _ in read_newc(write_newc(entries))] == [(e.name, e.mode, e.data) for e in entries]


def fake_userland(tmp_path):
    from harness.image.build import Image, file_sha256

    directory = tmp_path / "image"
    directory.mkdir()
    initrd = write_newc([Entry("bin/busybox", stat.S_IFREG | 0o755, b"busybox!"),
                         Entry("init", stat.S_IFREG | 0o755, b"#!/bin/busybox sh\n")])
    (directory / "initrd.img").write_bytes(initrd)
    return Image(directory, "hash", "6.1.0-57-cloud-amd64", "ssh-ed25519 AAAA",
                 {"initrd.img": file_sha256(directory / "initrd.img")}, recipe="bookworm")


def test_a_user_kernel_gets_an_initrd_of_its_own_modules_and_a_module_disk_once(tmp_path):
    bz = fake_bzimage(tmp_path / "bzImage")
    mods = module_tree(tmp_path / "mods", builtin="kernel/drivers/net/virtio_net.ko\nkernel/fs/ext4/ext4.ko\n")
    userland = fake_userland(tmp_path)
    boot = kernel.prepare(tmp_path / "home", bz, mods, userland, ("virtio_pci", "virtio_blk"))
    assert boot.custom and boot.release == "6.12.99-test" and boot.image is userland
    assert boot.kernel.read_bytes() == bz.read_bytes() and boot.source == str(bz.resolve())
    members = {name: data for name, _mode, data, _rdev in read_newc(boot.initrd.read_bytes())}
    assert members["bin/busybox"] == b"busybox!" and members["modules.order"] == b"virtio_pci\nvirtio_blk\n"
    assert boot.modules_disk is not None and boot.modules_disk.stat().st_size > 0
    again = kernel.prepare(tmp_path / "home", bz, mods, userland, ("virtio_pci", "virtio_blk"))
    assert again.initrd == boot.initrd and again.initrd.stat().st_mtime_ns == boot.initrd.stat().st_mtime_ns


def test_a_user_kernel_without_modules_boots_with_an_initrd_that_loads_none(tmp_path):
    boot = kernel.prepare(tmp_path / "home", fake_bzimage(tmp_path / "bzImage"), None, fake_userland(tmp_path),
                          ("virtio_pci", "virtio_blk"))
    members = {name: data for name, _mode, data, _rdev in read_newc(boot.initrd.read_bytes())}
    assert members["modules.order"] == b"\n" and boot.modules_disk is None


def test_a_user_kernel_that_cannot_mount_ext4_is_refused(tmp_path):
    with pytest.raises(ImageError, match="cannot mount the lab's root disk: kernel module 'ext4'"):
        kernel.prepare(tmp_path / "home", fake_bzimage(tmp_path / "bzImage"), module_tree(tmp_path / "mods"),
                       fake_userland(tmp_path), ("virtio_pci", "virtio_blk"))
