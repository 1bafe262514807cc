"""qemu-ga, from Debian's qemu-guest-agent, with the shared libraries it needs.

init.sh starts it on the virtio-serial port named ``org.qemu.guest_agent.0``.
"""

from __future__ import annotations

from bbsnap.tinyguest.binaries import LibraryPool, add_binary
from bbsnap.tinyguest.debpkg import Package
from bbsnap.tinyguest.initramfs import Initramfs

AGENT_DEST = "usr/sbin/qemu-ga"


def add_agent(initramfs: Initramfs, agent: Package, pool: LibraryPool) -> dict[str, str]:
    """Add qemu-ga, its ELF interpreter and libraries; return {soname: package=version}."""
    return add_binary(initramfs, agent, ("usr/sbin/qemu-ga", "usr/bin/qemu-ga", "sbin/qemu-ga"),
                      AGENT_DEST, pool)
