"""The tiny real test guest: Debian's cloud kernel + busybox + qemu-ga + dropbear
on a BIOS-bootable qcow2, built from Debian packages and cached per machine.

Its /init (``init.sh``) prints protocol lines on the serial console (ttyS0) that
tests wait for, and keeps an ever-increasing counter in one disk sector
(:data:`COUNTER_OFFSET`) that :func:`read_counter` reads from the host. With a
cloud-init seed whose user-data lists ``ssh_authorized_keys``, root can log in
over SSH on port 22 with those keys.
"""

from __future__ import annotations

from bbsnap.tinyguest.build import build_tiny_guest, image_path
from bbsnap.tinyguest.cache import default_cache_dir
from bbsnap.tinyguest.counter import (
    COUNTER_OFFSET,
    decode_counter_sector,
    encode_counter_sector,
    read_counter,
    read_disk_bytes,
)

# Serial console lines printed by init.sh (keep in step with it).
READY_LINE = "BBSNAP-TINY-READY"
COUNTER_PREFIX = "BBSNAP-COUNTER "
MEMCOUNTER_PREFIX = "BBSNAP-MEMCOUNTER "  # the in-memory counter (memory-state reverts)
SEED_PREFIX = "BBSNAP-SEED "
SEED_NONE_LINE = "BBSNAP-SEED none"
# Followed by "sha256=<hex>" of the seed's user-data file, as the guest read it.
USERDATA_PREFIX = "BBSNAP-USERDATA "
AGENT_STARTED_LINE = "BBSNAP-AGENT started"
AGENT_NONE_LINE = "BBSNAP-AGENT none"
NET_PREFIX = "BBSNAP-NET "
# Printed before READY_LINE: dropbear is listening on port 22, or there were no
# keys in the seed's user-data (or no dropbear) and nothing listens.
SSH_STARTED_LINE = "BBSNAP-SSH started"
SSH_NONE_LINE = "BBSNAP-SSH none"
WARN_PREFIX = "BBSNAP-WARN "
POWEROFF_LINE = "BBSNAP-POWEROFF"
REBOOT_LINE = "BBSNAP-REBOOT"
# The name qemu-ga's virtio-serial port must have.
AGENT_PORT_NAME = "org.qemu.guest_agent.0"

__all__ = [
    "AGENT_NONE_LINE", "AGENT_PORT_NAME", "AGENT_STARTED_LINE", "COUNTER_OFFSET",
    "COUNTER_PREFIX", "MEMCOUNTER_PREFIX", "NET_PREFIX", "POWEROFF_LINE", "READY_LINE",
    "REBOOT_LINE", "SEED_NONE_LINE",
    "SEED_PREFIX", "SSH_NONE_LINE", "SSH_STARTED_LINE", "USERDATA_PREFIX", "WARN_PREFIX",
    "build_tiny_guest", "decode_counter_sector", "default_cache_dir",
    "encode_counter_sector", "image_path", "read_counter", "read_disk_bytes",
]
