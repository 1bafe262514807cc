"""Checksum lists (SHA256SUMS): the digest a publisher lists for one file name.

Two layouts are in use: GNU coreutils (``HEX  name``, or ``HEX *name`` for binary
mode; Debian, Ubuntu, bbsnap's own export) and BSD / ``shasum --tag``
(``SHA256 (name) = HEX``; Fedora's CHECKSUM). Every other line (PGP armour,
comments, other algorithms) is skipped. A name listed twice with different
digests is refused rather than guessed at.
"""

from __future__ import annotations

import re

from bbsnap.errors import InvalidInputError, UsageError

MAX_BYTES = 1024 * 1024  # a SHA256SUMS for a whole release is a few KiB
_GNU = re.compile(r"^([0-9a-fA-F]{64}) [ *](.+)$")
_BSD = re.compile(r"^SHA256 ?\((.+)\) ?= ?([0-9a-fA-F]{64})$")
_DIGEST = re.compile(r"^(sha256:)?([0-9a-fA-F]{64})$")  # the one digest syntax


def parse_line(line: str) -> tuple[str, str] | None:
    """(lowercase hex digest, file name) of one SHA-256 line, or None."""
    line = line.rstrip("\r\n")
    if match := _GNU.match(line):
        return match.group(1).lower(), match.group(2)
    if match := _BSD.match(line):
        return match.group(2).lower(), match.group(1)
    return None


def lookup(text: str, file_name: str, label: str) -> str:
    """The digest *text* lists for *file_name*; InvalidInputError if none or conflicting."""
    digests = {digest for digest, name in filter(None, map(parse_line, text.splitlines()))
               if _same_file(name, file_name)}
    if not digests:
        raise InvalidInputError(f"{file_name} is not listed in the checksum file {label}",
                                hint="check the file name and that it is a SHA-256 list")
    if len(digests) > 1:
        raise InvalidInputError(f"the checksum file {label} lists {file_name} with "
                                f"{len(digests)} different SHA-256 digests")
    return digests.pop()


def _same_file(listed: str, file_name: str) -> bool:
    # "./name" is how `sha256sum ./*` writes names; other paths are other files.
    return listed.removeprefix("./") == file_name


def normalise(text: str, label: str) -> str:
    """``HEX`` or ``sha256:HEX`` (a sidecar's digest) -> lowercase hex."""
    match = _DIGEST.match(text.strip())
    if not match:
        raise InvalidInputError(f"{label} has a sha256 that is not 64 hex digits")
    return match.group(2).lower()


def parse_option(text: str) -> str:
    """``--checksum sha256:HEX`` (the algorithm named: the only one accepted) -> lowercase hex."""
    match = _DIGEST.match(text.strip())
    if not match or not match.group(1):
        raise UsageError(f"'{text}' is not a checksum", hint="use sha256:<64 hex digits>")
    return match.group(2).lower()
