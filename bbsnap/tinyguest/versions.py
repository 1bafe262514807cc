"""Which Debian packages, at which exact versions, the tiny guest is built from.

The versions are part of the cache key, so they are resolved before anything
is downloaded: a changed candidate version means a new image.
"""

from __future__ import annotations

import functools
import re

from bbsnap.errors import BbsnapError
from bbsnap.tinyguest.debpkg import apt_show, dependency_names

KERNEL_METAPACKAGE = "linux-image-cloud-amd64"
BUSYBOX_PACKAGE = "busybox-static"
AGENT_PACKAGE = "qemu-guest-agent"
SSH_PACKAGE = "dropbear-bin"      # the dropbear server, without Debian's init scripts


def resolve_versions() -> dict[str, str]:
    """Exact candidate versions of the real packages the image is built from.

    Memoised per process: without apt's binary cache every apt-cache run parses
    all package lists (~0.5 s here), and the lists do not change under us.
    """
    return dict(_resolve_versions_once())


@functools.lru_cache(maxsize=1)
def _resolve_versions_once() -> tuple[tuple[str, str], ...]:
    shown = apt_show([KERNEL_METAPACKAGE, BUSYBOX_PACKAGE, AGENT_PACKAGE, SSH_PACKAGE])
    # The metapackage only points at the real, versioned kernel package; pin that
    # one, so a kernel update changes the key even if the metapackage did not.
    kernel_pkg = _kernel_package(shown[KERNEL_METAPACKAGE].get("Depends", ""))
    shown.update(apt_show([kernel_pkg]))
    return tuple((name, _version(shown[name], name))
                 for name in (kernel_pkg, BUSYBOX_PACKAGE, AGENT_PACKAGE, SSH_PACKAGE))


def _version(fields: dict[str, str], package: str) -> str:
    version = fields.get("Version")
    if not version:
        raise BbsnapError(f"apt shows no version for '{package}'")
    return version


def _kernel_package(depends: str) -> str:
    """The versioned linux-image-*-cloud-amd64 the metapackage depends on."""
    for name in dependency_names(depends):
        if re.fullmatch(r"linux-image-[0-9].*-cloud-amd64", name):
            return name
    raise BbsnapError(f"cannot find the kernel package behind {KERNEL_METAPACKAGE}",
                      hint=f"its Depends are: {depends or 'empty'}")
