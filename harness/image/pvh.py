"""The kernel's own ELF, taken out of its bzImage, so QEMU can start it at its PVH entry point.

A bzImage is real-mode setup code and a decompressor with the kernel inside it
(Documentation/arch/x86/boot.rst: ``payload_offset`` and ``payload_length`` in
the setup header). Booted as ``-kernel bzImage``, QEMU runs SeaBIOS, the
setup code and the decompressor before Linux runs its first instruction: about
0.8 s of every cold boot under TCG on the reference machine. A kernel built
with CONFIG_PVH carries an ELF note, XEN_ELFNOTE_PHYS32_ENTRY (type 18, see
include/xen/interface/elfnote.h and arch/x86/platform/pvh/head.S), with a
32-bit entry point, and QEMU boots such an ELF directly through its pvh.bin
option ROM, initrd and command line included.

Nothing is rebuilt or patched: the ELF is the payload the decompressor would
have produced, and its length is checked against the size the kernel's build
appends to the payload (scripts/Makefile.lib, ``size_append``).
"""

from __future__ import annotations

import bz2
import lzma
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

from harness.errors import ImageError

SETUP_SECTS_AT = 0x1F1
PAYLOAD_AT = 0x248  # payload_offset, payload_length (boot protocol 2.08+)
VERSION_AT = 0x206
MIN_PROTOCOL = 0x208
XEN_ELFNOTE_PHYS32_ENTRY = 18
PT_NOTE = 4

# Magic numbers of the payload formats the kernel can be built with (scripts/Makefile.lib), and
# the host program that decompresses the two the Python standard library cannot.
FORMATS = (
    (b"\x1f\x8b", "gzip"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"\x02\x21\x4c\x18", "lz4"),
    (b"BZh", "bzip2"),
    (b"\x5d\x00\x00", "lzma"),
)
TOOL_OF = {"zstd": "zstd", "lz4": "lz4"}


def payload(bzimage: bytes) -> tuple[bytes, int]:
    """The compressed kernel inside a bzImage, and the uncompressed size its build recorded."""
    if len(bzimage) < 0x250 or bzimage[0x202:0x206] != b"HdrS":
        raise ImageError("not a bzImage (no x86 boot header)")
    (version,) = struct.unpack_from("<H", bzimage, VERSION_AT)
    if version < MIN_PROTOCOL:
        raise ImageError(f"boot protocol {version >> 8}.{version & 0xff} is older than 2.08 (no payload fields)")
    setup_sects = bzimage[SETUP_SECTS_AT] or 4
    offset, length = struct.unpack_from("<II", bzimage, PAYLOAD_AT)
    start = (setup_sects + 1) * 512 + offset
    data = bzimage[start:start + length]
    if len(data) != length or length < 8:
        raise ImageError("the boot header's payload runs past the end of the file")
    (size,) = struct.unpack_from("<I", data, length - 4)
    return data[:-4], size


def compression(data: bytes) -> str:
    for magic, name in FORMATS:
        if data.startswith(magic):
            return name
    raise ImageError(f"unknown kernel compression (payload starts {data[:6].hex()})")


def decompress(data: bytes, method: str) -> bytes:
    if method == "gzip":
        return zlib.decompressobj(wbits=31).decompress(data)
    if method in ("xz", "lzma"):
        return lzma.LZMADecompressor(format=lzma.FORMAT_XZ if method == "xz" else lzma.FORMAT_ALONE).decompress(data)
    if method == "bzip2":
        return bz2.BZ2Decompressor().decompress(data)
    tool = TOOL_OF[method]
    if shutil.which(tool) is None:
        raise ImageError(f"the kernel is {method}-compressed and `{tool}` is not installed (apt-get install {tool})")
    result = subprocess.run([tool, "-dc"], input=data, capture_output=True, check=False)
    if result.returncode != 0:
        raise ImageError(f"{tool} could not decompress the kernel: {result.stderr.decode(errors='replace').strip()}")
    return result.stdout


def has_pvh_entry(elf: bytes) -> bool:
    """Whether a 64-bit ELF kernel has the PVH entry note QEMU looks for."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2:
        return False
    phoff, = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    for index in range(phnum):
        p_type, _, p_offset, _, _, p_filesz = struct.unpack_from("<IIQQQQ", elf, phoff + index * phentsize)
        if p_type != PT_NOTE:
            continue
        at, end = p_offset, p_offset + p_filesz
        while at + 12 <= end:
            namesz, descsz, note_type = struct.unpack_from("<III", elf, at)
            name = elf[at + 12:at + 12 + namesz].rstrip(b"\0")
            if name == b"Xen" and note_type == XEN_ELFNOTE_PHYS32_ENTRY:
                return True
            at += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return False


def extract(bzimage: Path, out: Path) -> bool:
    """Write the kernel's ELF to ``out`` if it can be booted by its PVH entry; False (nothing written) if not."""
    data, size = payload(bzimage.read_bytes())
    elf = decompress(data, compression(data))
    if len(elf) != size:
        raise ImageError(f"{bzimage.name}: decompressed to {len(elf)} bytes, its build recorded {size}")
    if not has_pvh_entry(elf):
        return False
    out.write_bytes(elf)
    return True
