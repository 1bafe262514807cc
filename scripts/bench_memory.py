#!/usr/bin/env python3
"""Benchmark: memory-state snapshots (`servers snapshot --memory`, `servers revert`).

On the tiny real guest (TCG) at 256 MiB and at 1 GiB of RAM, in one run on one machine:
  - the guest-visible pause of `snapshot --memory`: the guest runs a tight loop (started
    through its agent) printing a line on its serial console every 5 ms; the console log
    is polled every millisecond and the longest gap between two lines arriving during the
    snapshot, less the loop's usual gap, is the time the guest did not run (its own clock
    cannot tell: under TCG the guest's clocks stop while it is paused);
  - the time until the image is available (the command's start to `available`);
  - revert-to-running (`servers revert SRV IMG` until the command returns, guest running)
    against `virsh restore` of a `virsh save` file of the same guest, timed the same way.
Goals: pause <= 200 ms and not more than 1.5x larger at 1 GiB than at 256 MiB; revert
<= 1.5x `virsh restore`. Each figure is the median of RUNS runs. Needs libvirtd; on a
shared host run it under the libvirtd lock the tests use.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import BBSNAP, cli_runner, guest_env, bench_dir

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bbsnap.tinyguest import READY_LINE, build_tiny_guest

RUNS = 3
SIZES = (256, 1024)
TICK = "BBSNAP-TICK"
LOOP = f"while :; do echo {TICK}; usleep 5000; done >/dev/console 2>&1"
VIRSH = ["virsh", "-q", "-c", "qemu:///system"]


class ConsoleWatch:
    """Host arrival times of the guest's tick lines, polled every millisecond."""

    def __init__(self, log: Path) -> None:
        self.log = log
        self.arrivals: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        offset = self.log.stat().st_size if self.log.exists() else 0
        while not self._stop.is_set():
            try:
                with self.log.open("rb") as stream:
                    if self.log.stat().st_size < offset:
                        offset = 0  # a restarted QEMU truncates the log
                    stream.seek(offset)
                    data = stream.read()
            except OSError:
                data = b""
            if data:
                now = time.monotonic()
                offset += len(data)
                self.arrivals += [now] * data.count(TICK.encode())
            time.sleep(0.001)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def longest_gap(self, start: float, end: float) -> float:
        times = [t for t in self.arrivals if start <= t <= end]
        gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
        return max(gaps) if gaps else float("nan")

    def usual_gap(self, before: float) -> float:
        times = [t for t in self.arrivals if t < before][-200:]
        gaps = [b - a for a, b in zip(times, times[1:], strict=False) if b > a]
        return statistics.median(gaps) if gaps else 0.0


def main() -> None:
    work = bench_dir()
    env = guest_env(work)
    bbsnap = BBSNAP
    run = cli_runner(env)

    def wait_line(log: Path, wanted: str, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if log.exists() and wanted in log.read_text(errors="replace"):
                return
            time.sleep(0.1)
        raise SystemExit(f"{wanted} did not appear in {log}")

    def start_ticks(server: str) -> None:
        command = {"execute": "guest-exec",
                   "arguments": {"path": "/bin/sh", "arg": ["-c", LOOP + " &"]}}
        subprocess.run([*VIRSH, "qemu-agent-command", server, json.dumps(command)],
                       check=True, capture_output=True)

    results = {}
    servers: list[str] = []
    try:
        image = run("images", "import", str(build_tiny_guest()), "--name", "tiny")
        for size in SIZES:
            (server,) = json.loads(run("servers", "create", image, "--memory", str(size),
                                       "--format", "json"))
            srv = server["id"]
            servers.append(srv)
            log = work / "data" / "servers" / srv / "console.log"
            wait_line(log, READY_LINE)
            watch = ConsoleWatch(log)
            start_ticks(srv)
            time.sleep(2.0)
            pauses, available, snapshots = [], [], []
            for _ in range(RUNS):
                begun = time.monotonic()
                image_id = run("servers", "snapshot", srv, "--memory")
                returned = time.monotonic()
                while json.loads(run("images", "show", image_id, "--format", "json"))[
                        "state"] == "creating":
                    time.sleep(0.05)
                available.append(time.monotonic() - begun)
                time.sleep(0.5)
                pauses.append(watch.longest_gap(begun, returned + 0.3)
                              - watch.usual_gap(begun))
                snapshots.append(image_id)
            watch.stop()
            reverts, restores = [], []
            save_file = work / f"{srv}.save"
            for _ in range(RUNS):
                begun = time.monotonic()
                run("servers", "revert", srv, snapshots[-1])
                reverts.append(time.monotonic() - begun)
                subprocess.run([*VIRSH, "save", srv, str(save_file)], check=True,
                               capture_output=True)
                begun = time.monotonic()
                subprocess.run([*VIRSH, "restore", str(save_file)], check=True,
                               capture_output=True)
                restores.append(time.monotonic() - begun)
                save_file.unlink()
            results[size] = (statistics.median(pauses), statistics.median(available),
                             statistics.median(reverts), statistics.median(restores),
                             os.path.getsize(work / "data" / "images" /
                                             f"{snapshots[-1]}.memory.gz"))
    finally:
        for srv in servers:
            subprocess.run([*bbsnap, "servers", "destroy", srv], env=env, capture_output=True)
        shutil.rmtree(work, ignore_errors=True)

    print(f"memory snapshots on the tiny guest (TCG), median of {RUNS} runs")
    for size, (pause, available, revert, restore, stored) in results.items():
        print(f"  {size:5d} MiB: guest-visible pause {pause * 1000:6.0f} ms (goal <= 200)  "
              f"available after {available:5.2f} s  memory file {stored / 2**20:6.1f} MiB")
        print(f"             revert to running {revert:5.2f} s  virsh restore {restore:5.2f} s  "
              f"ratio {revert / restore:4.2f}x (goal <= 1.5x)")
    small, large = (results[s][0] for s in SIZES)
    print(f"  pause at {SIZES[1]} MiB / at {SIZES[0]} MiB: {large / small:4.2f}x (goal <= 1.5x)")


if __name__ == "__main__":
    main()
