#!/usr/bin/env bash
# bbsnap's main job, end to end, on the built-in tiny guest — the seed's walkthrough:
#   1. build the tiny guest image (Debian kernel + busybox + qemu-ga; cached after the first run)
#      and import it into the image catalogue;
#   2. boot a server from it;
#   3. snapshot the running server (instant; the copy finishes in the background);
#   4. list the catalogue, show the snapshot image;
#   5. boot a clone from the snapshot: new id, MAC and IP, the same disk;
#   6. export the snapshot for download: the raw disk, gzip-compressed, with .sha256 and .json
#      (into a new mktemp -d directory; the files are private, 0600);
#   7. clean up the servers (the images stay in the catalogue).
# Uses the default data directory (/var/lib/bbsnap for root, ~/.local/share/bbsnap for other
# users) and connection (bbsnap doctor shows which) unless BBSNAP_HOME / -c say otherwise.
# BBSNAP_TINY_GUEST=FILE uses that tiny guest image instead of building one.
set -euo pipefail

step() { printf '\n$ %s\n' "$*" >&2; }
wait_for() {  # SERVER TEXT: until the server's console shows TEXT (the guest is up)
  for _ in $(seq 1 600); do
    if bbsnap servers console "$1" 2>/dev/null | grep -aq "$2"; then return 0; fi
    sleep 0.5
  done
  echo "walkthrough: $1 did not print $2" >&2; exit 1
}
export BBSNAP_ACCEL="${BBSNAP_ACCEL:-auto}"
# The interpreter bbsnap is installed in: this python3, else the all-users one (scripts/setup).
py="${BBSNAP_PYTHON:-python3}"
"$py" -c 'import bbsnap' 2>/dev/null || py=/opt/bbsnap/bin/python3

step "bbsnap doctor --fix   (which connection; lets QEMU's user reach the data directory)"
bbsnap doctor --fix || echo "walkthrough: doctor reports problems (above); going on" >&2

if [ -n "${BBSNAP_TINY_GUEST:-}" ]; then
  guest="$BBSNAP_TINY_GUEST"
else
  step "$py -m bbsnap.tinyguest build"
  guest=$("$py" -m bbsnap.tinyguest build)
fi
echo "$guest"

step "bbsnap images import $guest --name 'Tiny test guest' --username root --min-ram 128"
image=$(bbsnap images import "$guest" --name "Tiny test guest" --username root --min-ram 128 \
        --description "bbsnap's built-in test guest: busybox, qemu-ga, a disk counter")
echo "$image"

step "bbsnap servers create -n 'my server' --memory 128 $image"
server=$(bbsnap servers create -n "my server" --memory 128 "$image" -s | cut -f1)
bbsnap servers show "$server"
wait_for "$server" BBSNAP-TINY-READY

step "bbsnap servers snapshot $server"
snapshot=$(bbsnap servers snapshot "$server")
echo "$snapshot"

step "bbsnap images list"
bbsnap images list

step "bbsnap images show $snapshot   (after the background copy finished)"
for _ in $(seq 1 600); do
  state=$(bbsnap images show "$snapshot" --format json | "$py" -c 'import json,sys; print(json.load(sys.stdin)["state"])')
  [ "$state" != creating ] && break
  sleep 0.2
done
bbsnap images show "$snapshot"

step "bbsnap servers create -n myclone --memory 128 $snapshot"
clone=$(bbsnap servers create -n myclone --memory 128 "$snapshot" -s | cut -f1)
wait_for "$clone" BBSNAP-TINY-READY
bbsnap servers list
echo >&2
echo "the clone's console shows the seed it got and where its disk counter started:" >&2
bbsnap servers console "$clone" | grep -a -E 'BBSNAP-(SEED|COUNTER)' | head -2

# A new private directory each run (mktemp -d: 0700, unpredictable name): a fixed name in a
# shared /tmp is one another user can create first and fill with symlinks.
out=$(mktemp -d "${TMPDIR:-/tmp}/bbsnap-walkthrough.XXXXXXXX")
step "bbsnap images export $snapshot -o $out/$snapshot.gz"
bbsnap images export "$snapshot" -o "$out/$snapshot.gz"
ls -l "$out/$snapshot.gz"*
(cd "$out" && sha256sum -c "$snapshot.gz.sha256")
echo "the export stays in $out (remove it with: rm -r $out)" >&2

step "bbsnap servers destroy $clone $server"
bbsnap servers destroy "$clone" "$server"

# Commands typed at a terminal start a command server for the next ones (README: `bbsnap
# command-server`); say so, since it outlives the walkthrough.
if bbsnap command-server status >/dev/null 2>&1; then
  echo "a command server these commands started keeps later ones fast; it ends after 15 minutes" \
       "without a command (bbsnap command-server stop ends it now)" >&2
fi
