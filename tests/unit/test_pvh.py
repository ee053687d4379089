"""Taking the kernel's ELF out of a bzImage for a PVH boot: formats, the PVH note, and refusals."""

from __future__ import annotations

import gzip
import lzma
import shutil
import struct

import pytest

from harness.errors import ImageError
from harness.image import pvh


def elf_with_notes(notes: list[tuple[bytes, int]], size: int = 4096) -> bytes:
    """A 64-bit ELF with one PT_NOTE segment holding ``notes`` (name, type), padded to ``size``."""
    body = b""
    for name, note_type in notes:
        name_z = name + b"\0"
        desc = b"\x00\x10\x00\x01"
        body += struct.pack("<III", len(name_z), len(desc), note_type)
        body += name_z.ljust((len(name_z) + 3) // 4 * 4, b"\0") + desc
    header = bytearray(64)
    header[:5] = b"\x7fELF\x02"
    struct.pack_into("<Q", header, 0x20, 64)          # e_phoff
    struct.pack_into("<HH", header, 0x36, 56, 1)      # e_phentsize, e_phnum
    note_at = 64 + 56
    phdr = struct.pack("<IIQQQQQQ", pvh.PT_NOTE, 0, note_at, 0, 0, len(body), len(body), 4)
    return (bytes(header) + phdr + body).ljust(size, b"\0")


def bzimage(payload: bytes, protocol: int = 0x20F, setup_sects: int = 3) -> bytes:
    """A bzImage shell: setup sectors with the boot header, then the payload at payload_offset."""
    setup = bytearray((setup_sects + 1) * 512)
    setup[pvh.SETUP_SECTS_AT] = setup_sects
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, pvh.VERSION_AT, protocol)
    offset = 0x100  # the decompressor's own code comes first in a real one
    struct.pack_into("<II", setup, pvh.PAYLOAD_AT, offset, len(payload))
    return bytes(setup) + b"\x90" * offset + payload + b"trailing setup data"


def with_size(compressed: bytes, elf: bytes) -> bytes:
    return compressed + struct.pack("<I", len(elf))


PVH_ELF = elf_with_notes([(b"Xen", 6), (b"Xen", pvh.XEN_ELFNOTE_PHYS32_ENTRY)])


@pytest.mark.parametrize("method, compress", [
    ("gzip", gzip.compress),
    ("xz", lambda data: lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32)),
    ("lzma", lambda data: lzma.compress(data, format=lzma.FORMAT_ALONE)),
])
def test_the_elf_comes_out_byte_for_byte(tmp_path, method, compress):
    source = tmp_path / "vmlinuz"
    source.write_bytes(bzimage(with_size(compress(PVH_ELF), PVH_ELF)))
    assert pvh.compression(compress(PVH_ELF)) == method
    assert pvh.extract(source, tmp_path / "vmlinux")
    assert (tmp_path / "vmlinux").read_bytes() == PVH_ELF


@pytest.mark.parametrize("tool", ["zstd", "lz4"])
def test_zstd_and_lz4_kernels_use_the_host_tools(tmp_path, tool):
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed")
    import subprocess

    compressed = subprocess.run([tool, "-c", *(["-l"] if tool == "lz4" else [])], input=PVH_ELF,
                                capture_output=True, check=True).stdout
    source = tmp_path / "vmlinuz"
    source.write_bytes(bzimage(with_size(compressed, PVH_ELF)))
    assert pvh.extract(source, tmp_path / "vmlinux")
    assert (tmp_path / "vmlinux").read_bytes() == PVH_ELF


def test_a_kernel_without_the_pvh_note_is_left_to_its_bzimage(tmp_path):
    plain = elf_with_notes([(b"Xen", 6), (b"GNU", pvh.XEN_ELFNOTE_PHYS32_ENTRY)])
    source = tmp_path / "vmlinuz"
    source.write_bytes(bzimage(with_size(gzip.compress(plain), plain)))
    assert not pvh.extract(source, tmp_path / "vmlinux")
    assert not (tmp_path / "vmlinux").exists()


def test_a_payload_that_decompresses_to_another_size_is_refused(tmp_path):
    source = tmp_path / "vmlinuz"
    source.write_bytes(bzimage(gzip.compress(PVH_ELF) + struct.pack("<I", len(PVH_ELF) + 1)))
    with pytest.raises(ImageError, match="its build recorded"):
        pvh.extract(source, tmp_path / "vmlinux")


@pytest.mark.parametrize("data, message", [
    (b"MZ" + b"\0" * 0x300, "not a bzImage"),
    (bzimage(b"x" * 16, protocol=0x206), "older than 2.08"),
    (bzimage(b"\x00\x01\x02\x03" * 4 + b"size"), "unknown kernel compression"),
])
def test_what_is_not_a_usable_bzimage_says_why(tmp_path, data, message):
    source = tmp_path / "vmlinuz"
    source.write_bytes(data)
    with pytest.raises(ImageError, match=message):
        pvh.extract(source, tmp_path / "vmlinux")


def test_a_payload_running_past_the_file_is_refused():
    image = bytearray(bzimage(b"x" * 64))
    struct.pack_into("<II", image, pvh.PAYLOAD_AT, 0x100, 1 << 20)
    with pytest.raises(ImageError, match="past the end"):
        pvh.payload(bytes(image))
