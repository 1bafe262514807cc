"""Build the tiny real test guest: a BIOS-bootable qcow2 made from Debian packages.

Everything comes from ``apt-get download`` + ``dpkg-deb -x`` into a throw-away
work directory (nothing is installed on the host): Debian's cloud kernel, a
static busybox, ``qemu-ga`` and the ``dropbear`` SSH server with their shared
libraries. This module only orchestrates; the steps live in their own modules:

* :mod:`.versions` / :mod:`.debpkg` -- which packages, and fetching them;
* :mod:`.kernel` -- vmlinuz and the kernel modules /init loads;
* :mod:`.binaries` (with :mod:`.elf`) -- a binary plus the libraries it needs;
* :mod:`.agent` -- qemu-ga; :mod:`.ssh` -- dropbear and the files a login needs;
* :mod:`.logins` -- the login user and the utmp file the agent reports;
* :mod:`.initramfs` -- the newc cpio archive;
* :mod:`.bootdisk` -- the partitioned, syslinux-bootable qcow2;
* :mod:`.cache` -- where images live, locking and publishing.

The result is cached per machine under a key that hashes /init, the exact
package versions and :data:`BUILDER_VERSION`; a build happens in a temp
directory that is renamed into place, so a killed build leaves no half image.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import tempfile
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path

from bbsnap.tinyguest.agent import add_agent
from bbsnap.tinyguest.binaries import LibraryPool
from bbsnap.tinyguest.bootdisk import KERNEL_CMDLINE, make_boot_disk
from bbsnap.tinyguest.cache import (
    build_lock,
    guest_root,
    make_shared_dir,
    publish,
    remove_stale_work_dirs,
)
from bbsnap.tinyguest.counter import COUNTER_SECTOR
from bbsnap.tinyguest.debpkg import Package, fetch
from bbsnap.tinyguest.initramfs import Initramfs, cpio_newc
from bbsnap.tinyguest.kernel import add_kernel_modules
from bbsnap.tinyguest.logins import add_logins
from bbsnap.tinyguest.ssh import add_ssh
from bbsnap.tinyguest.versions import AGENT_PACKAGE, BUSYBOX_PACKAGE, SSH_PACKAGE, resolve_versions

# Bump whenever the image would come out different for the same inputs (the
# code is not part of the cache key, so a behaviour change needs this).
BUILDER_VERSION = 4   # 2: dropbear, login files, devpts; 3: boots under UEFI too;
# 4: a login user and a utmp file its agent reports (logins.py)

IMAGE_NAME = "tiny-guest.qcow2"
MANIFEST_NAME = "manifest.json"

Progress = Callable[[str], None]


def init_script() -> bytes:
    return resources.files(__package__).joinpath("init.sh").read_bytes()


def cache_key(versions: dict[str, str]) -> str:
    blob = json.dumps({"builder": BUILDER_VERSION,
                       "init": hashlib.sha256(init_script()).hexdigest(),
                       "packages": versions}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def image_path(cache_dir: Path | None = None, versions: dict[str, str] | None = None) -> Path:
    """Where the image for the current package versions is (or would be) cached."""
    versions = versions if versions is not None else resolve_versions()
    return guest_root(cache_dir) / cache_key(versions) / IMAGE_NAME


def build_tiny_guest(cache_dir: Path | None = None, *, force: bool = False,
                     progress: Progress | None = None) -> Path:
    """Path of the cached tiny guest qcow2, building it first when needed."""
    say = progress or (lambda _msg: None)
    versions = resolve_versions()
    final = image_path(cache_dir, versions)
    if final.exists() and not force:
        return final
    root = final.parent.parent
    make_shared_dir(root)
    with build_lock(root):
        # Another process may have finished the same build while we waited.
        if final.exists() and not force:
            return final
        remove_stale_work_dirs(root)
        work = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
        try:
            _build_into(work / "out", work, versions, say)
            publish(work / "out", final.parent)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    say(f"tiny guest ready: {final}")
    return final


def _build_into(out: Path, work: Path, versions: dict[str, str], say: Progress) -> None:
    """Build the image and its manifest into the new directory *out*."""
    started = time.monotonic()
    out.mkdir()
    say("downloading " + ", ".join(f"{n} {v}" for n, v in versions.items()))
    fetched = {p.name: p for p in fetch([f"{n}={v}" for n, v in versions.items()], work)}
    kernel_pkg = next(p for n, p in fetched.items() if n.startswith("linux-image-"))
    initramfs = Initramfs()
    initramfs.add("init", init_script(), 0o755)
    initramfs.chardevs["dev/console"] = (5, 1)   # the kernel opens it before /init runs
    _add_busybox(initramfs, fetched[BUSYBOX_PACKAGE])
    say("resolving kernel modules")
    release, vmlinuz, modules = add_kernel_modules(initramfs, kernel_pkg)
    pool = LibraryPool(work, say)
    say("resolving qemu-ga libraries")
    agent_libs = add_agent(initramfs, fetched[AGENT_PACKAGE], pool)
    say("resolving dropbear libraries")
    ssh_libs = add_ssh(initramfs, fetched[SSH_PACKAGE], pool)
    add_logins(initramfs)
    initramfs.add("etc/bbsnap-tiny.conf", _guest_config(release, modules["load_order"]))
    say("writing initramfs")
    initrd = work / "initrd.gz"
    # mtime=0 keeps the initramfs byte-identical across builds of the same inputs.
    initrd.write_bytes(gzip.compress(cpio_newc(initramfs), compresslevel=9, mtime=0))
    say("making the boot disk")
    make_boot_disk(work, vmlinuz, initrd, out / IMAGE_NAME)
    manifest = {"builder_version": BUILDER_VERSION, "cache_key": cache_key(versions),
                "packages": versions, "kernel_release": release, "modules": modules,
                "agent_libraries": agent_libs, "ssh_libraries": ssh_libs,
                "initramfs_paths": initramfs.paths(), "kernel_cmdline": KERNEL_CMDLINE,
                "build_seconds": round(time.monotonic() - started, 1)}
    (out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def _guest_config(release: str, load_order: list[str]) -> bytes:
    """/etc/bbsnap-tiny.conf, sourced by init.sh: what it cannot find out itself."""
    lines = [f"KERNEL_RELEASE='{release}'",
             f"COUNTER_SECTOR={COUNTER_SECTOR}",
             "MODULES='" + " ".join(load_order) + "'"]
    return ("\n".join(lines) + "\n").encode()


def _add_busybox(initramfs: Initramfs, package: Package) -> None:
    binary = package.find_one(("bin/busybox", "usr/bin/busybox"))
    initramfs.add("bin/busybox", binary.read_bytes(), 0o755)
    initramfs.symlinks["bin/sh"] = "busybox"   # the rest are made by --install at boot
