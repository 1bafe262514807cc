"""Metadata sidecars: ``<exported file>.json`` beside an exported image.

Export writes one; import reads one when it sits beside the file (or URL), using
its fields as defaults (flags win) and its size and digest as checks. A sidecar
is as untrusted as the image: it is size-capped, strictly typed, and a size it
claims is checked against the image actually read. Its ``format`` and
``compression`` are statements, not hints: import uses them instead of guessing
from the content, so a raw disk that begins with a qcow2 header (or gzip's magic)
comes back as the raw disk it was exported from.
"""

from __future__ import annotations

import json
from dataclasses import asdict, field
from typing import Any

from bbsnap.lazy_dataclass import dataclass
from bbsnap.transfer.compression import Compression
from bbsnap.disks.formats import FORMATS
from bbsnap.errors import InvalidInputError

SUFFIX = ".json"
FORMAT_VERSION = 1
MAX_BYTES = 64 * 1024
DISK_FORMATS = FORMATS
COMPRESSIONS = tuple(kind.value for kind in Compression)


@dataclass(frozen=True)
class Sidecar:
    name: str
    virtual_size: int
    arch: str = "x86_64"
    description: str = ""
    username: str | None = None
    min_ram: int | None = None
    firmware: str = "bios"              # how the disk boots: "bios" or "uefi"
    # Of the disk inside the (compressed) file, and how it is compressed; None: not stated
    # (import then recognises them by content).
    format: str | None = None
    compression: str | None = None
    sha256: str | None = None           # of the exported file as written
    source: dict[str, str] = field(default_factory=dict)  # image id, type, server ... it came from


def to_json(sidecar: Sidecar) -> str:
    return json.dumps({"bbsnap_sidecar": FORMAT_VERSION, **asdict(sidecar)}, indent=2,
                      sort_keys=True) + "\n"


def parse(data: bytes) -> Sidecar:
    if len(data) > MAX_BYTES:
        raise InvalidInputError("the metadata sidecar is larger than 64 KiB")
    try:
        raw = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidInputError(f"the metadata sidecar is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict) or raw.get("bbsnap_sidecar") != FORMAT_VERSION:
        raise InvalidInputError("the metadata sidecar is not a bbsnap sidecar (version 1)")
    return Sidecar(
        name=_typed(raw, "name", str, required=True),
        virtual_size=_typed(raw, "virtual_size", int, required=True),
        arch=_typed(raw, "arch", str) or "x86_64",
        description=_typed(raw, "description", str) or "",
        username=_typed(raw, "username", str),
        min_ram=_typed(raw, "min_ram", int),
        firmware=_typed(raw, "firmware", str) or "bios",
        format=_choice(raw, "format", DISK_FORMATS),
        compression=_choice(raw, "compression", COMPRESSIONS),
        sha256=_typed(raw, "sha256", str),
        source={str(k): str(v) for k, v in (_typed(raw, "source", dict) or {}).items()},
    )


def _typed(raw: dict[str, Any], key: str, kind: type, required: bool = False) -> Any:
    value = raw.get(key)
    if value is None:
        if required:
            raise InvalidInputError(f"the metadata sidecar has no '{key}'")
        return None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise InvalidInputError(f"the metadata sidecar's '{key}' is not a {kind.__name__}")
    return value


def _choice(raw: dict[str, Any], key: str, choices: tuple[str, ...]) -> str | None:
    value = _typed(raw, key, str)
    if value is not None and value not in choices:
        raise InvalidInputError(f"the metadata sidecar's '{key}' is {value!r}, not one of "
                                f"{', '.join(choices)}")
    return value  # type: ignore[no-any-return]
