"""Dynamically linked binaries from Debian packages, with the shared libraries
they need, copied into the initramfs.

The libraries come from the packages the binary's package depends on, followed
only as far as an unresolved ``DT_NEEDED`` requires, rather than from the host's
/lib: the image then depends on the package versions alone, not on what this
host has installed. One :class:`LibraryPool` is shared by every binary of a
build, so a library package several binaries need (libc6) is fetched once.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import field
from pathlib import Path

from bbsnap.errors import BbsnapError
from bbsnap.lazy_dataclass import dataclass
from bbsnap.tinyguest.debpkg import Package, fetch
from bbsnap.tinyguest.elf import elf_dynamic
from bbsnap.tinyguest.initramfs import Initramfs

LIB_DIRS = ("lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu", "lib64", "lib", "usr/lib")
GUEST_LIB_DIR = "lib/x86_64-linux-gnu"
# Each round fetches one more layer of dependencies; the cap stops a walk that
# never converges (a soname no dependency provides under the expected name).
MAX_LIB_ROUNDS = 6

# {soname: (file in an extracted package, that package's name)}
_Found = dict[str, tuple[Path, str]]


@dataclass
class LibraryPool:
    """Extracted packages libraries are looked up in; grows as dependencies are fetched."""

    work: Path
    say: Callable[[str], None]
    packages: dict[str, Package] = field(default_factory=dict)


def add_binary(initramfs: Initramfs, package: Package, candidates: tuple[str, ...],
               dest: str, pool: LibraryPool) -> dict[str, str]:
    """Add the first of *candidates* from *package* at *dest*, with its ELF
    interpreter and libraries; return {soname: package=version}."""
    binary = package.find_one(candidates)
    name = Path(dest).name
    pool.packages.setdefault(package.name, package)
    for _round in range(MAX_LIB_ROUNDS):
        found, missing = _resolve_libraries(binary, package.name, pool.packages)
        if not missing:
            break
        wanted = _packages_to_fetch(missing, pool.packages)
        if not wanted:
            raise BbsnapError(f"{name} needs libraries no dependency provides: "
                              + ", ".join(sorted(missing)))
        pool.say(f"fetching {name} dependencies: " + ", ".join(wanted))
        for fetched in fetch(wanted, pool.work):
            pool.packages[fetched.name] = fetched
    else:
        raise BbsnapError(f"could not resolve {name}'s libraries: " + ", ".join(sorted(missing)))
    initramfs.add(dest, binary.read_bytes(), 0o755)
    interp = elf_dynamic(binary)[1]
    libs = {}
    for soname, (path, owner) in sorted(found.items()):
        # The interpreter must sit at the exact path baked into the binary.
        lib_dest = interp.lstrip("/") if interp and Path(interp).name == soname \
            else f"{GUEST_LIB_DIR}/{soname}"
        initramfs.add(lib_dest, path.read_bytes(), 0o755)
        libs[soname] = f"{owner}={pool.packages[owner].version}"
    return libs


def _packages_to_fetch(missing: dict[str, str], packages: dict[str, Package]) -> list[str]:
    """Dependencies of the needers that may provide the *missing* sonames.

    Debian names library packages after the soname (libpcre2-8.so.0 ->
    libpcre2-8-0); when that name is among the needer's Depends only it is
    fetched, otherwise all of the needer's Depends are (libglib-2.0.so.0 lives
    in libglib2.0-0, libm.so.6 in libc6).
    """
    wanted: set[str] = set()
    for soname, needer in missing.items():
        depends = [dep for dep in packages[needer].depends if dep not in packages]
        guess = _package_for_soname(soname)
        wanted.update([guess] if guess in depends else depends)
    return sorted(wanted)


def _package_for_soname(soname: str) -> str:
    stem, _, version = soname.partition(".so.")
    return f"{stem}-{version}" if stem[-1:].isdigit() else f"{stem}{version}"


def _resolve_libraries(binary: Path, owner: str, packages: dict[str, Package]
                       ) -> tuple[_Found, dict[str, str]]:
    """Walk DT_NEEDED from *binary*: ({soname: (file, package)}, {missing soname: needer})."""
    found: _Found = {}
    missing: dict[str, str] = {}
    needed, interp = elf_dynamic(binary)
    queue = [(soname, owner) for soname in needed]
    if interp:
        queue.append((Path(interp).name, owner))
    while queue:
        soname, needer = queue.pop()
        if soname in found or soname in missing:
            continue
        hit = _find_library(soname, packages)
        if hit is None:
            missing[soname] = needer
            continue
        found[soname] = hit
        queue.extend((dep, hit[1]) for dep in elf_dynamic(hit[0])[0])
    return found, missing


def _find_library(soname: str, packages: dict[str, Package]) -> tuple[Path, str] | None:
    for package in packages.values():
        for libdir in LIB_DIRS:
            real = _resolve_in_root(package.root, f"{libdir}/{soname}")
            if real is not None and real.is_file():
                return real, package.name
    return None


def _resolve_in_root(root: Path, rel: str, depth: int = 0) -> Path | None:
    """Follow symlinks of an extracted tree without escaping to the host's files."""
    path = root / rel
    if depth > 16 or not (path.is_symlink() or path.exists()):
        return None
    if not path.is_symlink():
        return path
    target = os.readlink(path)
    if target.startswith("/"):
        return _resolve_in_root(root, target.lstrip("/"), depth + 1)
    return _resolve_in_root(root, os.path.normpath(str(Path(rel).parent / target)), depth + 1)
