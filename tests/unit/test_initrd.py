"""The initrd writer: newc cpio the kernel can unpack, and module dependency order."""

from __future__ import annotations

import stat

import pytest

from harness.image.initrd import Entry, module_load_order, write_newc

MODULES_DEP = """\
kernel/drivers/virtio/virtio.ko:
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio_pci_modern_dev.ko:
kernel/drivers/virtio/virtio_pci_legacy_dev.ko:
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_legacy_dev.ko kernel/drivers/virtio/virtio_pci_modern_dev.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
"""


def read_newc(blob: bytes) -> list[tuple[str, int, bytes, tuple[int, int]]]:
    """A minimal newc reader, independent of the writer's code."""
    members, offset = [], 0
    while True:
        assert blob[offset:offset + 6] == b"070701"
        fields = [int(blob[offset + 6 + 8 * i: offset + 14 + 8 * i], 16) for i in range(13)]
        namesize, filesize = fields[11], fields[6]
        name_start = offset + 110
        name = blob[name_start:name_start + namesize - 1].decode()
        data_start = name_start + namesize + (-(110 + namesize) % 4)
        data = blob[data_start:data_start + filesize]
        offset = data_start + filesize + (-filesize % 4)
        if name == "TRAILER!!!":
            return members
        members.append((name, fields[1], data, (fields[9], fields[10])))


def test_round_trip_of_files_dirs_and_device_nodes():
    entries = [
        Entry("dev", stat.S_IFDIR | 0o755),
        Entry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)),
        Entry("init", stat.S_IFREG | 0o755, b"#!/bin/sh\necho hi\n"),
        Entry("odd", stat.S_IFREG | 0o644, b"x" * 5),
    ]
    members = read_newc(write_newc(entries))
    assert [(m[0], m[1], m[2]) for m in members] == [(e.name, e.mode, e.data) for e in entries]
    assert members[1][3] == (5, 1)


def test_archive_is_padded_to_four_bytes():
    assert len(write_newc([Entry("a", stat.S_IFREG | 0o644, b"abc")])) % 4 == 0


def test_dependencies_load_first_and_once():
    order = module_load_order(MODULES_DEP, ["virtio_pci", "virtio_blk"])
    names = [path.rsplit("/", 1)[1] for path in order]
    assert names.index("virtio.ko") < names.index("virtio_pci.ko")
    assert names.index("virtio_ring.ko") < names.index("virtio_blk.ko")
    assert len(names) == len(set(names)) == 6


def test_unknown_module_is_named():
    with pytest.raises(KeyError, match="virtio_scsi"):
        module_load_order(MODULES_DEP, ["virtio_scsi"])
