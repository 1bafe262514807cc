#!/usr/bin/env bash
# bbsnap's main job, end to end, on the built-in tiny guest:
#   1. build the tiny guest image (Debian kernel + busybox + qemu-ga, BIOS-bootable qcow2;
#      cached after the first run),
#   2. import it into the image catalogue (format and compression recognised by content),
#   3. list the catalogue and show the new image.
# Uses the default data directory (/var/lib/bbsnap for root) unless BBSNAP_HOME is set.
set -euo pipefail

step() { printf '\n$ %s\n' "$*" >&2; }

step "python3 -m bbsnap.tinyguest build"
guest=$(python3 -m bbsnap.tinyguest build)
echo "$guest"

step "bbsnap images import $guest --name 'Tiny test guest' --username root --min-ram 128"
image=$(bbsnap images import "$guest" --name "Tiny test guest" --username root --min-ram 128 \
        --description "bbsnap's built-in test guest: busybox, qemu-ga, a disk counter")
echo "$image"

step "bbsnap images list"
bbsnap images list

step "bbsnap images show $image"
bbsnap images show "$image"
