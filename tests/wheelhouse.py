"""Wheels of distributions already installed, for installs that must not reach an index.

A test of a user's own install (pipx) must stay off the network, so the dependencies
bbsnap takes from PyPI are repacked from the all-users install (/opt/bbsnap, made by
scripts/setup from the same requirements): each installed distribution's files, as its
RECORD lists them, with its dist-info (whose WHEEL file keeps the original tags). Files
installed outside site-packages (scripts, man pages: RECORD paths with "..") are left out.
"""

from __future__ import annotations

import zipfile
from pathlib import Path


def repack(site_packages: Path, names: list[str], out: Path) -> list[Path]:
    """One wheel per distribution *names* (as their dist-info directories begin) into *out*."""
    out.mkdir(parents=True, exist_ok=True)
    made = []
    for name in names:
        (info,) = [p for p in site_packages.glob("*.dist-info")
                   if p.name.lower().startswith(name.lower() + "-")]
        dist, version = info.name[:-len(".dist-info")].rsplit("-", 1)
        tag = next(line.split(":", 1)[1].strip() for line in
                   (info / "WHEEL").read_text().splitlines() if line.startswith("Tag:"))
        wheel = out / f"{dist}-{version}-{tag}.whl"
        kept = []
        with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as archive:
            for line in (info / "RECORD").read_text().splitlines():
                path = line.rsplit(",", 2)[0]
                if (not path or path.startswith("..") or "__pycache__" in path
                        or path.endswith(("/RECORD", "/INSTALLER"))):
                    continue
                archive.write(site_packages / path, path)
                kept.append(f"{path},,")
            archive.writestr(f"{info.name}/RECORD", "\n".join([*kept, f"{info.name}/RECORD,,"]))
        made.append(wheel)
    return made
