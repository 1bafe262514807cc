"""Byte sizes: parsing human input ("64G", "512M") and showing MiB as the seed does."""

from __future__ import annotations

import re

from bbsnap.errors import UsageError

MIB = 1024 * 1024
GIB = 1024 * MIB
_UNITS = {"": 1, "b": 1, "k": 1024, "m": MIB, "g": GIB, "t": 1024 * GIB}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """Bytes from ``"10G"``, ``"512MiB"``, ``"4096"`` (binary units)."""
    if isinstance(text, int):
        return text
    match = _SIZE.match(text)
    if not match:
        raise UsageError(f"'{text}' is not a size", hint="use a number with K, M, G or T, e.g. 64G")
    number, unit = match.groups()
    return int(float(number) * _UNITS[unit.lower()])


def to_mib(size_bytes: int) -> int:
    """Whole MiB, rounded up, so a non-empty image never shows 0."""
    return (size_bytes + MIB - 1) // MIB
