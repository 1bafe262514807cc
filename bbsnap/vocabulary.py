"""The words the CLI offers and the services accept, defined once.

Only ``enum`` is imported here, so the CLI can build its ``--help`` choices from these
without loading the services. The values are what users type and what the catalogue and
sidecars store; the members are ``str`` so they compare equal to those strings.
"""

from __future__ import annotations

import enum


class Firmware(str, enum.Enum):
    BIOS = "bios"
    UEFI = "uefi"


class Accel(str, enum.Enum):
    AUTO = "auto"   # KVM when bbsnap's probe finds it usable, else TCG
    KVM = "kvm"
    TCG = "tcg"


class DiskFormat(str, enum.Enum):
    """What a user or a sidecar may state of a disk file, and what export writes."""

    RAW = "raw"
    QCOW2 = "qcow2"


class ExportCompression(str, enum.Enum):
    GZIP = "gzip"
    ZSTD = "zstd"
    XZ = "xz"
    NONE = "none"


# -- the catalogue's words (bbsnap.models uses them for its fields) ------------------------

class ImageType(str, enum.Enum):
    SNAPSHOT = "snapshot"   # taken from a server
    UPLOAD = "upload"       # imported from a file, stdin or URL
    OFFICIAL = "official"   # reserved for images the user marks as such


class ImageStatus(str, enum.Enum):
    CREATING = "creating"
    AVAILABLE = "available"
    FAILED = "failed"
    DELETED = "deleted"


class Visibility(str, enum.Enum):
    PRIVATE = "private"
    PUBLIC = "public"


class Consistency(str, enum.Enum):
    QUIESCED = "quiesced"
    CRASH_CONSISTENT = "crash-consistent"


class DependentKind(str, enum.Enum):
    IMAGE = "image"    # an image file whose backing file is another image
    SERVER = "server"  # a server disk overlay on an image


def values(vocabulary: type[enum.Enum]) -> tuple[str, ...]:
    """The words of *vocabulary*, in definition order (the first is the default where one is)."""
    return tuple(str(member.value) for member in vocabulary)

