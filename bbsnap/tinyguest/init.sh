#!/bin/busybox sh
# /init of bbsnap's tiny test guest (busybox sh, runs as PID 1 from the initramfs).
#
# Lines starting with "BBSNAP-" on the serial console are a protocol that tests
# wait for; keep their spelling in step with bbsnap/tinyguest/__init__.py:
#   BBSNAP-COUNTER <n>          counter start value, then every 50 ticks
#   BBSNAP-MEMCOUNTER <n>       an in-memory counter, from 1 at each boot, every half second
#                               (never stored: after a memory-state revert it continues)
#   BBSNAP-SEED instance-id=<id> hostname=<name> | BBSNAP-SEED none
#   BBSNAP-USERDATA sha256=<hex>  the seed's user-data file as the guest read it
#                               (only when a seed with a user-data file is present)
#   BBSNAP-AGENT started | BBSNAP-AGENT none
#   BBSNAP-NET <addr> | BBSNAP-NET none
#   BBSNAP-SSH started | BBSNAP-SSH none   dropbear on port 22 (root, key auth only;
#                               keys from the seed's user-data) | no keys or no dropbear
#   BBSNAP-WRITELOOP started    the write-and-fsync loop runs (only when the seed's user-data
#                               has a line "bbsnap_writeloop: true"; see writeloop below)
#   BBSNAP-TINY-READY           boot finished: modules, counter, agent, ssh are up
#   BBSNAP-WARN <text>          something optional failed (never fatal)
#   BBSNAP-POWEROFF             shutting down on request (ACPI button, agent, signal)
#   BBSNAP-REBOOT               rebooting on request (agent's guest-shutdown mode=reboot)
#
# /etc/bbsnap-tiny.conf is written by the builder: KERNEL_RELEASE, COUNTER_SECTOR
# and MODULES (module files in dependency order, resolved from modules.dep).
# PID 1 must never exit (the kernel would panic), so nothing here uses `set -e`.

/bin/busybox mkdir -p /proc /sys /dev /run /tmp /sbin /usr/bin /usr/sbin /mnt/seed /var /etc
/bin/busybox --install -s
export PATH=/sbin:/usr/sbin:/bin:/usr/bin

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
# ptys for interactive SSH sessions; gid 5 is group tty in /etc/group.
mkdir -p /dev/pts
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts
# qemu-ga keeps its state in /var/run by default.
[ -e /var/run ] || ln -s /run /var/run
# The kernel opened /dev/console from the initramfs before devtmpfs hid it; reopen
# on the devtmpfs node so later device changes cannot leave us without output.
exec </dev/console >/dev/console 2>&1

. /etc/bbsnap-tiny.conf

warn() { echo "BBSNAP-WARN $*"; }

# The seed's user-data, copied out of the mounted seed by read_seed.
USER_DATA=/run/seed-user-data

load_modules() {
    for m in $MODULES; do
        insmod "/lib/modules/$KERNEL_RELEASE/$m" 2>/dev/null || warn "insmod $m failed"
    done
    # Kernel chatter after this point would interleave with protocol lines.
    echo 1 >/proc/sys/kernel/printk
}

# Poll for a path for up to $2 tenths of a second (device nodes appear asynchronously).
wait_for() {
    i=0
    while [ ! -e "$1" ] && [ "$i" -lt "$2" ]; do usleep 100000; i=$((i + 1)); done
    [ -e "$1" ]
}

# --- counter -------------------------------------------------------------------
# One sector of /dev/vda in the gap before partition 1: "BBSNAPCTR <n>\n" + NULs.
counter_read() {
    line=$(dd if=/dev/vda bs=512 skip="$COUNTER_SECTOR" count=1 2>/dev/null | head -n 1 | tr -d '\000')
    case "$line" in
        "BBSNAPCTR "*) n=${line#BBSNAPCTR } ;;
        *) n=0 ;;
    esac
    case "$n" in ''|*[!0-9]*) n=0 ;; esac
    echo "$n"
}

counter_loop() {
    n=$1
    ticks=0
    while :; do
        n=$((n + 1))
        # conv=sync pads the short line to 512 bytes with NULs; fsync makes each
        # value reach the virtual disk before the next, so a snapshot sees it.
        printf 'BBSNAPCTR %d\n' "$n" |
            dd of=/dev/vda bs=512 seek="$COUNTER_SECTOR" count=1 conv=sync,notrunc,fsync 2>/dev/null ||
            warn "counter write failed"
        ticks=$((ticks + 1))
        [ $((ticks % 50)) -eq 0 ] && echo "BBSNAP-COUNTER $n"
        usleep 150000
    done
}

# --- in-memory counter -----------------------------------------------------------------
# Lives only in this shell's memory: a boot starts it at 1, a restored memory image goes on
# from the value it had at the snapshot.
mem_counter_loop() {
    m=0
    while :; do
        m=$((m + 1))
        echo "BBSNAP-MEMCOUNTER $m"
        usleep 500000
    done
}

start_counter() {
    if ! wait_for /dev/vda 50; then
        warn "no /dev/vda: counter not running"
        return
    fi
    start=$(counter_read)
    echo "BBSNAP-COUNTER $start"
    counter_loop "$start" &
    mem_counter_loop &
}

# --- write-and-fsync loop ----------------------------------------------------------------
# What the guest feels during a snapshot (bbsnap/tinyguest/writeloop.py reads it from the
# host). Off unless the seed's user-data asks for it, so every other guest is unchanged.
# A tight loop: one 4 KiB direct write + fsync, each at the next 64 KiB slot (one qcow2
# cluster) of a region of partition 1's free space past its files (they end below 39 MiB;
# nothing mounts the partition), so a copy in progress meets fresh clusters, as a guest
# writing new data would. Each completed write appends "<start> <end>" (the guest's
# $EPOCHREALTIME, microseconds) to $WRITELOOP_LOG: the host empties the file to open a
# window and reads it to close one, through the agent. While $WRITELOOP_OFF exists the loop
# idles (so other measurements on the same guest are not loaded by it).
WRITELOOP_LOG=/run/writeloop.log
WRITELOOP_OFF=/run/writeloop.off
WRITELOOP_FIRST=11264   # in 4 KiB blocks: byte 44 MiB
WRITELOOP_SLOTS=320     # 16 blocks (64 KiB) apart: up to byte 64 MiB, the smallest test disk

writeloop_wanted() {
    [ -f "$USER_DATA" ] && grep -q '^bbsnap_writeloop:[[:space:]]*true[[:space:]]*$' "$USER_DATA"
}

writeloop() {
    block=/run/writeloop.block
    # 4096 non-zero bytes made by builtins (the RNG may not be ready this early at boot).
    i=0
    while [ "$i" -lt 512 ]; do printf 'BBSNAPWL'; i=$((i + 1)); done >"$block"
    slot=0
    while :; do
        if [ -e "$WRITELOOP_OFF" ]; then
            usleep 100000
            continue
        fi
        t0=$EPOCHREALTIME
        if dd if="$block" of=/dev/vda bs=4096 seek=$((WRITELOOP_FIRST + slot * 16)) count=1 \
            conv=notrunc,fsync oflag=direct 2>/dev/null; then
            echo "$t0 $EPOCHREALTIME" >>"$WRITELOOP_LOG"
        else
            warn "writeloop write failed"
            usleep 100000
        fi
        slot=$(((slot + 1) % WRITELOOP_SLOTS))
    done
}

start_writeloop() {
    writeloop_wanted || return
    if [ ! -b /dev/vda ]; then
        warn "no /dev/vda: writeloop not running"
        return
    fi
    writeloop &
    echo "BBSNAP-WRITELOOP started"
}

# --- cloud-init style seed ----------------------------------------------------------
# An ISO9660 volume labelled cidata: "CD001" at byte 32769, the volume id at 32808.
is_cidata() {
    [ "$(dd if="$1" bs=1 skip=32769 count=5 2>/dev/null)" = CD001 ] || return 1
    label=$(dd if="$1" bs=1 skip=32808 count=32 2>/dev/null | tr -d ' \000' | tr A-Z a-z)
    [ "$label" = cidata ]
}

# Value of a top-level "key: value" line of meta-data, without quotes.
meta_get() {
    sed -n "s/^$1:[[:space:]]*//p" /mnt/seed/meta-data | head -n 1 |
        sed -e 's/[[:space:]]*$//' -e "s/^[\"']//" -e "s/[\"']\$//"
}

read_seed() {
    for dev in /dev/sr0 /dev/sr1 /dev/vd[b-z] /dev/sd[a-z]; do
        [ -b "$dev" ] || continue
        is_cidata "$dev" || continue
        if ! mount -t iso9660 -o ro "$dev" /mnt/seed 2>/dev/null; then
            warn "cannot mount seed $dev"
            continue
        fi
        id=$(meta_get instance-id)
        host=$(meta_get local-hostname)
        # Kept for start_ssh, which runs after the seed is unmounted.
        [ -f /mnt/seed/user-data ] && cp /mnt/seed/user-data "$USER_DATA"
        umount /mnt/seed
        if [ -n "$host" ]; then
            hostname "$host"
            echo "127.0.1.1 $host" >>/etc/hosts
        fi
        echo "BBSNAP-SEED instance-id=$id hostname=$host"
        if [ -f "$USER_DATA" ] && command -v sha256sum >/dev/null; then
            sum=$(sha256sum "$USER_DATA" | cut -d' ' -f1)
            echo "BBSNAP-USERDATA sha256=$sum"
        fi
        return
    done
    echo "BBSNAP-SEED none"
}

# --- ssh ------------------------------------------------------------------------------
# Public keys from cloud-config user-data, without a YAML parser: every list item
# ("- key", optionally quoted) whose value starts like an OpenSSH public key. That
# covers ssh_authorized_keys: at the top level and under users:.
ssh_keys_from() {
    sed -n -e 's/[[:space:]]*$//' -e '/^[[:space:]]*- /!d' -e 's/^[[:space:]]*- [[:space:]]*//' \
        -e "s/^'\(.*\)'\$/\1/" -e 's/^"\(.*\)"$/\1/' -e p "$1" |
        grep -E '^(ssh-rsa |ssh-ed25519 |ecdsa-sha2-|sk-)'
}

start_ssh() {
    keys=/root/.ssh/authorized_keys
    [ -f "$USER_DATA" ] && ssh_keys_from "$USER_DATA" >"$keys"
    if [ ! -s "$keys" ] || ! command -v dropbear >/dev/null; then
        rm -f "$keys"
        echo "BBSNAP-SSH none"
        return
    fi
    chmod 600 "$keys"
    # The guest's login user (bbsnap/tinyguest/logins.py: uid 1000, logged in per /run/utmp)
    # takes the same keys, as a cloud image's "debian" would.
    cp "$keys" /home/tiny/.ssh/authorized_keys && chown -R 1000:1000 /home/tiny/.ssh &&
        chmod 600 /home/tiny/.ssh/authorized_keys || warn "no keys for user tiny"
    # -F -E: stay in the foreground of this background job and log to stderr, so
    # the log lands in a file (daemonising would close it; syslog is absent).
    # -R: host keys are made on first use, so every boot has its own.
    # -s: no password logins (root's shadow entry is "*" anyway).
    dropbear -F -E -R -s -p 22 -P /run/dropbear.pid >>/var/log/dropbear.log 2>&1 &
    pid=$!
    # dropbear binds only after the kernel's RNG is ready (a second or more under
    # TCG); until then SLIRP resets forwarded connections. "started" promises a
    # listening server, so wait for the socket (up to 30 s).
    i=0
    while ! ssh_listening; do
        if ! kill -0 "$pid" 2>/dev/null || [ "$i" -ge 300 ]; then
            warn "dropbear is not listening (see /var/log/dropbear.log)"
            echo "BBSNAP-SSH none"
            return
        fi
        usleep 100000
        i=$((i + 1))
    done
    echo "BBSNAP-SSH started"
}

# A TCP socket listening on port 22 (0016 in hex; state 0A is LISTEN).
ssh_listening() {
    cat /proc/net/tcp /proc/net/tcp6 2>/dev/null |
        awk '$2 ~ /:0016$/ && $4 == "0A" { found = 1 } END { exit !found }'
}

# --- guest agent ---------------------------------------------------------------------
start_agent() {
    for f in /sys/class/virtio-ports/*/name; do
        [ -f "$f" ] || continue
        [ "$(cat "$f")" = org.qemu.guest_agent.0 ] || continue
        dir=${f%/name}
        port=${dir##*/}
        if [ ! -c "/dev/$port" ]; then
            # devtmpfs normally made it; "maj:min" from sysfs otherwise.
            mknod "/dev/$port" c $(tr ':' ' ' <"$dir/dev")
        fi
        # Logs go to a file: the console carries the protocol lines.
        qemu-ga -m virtio-serial -p "/dev/$port" -t /run -l /run/qemu-ga.log &
        echo "BBSNAP-AGENT started"
        return
    done
    echo "BBSNAP-AGENT none"
}

# --- shutdown --------------------------------------------------------------------
poweroff_now() {
    echo "BBSNAP-POWEROFF"
    sync
    poweroff -f
}

reboot_now() {
    echo "BBSNAP-REBOOT"
    sync
    reboot -f
}

# Graceful stops: busybox poweroff/halt/reboot signal PID 1 (USR2/USR1/TERM);
# qemu-ga's guest-shutdown runs `/sbin/shutdown -P|-H|-r +0 "..."` (libvirt's
# reboot goes through the agent when one answers, so -r must reboot); the ACPI
# power button (libvirt's default shutdown) reaches acpid, which runs
# /etc/acpi/PWRF/00000080.
setup_shutdown() {
    trap poweroff_now USR1 USR2
    trap reboot_now TERM
    printf '#!/bin/sh\ncase " $* " in *" -r "*) kill -TERM 1 ;; *) kill -USR2 1 ;; esac\n' \
        >/sbin/shutdown
    chmod 755 /sbin/shutdown
    mkdir -p /etc/acpi/PWRF
    printf '#!/bin/sh\nkill -USR2 1\n' >/etc/acpi/PWRF/00000080
    chmod 755 /etc/acpi/PWRF/00000080
    if ls /dev/input/event* >/dev/null 2>&1; then
        acpid -c /etc/acpi -l /run/acpid.log || warn "acpid failed"
    fi
}

# --- network --------------------------------------------------------------------
write_dhcp_script() {
    cat >/run/udhcpc.script <<'EOF'
#!/bin/sh
case "$1" in
    deconfig) ip addr flush dev "$interface"; ip link set "$interface" up ;;
    bound|renew)
        ip addr flush dev "$interface"
        ip addr add "$ip/${mask:-24}" dev "$interface"
        for r in $router; do ip route add default via "$r" dev "$interface"; break; done
        : >/etc/resolv.conf
        for d in $dns; do echo "nameserver $d" >>/etc/resolv.conf; done
        ;;
esac
exit 0
EOF
    chmod 755 /run/udhcpc.script
}

start_network() {
    ip link set lo up
    if [ ! -e /sys/class/net/eth0 ]; then
        echo "BBSNAP-NET none"
        return
    fi
    write_dhcp_script
    # -n -q: give up after the tries, exit once leased (no renewals needed here).
    if udhcpc -i eth0 -n -q -t 4 -T 1 -s /run/udhcpc.script >/run/udhcpc.log 2>&1; then
        addr=$(ip -4 -o addr show dev eth0 | awk '{print $4}' | cut -d/ -f1 | head -n 1)
        echo "BBSNAP-NET ${addr:-none}"
    else
        echo "BBSNAP-NET none"
    fi
}

load_modules
setup_shutdown
start_counter
read_seed
start_agent
start_network
start_ssh
start_writeloop
echo "BBSNAP-TINY-READY"

# Idle forever. `sleep & wait` rather than a foreground sleep: ash runs traps
# only between commands, and wait is interrupted by a trapped signal at once.
while :; do
    sleep 3600 &
    wait $!
done
