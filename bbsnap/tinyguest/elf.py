"""The two things the library walk needs from an ELF file: DT_NEEDED and PT_INTERP.

Parsed by hand from the program headers, which stripping keeps, so the build
needs no binutils and never runs a foreign binary (as ``ldd`` would).
"""

from __future__ import annotations

import struct
from pathlib import Path

from bbsnap.errors import BbsnapError

_PT_LOAD, _PT_DYNAMIC, _PT_INTERP = 1, 2, 3
_DT_NULL, _DT_NEEDED, _DT_STRTAB = 0, 1, 5

# (p_vaddr, p_offset, p_filesz) of one PT_LOAD segment.
_Load = tuple[int, int, int]


def elf_dynamic(path: Path) -> tuple[list[str], str | None]:
    """(DT_NEEDED sonames, PT_INTERP) of a little-endian ELF64 file."""
    data = path.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise BbsnapError(f"{path.name} is not a little-endian 64-bit ELF file")
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    headers = [struct.unpack_from("<IIQQQQ", data, phoff + i * phentsize) for i in range(phnum)]
    interp = None
    dynamic: tuple[int, int] | None = None
    loads: list[_Load] = []
    for p_type, _flags, p_offset, p_vaddr, _paddr, p_filesz in headers:
        if p_type == _PT_INTERP:
            interp = data[p_offset:p_offset + p_filesz].rstrip(b"\0").decode()
        elif p_type == _PT_DYNAMIC:
            dynamic = (p_offset, p_filesz)
        elif p_type == _PT_LOAD:
            loads.append((p_vaddr, p_offset, p_filesz))
    if dynamic is None:
        return [], interp
    return _needed(data, dynamic, loads), interp


def _needed(data: bytes, dynamic: tuple[int, int], loads: list[_Load]) -> list[str]:
    offsets, strtab = [], None
    for pos in range(dynamic[0], dynamic[0] + dynamic[1], 16):
        tag, value = struct.unpack_from("<qQ", data, pos)
        if tag == _DT_NULL:
            break
        if tag == _DT_NEEDED:      # an offset into the string table
            offsets.append(value)
        elif tag == _DT_STRTAB:    # a virtual address, not a file offset
            strtab = _vaddr_to_offset(value, loads)
    if strtab is None:
        return []
    return [data[strtab + off:data.index(b"\0", strtab + off)].decode() for off in offsets]


def _vaddr_to_offset(vaddr: int, loads: list[_Load]) -> int:
    for p_vaddr, p_offset, p_filesz in loads:
        if p_vaddr <= vaddr < p_vaddr + p_filesz:
            return vaddr - p_vaddr + p_offset
    raise BbsnapError("ELF string table outside every loaded segment")
