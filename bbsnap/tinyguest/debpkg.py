"""Debian packages without installing them: ``apt-cache show``, ``apt-get
download`` and ``dpkg-deb -x`` into a private directory.

Nothing here knows what the tiny guest is made of; :mod:`.versions` picks the
packages and :mod:`.build` decides what to do with their files.
"""

from __future__ import annotations

import os
from pathlib import Path

from bbsnap.errors import BbsnapError, ExternalCommandError, NotFoundError
from bbsnap.lazy_dataclass import dataclass
from bbsnap.proc import run, which


@dataclass
class Package:
    """One downloaded and extracted package."""

    name: str
    version: str
    root: Path            # where its files were extracted
    depends: list[str]    # names from Depends + Pre-Depends (first alternatives)

    def find_one(self, candidates: tuple[str, ...]) -> Path:
        """The first of *candidates* (paths relative to the package root) that exists.

        Several are allowed because Debian moves binaries between /bin, /usr/bin
        and /sbin across releases.
        """
        for rel in candidates:
            if (self.root / rel).is_file():
                return self.root / rel
        raise BbsnapError(f"none of {', '.join(candidates)} in the extracted package "
                          f"at {self.root}")


def apt_show(packages: list[str]) -> dict[str, dict[str, str]]:
    """Candidate control fields of *packages*, by name (one apt-cache run)."""
    result = run([which("apt-cache"), "show", "--no-all-versions", *packages],
                 timeout=120, check=False)
    shown = {fields.get("Package", ""): fields for fields in control_stanzas(result.stdout)}
    missing = [name for name in packages if name not in shown]
    if missing:
        raise NotFoundError(f"Debian package(s) {', '.join(missing)} not known to apt",
                            hint="run apt-get update (the tiny guest is built from "
                                 "Debian 12 packages)")
    return shown


def control_stanzas(text: str) -> list[dict[str, str]]:
    """Control-file text as one {field: value} per stanza (continuations joined)."""
    stanzas: list[dict[str, str]] = []
    fields: dict[str, str] = {}
    last = ""
    for line in text.splitlines() + [""]:
        if not line.strip():
            if fields:
                stanzas.append(fields)
            fields, last = {}, ""
        elif line[0] in " \t" and last:
            fields[last] += " " + line.strip()
        elif ":" in line:
            last, _, value = line.partition(":")
            fields[last] = value.strip()
    return stanzas


def dependency_names(depends: str) -> list[str]:
    """Package names of a Depends field (first alternative, no versions/arch)."""
    names = []
    for clause in depends.split(","):
        first = clause.split("|")[0].strip()
        name = first.split(" ")[0].split("(")[0].split(":")[0].strip()
        if name:
            names.append(name)
    return names


def fetch(specs: list[str], work: Path) -> list[Package]:
    """Download *specs* (``name`` or ``name=version``) and extract each under *work*."""
    packages = []
    for deb in _download(specs, work / "debs"):
        root = work / "pkgs" / deb.name.split("_")[0]
        control = _extract(deb, root)
        packages.append(Package(control["Package"], control["Version"], root,
                                dependency_names(control.get("Depends", "")
                                                 + "," + control.get("Pre-Depends", ""))))
    return packages


def _download(specs: list[str], dest: Path) -> list[Path]:
    """``apt-get download`` *specs* into *dest*; return the new .deb files."""
    dest.mkdir(parents=True, exist_ok=True)
    before = set(dest.glob("*.deb"))
    argv = [which("apt-get"), "download", "-q"]
    if os.geteuid() == 0:
        # apt drops to user _apt, which cannot write our private temp dir.
        argv += ["-o", "APT::Sandbox::User=root"]
    try:
        run(argv + specs, timeout=900, cwd=dest)
    except ExternalCommandError as exc:
        exc.hint = "the tiny guest needs Debian 12 packages: check apt sources / apt-get update"
        raise
    return sorted(set(dest.glob("*.deb")) - before)


def _extract(deb: Path, root: Path) -> dict[str, str]:
    """Unpack *deb* under *root*; return its control fields."""
    root.mkdir(parents=True, exist_ok=True)
    run([which("dpkg-deb"), "-x", str(deb), str(root)], timeout=300)
    stanzas = control_stanzas(run([which("dpkg-deb"), "-f", str(deb)], timeout=60).stdout)
    if not stanzas:
        raise BbsnapError(f"{deb.name} has no control fields")
    return stanzas[0]
