#!/usr/bin/env python3
"""Benchmark: what the guest feels during a snapshot, and the CLI against quiescing virsh.

On the tiny real guest (TCG, 128 MiB) running its write-and-fsync loop (a 4 KiB direct
write + fsync after another, each to a fresh 64 KiB cluster; bbsnap/tinyguest/writeloop.py),
for a domain bbsnap did not make (its first snapshot is a full copy), on a 64 MiB disk and on
an 8 GiB-virtual disk holding 1 GiB, one guest at a time. Each figure is the median of RUNS
windows; a window opens before the command and closes once the image is available:
  - the longest gap between two completed writes: with no snapshot (baseline, a window of
    BASELINE_WINDOW s), during a full copy (the first snapshot, crash-consistent), during an
    incremental crash-consistent snapshot (`--no-quiesce`) and during an incremental
    quiesced one (the default). Goals: crash-consistent <= baseline + 20 ms; quiesced <=
    baseline + the agent's freeze-and-thaw time (`virsh domfsfreeze` + `virsh domfsthaw`
    on the same guest, printed) + 20 ms; 8 GiB / 64 MiB <= 1.5x;
  - the write latency (median, p99) during the full copy against the baseline's: QEMU's
    copy-before-write makes a guest write to a not-yet-copied cluster wait for its copy;
  - beside each, the "host gap": the same loop run by the host on the guests' filesystem in
    the same window (HostProbe), which tells a stall of the guest's own from one every
    writer on this filesystem suffered (the host's writeback of the copy, other work);
  - the command's latency (`bbsnap servers snapshot`, quiesced, until it returns) against
    `virsh snapshot-create-as --disk-only --atomic --quiesce` (the same work: freeze, fix the
    instant, thaw; goal <= 2x), and plain `--disk-only --atomic` printed too, on the 64 MiB
    guest with the loop idle. virsh's overlay is committed back and its metadata deleted.
Needs libvirtd; on a shared host run it under the libvirtd lock the tests use.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchlib import (bench_dir, cli_runner, command_server, compile_checkout, guest_env,
                      median_time)

from bbsnap.tinyguest import writeloop

if TYPE_CHECKING:
    from bbsnap.hypervisor.libvirt_adapter import LibvirtHypervisor

URI = "qemu:///system"
VIRSH = ["virsh", "-q", "-c", URI]
RUNS = 3
CLI_RUNS = 7
BASELINE_WINDOW = 3.0   # seconds
SLACK = 0.020           # the "+ 20 ms"


@dataclass(frozen=True)
class Row:
    longest_gap: float
    median_latency: float
    p99_latency: float
    writes: int
    host_gap: float   # the host probe's longest gap in the same window
    where: str = ""   # when the longest gap fell, against the command's steps


def median_row(rows: list[Row]) -> Row:
    middle = sorted(rows, key=lambda r: r.longest_gap)[len(rows) // 2]
    return Row(statistics.median(r.longest_gap for r in rows),
               statistics.median(r.median_latency for r in rows),
               statistics.median(r.p99_latency for r in rows),
               int(statistics.median(r.writes for r in rows)),
               statistics.median(r.host_gap for r in rows), middle.where)


class HostProbe:
    """The guest's loop done by the host on the guests' own filesystem: append 4 KiB,
    fdatasync, every 10 ms. Appending allocates, as QEMU does for a guest write to a new
    qcow2 cluster, so each fdatasync commits the filesystem's journal; its longest gap is
    what any writer on this filesystem suffered in the window, guest or not."""

    PACE = 0.010
    LIMIT = 16 << 20   # the file starts over past this

    def __init__(self, path: Path) -> None:
        self.path = path
        self.ends: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        block = b"h" * 4096
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            while not self._stop.is_set():
                if os.fstat(fd).st_size >= self.LIMIT:
                    os.ftruncate(fd, 0)
                os.write(fd, block)
                os.fdatasync(fd)
                self.ends.append(time.monotonic())
                time.sleep(self.PACE)   # pacing, so the probe does not load the disk itself
        finally:
            os.close(fd)
            self.path.unlink(missing_ok=True)

    def stop(self) -> float:
        """Stop; the longest gap between two completed writes."""
        self._stop.set()
        self._thread.join()
        gaps = [b - a for a, b in zip(self.ends, self.ends[1:], strict=False)]
        return max(gaps) - self.PACE if gaps else float("nan")


class Guest:
    """One running tiny guest with the loop on, defined through libvirt as another tool would."""

    def __init__(self, work: Path, label: str, disk: Path, hv: LibvirtHypervisor,
                 run: Callable[..., str]) -> None:
        from bbsnap.hypervisor import DiskSpec, DomainSpec
        from bbsnap.seed import SeedSpec, write_seed_iso

        self.hv, self.run, self.work = hv, run, work
        self.name = f"bbsnap-bench-guest-{label}-{uuid.uuid4().hex[:6]}"
        seed = write_seed_iso(SeedSpec(self.name, "tiny", (), writeloop.user_data()),
                              work / f"{self.name}.iso")
        self.log = work / f"{self.name}.log"
        hv.define(DomainSpec(name=self.name, uuid=str(uuid.uuid4()), memory_mib=128, vcpus=1,
                             accel="tcg", console_log=self.log,
                             disks=(DiskSpec(disk), DiskSpec(seed, format="raw", device="cdrom",
                                                             target="hdc", bus="ide"))))
        hv.start(self.name)
        self.images: list[str] = []
        self.steps: dict[str, float] = {}   # the last snapshot's steps, host wall clock

    def wait_ready(self) -> None:
        from bbsnap.tinyguest import READY_LINE

        deadline = time.monotonic() + 240
        while READY_LINE not in (self.log.read_text(errors="replace") if self.log.exists() else ""):
            if time.monotonic() > deadline:
                raise SystemExit(f"{self.name} did not boot")
            time.sleep(0.2)
        if writeloop.STARTED_LINE not in self.log.read_text(errors="replace"):
            raise SystemExit(f"{self.name} booted without its write loop")
        writeloop.wait_for_agent(self.name, URI)

    def window(self, action: Callable[[], object]) -> Row:
        # The host's writeback of earlier work (the previous window's copy, a destroyed
        # image) would otherwise stall this window's fsyncs: each window starts settled.
        os.sync()
        opened = writeloop.open_window(self.name, URI)
        probe = HostProbe(self.work / "host-probe")
        self.steps = {}
        try:
            action()
            writes = writeloop.read_window(opened).writes
        finally:
            host_gap = probe.stop()
        stats = writeloop.window_stats(writes)
        return Row(stats.longest_gap, stats.median_latency, stats.p99_latency, stats.writes,
                   host_gap, self._where(opened, writes))

    def _where(self, opened: writeloop.OpenWindow, writes: tuple[writeloop.Write, ...]) -> str:
        """The longest gap placed among the snapshot's steps (host wall clock, from the
        command's start)."""
        if "begun" not in self.steps:
            return ""
        begun = self.steps["begun"]
        gap = [end - opened.clock_offset - begun for end in writeloop.longest_gap_at(writes)]
        steps = ", ".join(f"{step} {(at - begun) * 1000:+.0f}" for step, at in self.steps.items()
                          if step != "begun")
        return (f"gap {gap[0] * 1000:+.0f}..{gap[1] * 1000:+.0f} ms from the command's start "
                f"(+-{opened.clock_error * 1000:.0f}); {steps}")

    def snapshot_until_available(self, *flags: str) -> None:
        self.steps = {"begun": time.time()}
        self.images.append(self.run("servers", "snapshot", self.name, *flags))
        self.steps["returned"] = time.time()
        _wait_available(self)
        self.steps["available"] = time.time()

    def backup_by_libvirt_alone(self, ram_dir: Path) -> None:
        """The job a full copy runs, started by libvirt alone (``virDomainBackupBegin``, as
        ``virsh backup-begin`` does) into RAM as bbsnap's is, with a checkpoint as bbsnap's
        (the next snapshot's start; deleted after), awaited until libvirt has no job: what
        QEMU's push-mode backup costs the guest, bbsnap's code left out. Without the
        checkpoint the 64 MiB guest stalled ~7 ms less (fourteenth session)."""
        import libvirt

        target = ram_dir / f"{self.name}.qcow2"
        conn = libvirt.open(URI)
        try:
            dom = conn.lookupByName(self.name)
            self.steps = {"begun": time.time()}
            dom.backupBegin(f"<domainbackup><disks><disk name='vda' type='file'>"
                            f"<target file='{target}'/><driver type='qcow2'/></disk>"
                            f"<disk name='hdc' backup='no'/></disks></domainbackup>",
                            "<domaincheckpoint><name>bench-floor</name><disks>"
                            "<disk name='vda' checkpoint='bitmap'/><disk name='hdc' "
                            "checkpoint='no'/></disks></domaincheckpoint>", 0)
            self.steps["returned"] = time.time()
            while dom.jobInfo()[0] != libvirt.VIR_DOMAIN_JOB_NONE:
                time.sleep(0.01)
            self.steps["available"] = time.time()
            dom.checkpointLookupByName("bench-floor").delete(0)
        finally:
            conn.close()
            target.unlink(missing_ok=True)

    def forget_newest(self) -> None:
        self.run("images", "destroy", self.images.pop())

    def remove(self) -> None:
        for image in reversed(self.images):
            self.run("images", "destroy", image)
        self.images.clear()
        self.hv.destroy(self.name)
        self.hv.undefine(self.name)


def freeze_thaw(guest: Guest) -> tuple[float, float]:
    """The agent's freeze-and-thaw: through virsh (two commands), and through libvirt-python."""
    def by_virsh() -> None:
        for command in ("domfsfreeze", "domfsthaw"):
            subprocess.run([*VIRSH, command, guest.name], check=True, capture_output=True)

    def by_api() -> None:
        guest.hv.freeze(guest.name, 5)
        guest.hv.thaw(guest.name)

    return median_time(by_virsh, CLI_RUNS), median_time(by_api, CLI_RUNS)


def guest_rows(guest: Guest) -> dict[str, Row]:
    rows = {"baseline": median_row([guest.window(lambda: time.sleep(BASELINE_WINDOW))
                                    for _ in range(RUNS)])}
    full, alone = [], []
    ram_dir = Path(tempfile.mkdtemp(prefix="bbsnap-bench-", dir="/dev/shm"))
    os.chmod(ram_dir, 0o755)   # QEMU's user enters it; libvirt makes and labels the file
    try:
        for _ in range(RUNS):   # with the previous image gone, each is the domain's first: full
            # Interleaved with the same job by libvirt alone, on the same guest: the floor.
            alone.append(guest.window(lambda: guest.backup_by_libvirt_alone(ram_dir)))
            full.append(guest.window(lambda: guest.snapshot_until_available("--no-quiesce")))
            guest.forget_newest()
    finally:
        shutil.rmtree(ram_dir, ignore_errors=True)
    rows["libvirt alone"] = median_row(alone)
    rows["full copy"] = median_row(full)
    guest.snapshot_until_available("--no-quiesce")   # the parent the incremental ones follow
    for label, flags in (("crash-consistent", ("--no-quiesce",)), ("quiesced", ())):
        # Each kept, so the next one follows it: with the chain's newest image destroyed the
        # next snapshot was a full copy again (QEMU's job copied all 8 GiB).
        rows[label] = median_row([
            guest.window(lambda f=flags: guest.snapshot_until_available(*f))
            for _ in range(RUNS)])
    return rows


def cli_latency(guest: Guest, env: dict[str, str]) -> dict[str, float]:
    """Until each command returns, the loop idle; each virsh snapshot is undone after. The
    bbsnap command runs in its own process (*env*), then through a command server."""
    def virsh_undo() -> None:
        snapshot = subprocess.run([*VIRSH, "snapshot-current", "--name", guest.name],
                                  check=True, capture_output=True, text=True).stdout.strip()
        overlay = guest.hv.disks(guest.name)[0].path
        subprocess.run([*VIRSH, "blockcommit", guest.name, "vda", "--active", "--pivot",
                        "--wait"], check=True, capture_output=True)
        subprocess.run([*VIRSH, "snapshot-delete", guest.name, snapshot, "--metadata"],
                       check=True, capture_output=True)
        Path(overlay).unlink()

    def virsh(*flags: str) -> Callable[[], None]:
        return lambda: subprocess.run([*VIRSH, "snapshot-create-as", guest.name, "--disk-only",
                                       "--atomic", *flags], check=True, capture_output=True)

    def bbsnap() -> None:
        guest.images.append(guest.run("servers", "snapshot", guest.name))

    def settle_and_forget() -> None:
        _wait_available(guest)
        guest.forget_newest()

    writeloop.set_running(guest.name, URI, False)
    try:
        with command_server(env, guest.work) as through_server:
            def bbsnap_through_server() -> None:
                guest.images.append(through_server("servers", "snapshot", guest.name))

            # Interleaved, one of each per round: the host's load drifts within a run.
            kinds = {"disk-only": (virsh(), virsh_undo),
                     "quiesce": (virsh("--quiesce"), virsh_undo),
                     "bbsnap": (bbsnap, settle_and_forget),
                     "bbsnap server": (bbsnap_through_server, settle_and_forget)}
            samples: dict[str, list[float]] = {kind: [] for kind in kinds}
            for _ in range(CLI_RUNS):
                for kind, (action, undo) in kinds.items():
                    samples[kind].append(median_time(action, 1, undo))
            return {kind: statistics.median(times) for kind, times in samples.items()}
    finally:
        writeloop.set_running(guest.name, URI, True)


def _wait_available(guest: Guest) -> None:
    """Poll the catalogue in this process (a CLI call per poll would blur the step's time)."""
    from bbsnap.state.catalogue import Catalogue

    catalogue = Catalogue(guest.work / "data" / "catalogue.sqlite3")
    try:
        while True:
            state = catalogue.get(guest.images[-1], include_deleted=True).status.value
            if state == "available":
                return
            if state != "creating":
                raise SystemExit(f"{guest.images[-1]} is {state}")
            time.sleep(0.01)
    finally:
        catalogue.close()


def main() -> None:
    from bbsnap.hypervisor.libvirt_adapter import LibvirtHypervisor
    from bbsnap.tinyguest import build_tiny_guest

    # As installed (scripts/setup byte-compiles bbsnap): a checkout run with
    # PYTHONDONTWRITEBYTECODE would recompile every module on every command (~0.3 s here).
    compile_checkout()
    work = bench_dir()
    env = guest_env(work, LIBVIRT_DEFAULT_URI=URI)
    run = cli_runner(env)
    hv = LibvirtHypervisor(URI)
    results: dict[str, dict[str, Row]] = {}
    agent: dict[str, tuple[float, float]] = {}
    latency: dict[str, float] = {}
    try:
        small, big = work / "small.qcow2", work / "big.qcow2"
        subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(build_tiny_guest()),
                        str(small)], check=True)
        shutil.copy(small, big)
        # The loop writes below byte 64 MiB; the guest's files end below 39 MiB.
        subprocess.run(["qemu-img", "resize", "-q", "--shrink", str(small), "64M"], check=True)
        subprocess.run(["qemu-img", "resize", "-q", str(big), "8G"], check=True)
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 1G 1G", str(big)],
                       check=True, capture_output=True)
        # --latency-only: the command's latency alone (the 64 MiB guest, ~1 min, not ~5).
        latency_only = "--latency-only" in sys.argv[1:]
        for label, disk in (("64 MiB", small), ("8 GiB", big))[:1 if latency_only else 2]:
            guest = Guest(work, label.replace(" ", "").lower(), disk, hv, run)
            try:
                guest.wait_ready()
                if disk is small:
                    latency = cli_latency(guest, env)
                if latency_only:
                    continue
                results[label] = guest_rows(guest)
                agent[label] = freeze_thaw(guest)
            finally:
                guest.remove()
    finally:
        hv.close()
        shutil.rmtree(work, ignore_errors=True)
    report(results, agent, latency)


def report(results: dict[str, dict[str, Row]], agent: dict[str, tuple[float, float]],
           latency: dict[str, float]) -> None:
    def ms(seconds: float) -> str:
        return f"{seconds * 1000:7.1f}ms"

    def verdict(ok: bool) -> str:
        return "met" if ok else "MISSED"

    print(f"the guest's view (tiny guest, TCG, 128 MiB, write+fsync loop), median of {RUNS}")
    print(f"{'measurement':48} {'longest gap':>11} {'lat. median':>11} {'lat. p99':>9} "
          f"{'host gap':>9}  goal")
    for label, rows in results.items():
        base = rows["baseline"]
        by_virsh, by_api = agent[label]
        print(f"{label} disk: agent freeze+thaw {ms(by_virsh).strip()} (virsh domfsfreeze + "
              f"domfsthaw), {ms(by_api).strip()} (libvirt API)")
        goals = {"baseline": "", "libvirt alone": "",
                 "full copy": f"<= {ms(base.longest_gap + SLACK).strip()}",
                 "crash-consistent": f"<= {ms(base.longest_gap + SLACK).strip()}",
                 "quiesced": f"<= {ms(base.longest_gap + by_virsh + SLACK).strip()}"}
        limits = {"full copy": base.longest_gap + SLACK,
                  "crash-consistent": base.longest_gap + SLACK,
                  "quiesced": base.longest_gap + by_virsh + SLACK}
        names = {"baseline": "no snapshot (baseline)",
                 "libvirt alone": "libvirt's backup+checkpoint alone, RAM (floor)",
                 "full copy": "full copy (first snapshot, crash-consistent)",
                 "crash-consistent": "crash-consistent snapshot (incremental)",
                 "quiesced": "quiesced snapshot (incremental)"}
        for key, row in rows.items():
            goal = goals[key]
            if key in limits:
                goal += f": {verdict(row.longest_gap <= limits[key])}"
            print(f"  {names[key]:46} {ms(row.longest_gap):>11} {ms(row.median_latency):>11} "
                  f"{ms(row.p99_latency):>9} {ms(row.host_gap):>9}  {goal}")
            if row.where:
                print(f"    {row.where}")
        full = rows["full copy"]
        print(f"  {'full copy / libvirt alone, longest gap':46} "
              f"{full.longest_gap / rows['libvirt alone'].longest_gap:10.2f}x")
        print(f"  {'write latency during the copy vs baseline':46} "
              f"{'':>11} {full.median_latency / base.median_latency:10.2f}x "
              f"{full.p99_latency / base.p99_latency:8.2f}x")
    if len(results) == 2:
        small, big = (results[label] for label in results)
        for key in ("full copy", "crash-consistent", "quiesced"):
            ratio = big[key].longest_gap / small[key].longest_gap
            print(f"longest gap, 8 GiB / 64 MiB disk, {key + ':':18} {ratio:5.2f}x "
                  f"(goal <= 1.5: {verdict(ratio <= 1.5)})")
    if latency:
        ratio = latency["bbsnap"] / latency["quiesce"]
        print(f"{'virsh snapshot-create-as --disk-only --atomic':58} {ms(latency['disk-only'])}")
        print(f"{'virsh snapshot-create-as --disk-only --atomic --quiesce':58} "
              f"{ms(latency['quiesce'])}  1.00")
        print(f"{'bbsnap servers snapshot (CLI, quiesced), 64 MiB disk':58} "
              f"{ms(latency['bbsnap'])}  {ratio:.2f} vs quiescing virsh "
              f"(goal <= 2: {verdict(ratio <= 2)})")
        ratio = latency["bbsnap server"] / latency["quiesce"]
        print(f"{'  the same through the command server (command-server start)':58} "
              f"{ms(latency['bbsnap server'])}  {ratio:.2f} vs quiescing virsh "
              f"(goal <= 2: {verdict(ratio <= 2)})")


if __name__ == "__main__":
    main()
