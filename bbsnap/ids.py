"""Generation and validation of bbsnap ids: ``srv-xxxxx``, ``img-xxxxx``, ``typ-xxxxx``.

Five lowercase base-36 characters, as the seed's cloud shows them. Validation is
strict so that an id can never smuggle a path separator or XML into anything.
"""

from __future__ import annotations

import re
from typing import Callable

from bbsnap.errors import ConflictError, UsageError

ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz"
ID_LENGTH = 5
PREFIXES = ("srv", "img", "typ")
_PATTERN = re.compile(r"^(srv|img|typ)-[0-9a-z]{5}$")


def new_id(prefix: str) -> str:
    """A fresh random id with *prefix* (collisions are checked by the store that keeps it)."""
    if prefix not in PREFIXES:
        raise ValueError(f"unknown id prefix {prefix!r}")
    import secrets  # here: it loads OpenSSL (~5 ms), which commands that only read never need

    return prefix + "-" + "".join(secrets.choice(ALPHABET) for _ in range(ID_LENGTH))


def allocate(prefix: str, claim: Callable[[str], bool], attempts: int = 50) -> str:
    """A fresh id with *prefix* that *claim* accepted (it returns False for an id already
    taken, and may take it atomically, as an INSERT does). 36^5 ids: a collision is rare,
    fifty in a row means something else is wrong."""
    for _ in range(attempts):
        candidate = new_id(prefix)
        if claim(candidate):
            return candidate
    raise ConflictError(f"could not allocate a free {prefix} id after {attempts} attempts",
                        hint="'bbsnap doctor' checks the catalogue")


def is_valid(value: str, prefix: str | None = None) -> bool:
    match = _PATTERN.fullmatch(value)
    return match is not None and (prefix is None or match.group(1) == prefix)


def require(value: str, prefix: str) -> str:
    """*value* if it is a well-formed id with *prefix*, else a UsageError saying what one looks like."""
    if not is_valid(value, prefix):
        raise UsageError(f"'{value}' is not a valid {prefix} id",
                         hint=f"ids look like {prefix}-a1b2c")
    return value
