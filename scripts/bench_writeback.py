#!/usr/bin/env python3
"""Benchmark: the paced writeback of a full copy's target (bbsnap/disks/writeback.py),
without a guest or libvirt, as a quick way to try its window and depth.

A writer fills a 1 GiB file as fast as the page cache takes it (QEMU's backup job writing
its target), then fdatasyncs it (the job's own flush at its end), while a probe on the same
filesystem appends 4 KiB and fdatasyncs every 10 ms (the guest flushing its own disk,
`bench_guest_view.py`'s host gap). For each variant, interleaved over ROUNDS rounds: the
probe's longest gap, the time until the whole file was written and until it was flushed,
each the median of the rounds; ratios against the same writer with no writeback at all (the
kernel's own thresholds until the final flush), run in the same rounds. Variants: the
shipped WINDOW x DEPTH, smaller windows, and the shipped one at the idle I/O priority.

    python3 scripts/bench_writeback.py [DIR]    # DIR: on the data directory's filesystem
"""

from __future__ import annotations

import ctypes
import mmap
import os
import statistics
import sys
import threading
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, ContextManager

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import MIB, bench_dir

from bbsnap.disks import writeback

SIZE = 1 << 30
DIRECT_CHUNK = 4 * MIB
RAM_DIR = Path("/dev/shm")
CHUNK = MIB
ROUNDS = 3
PROBE_EVERY = 0.01
_IOPRIO_SET = 251  # x86_64
_IOPRIO_CLASS_IDLE = 3


class Variant:
    def __init__(self, label: str, window: int = 0, depth: int = 0, idle: bool = False,
                 in_ram: int = 0) -> None:
        self.label, self.window, self.depth, self.idle = label, window, depth, idle
        self.in_ram = in_ram  # >0: written into RAM, then copied out by that many O_DIRECT writers

    def pacing(self, target: Path) -> ContextManager[Any]:
        if not self.window:
            return nullcontext()
        writeback.WINDOW, writeback.DEPTH = self.window, self.depth
        paced = writeback.Writeback([target])
        if self.idle:
            run = paced._run

            def idle_run() -> None:  # the thread's own I/O priority, then the usual loop
                libc = ctypes.CDLL(None, use_errno=True)
                libc.syscall(_IOPRIO_SET, 1, 0, _IOPRIO_CLASS_IDLE << 13)
                run()
            paced._run = idle_run  # type: ignore[method-assign]
        return paced


VARIANTS = (
    Variant("no writeback (the baseline)"),
    Variant(f"{writeback.WINDOW // MIB} MiB x {writeback.DEPTH} (shipped)",
            writeback.WINDOW, writeback.DEPTH),
    Variant("16 MiB x 2", 16 * MIB, 2),
    Variant("8 MiB x 4", 8 * MIB, 4),
    Variant(f"{writeback.WINDOW // MIB} MiB x {writeback.DEPTH}, idle I/O priority",
            writeback.WINDOW, writeback.DEPTH, idle=True),
    Variant(f"in RAM, then O_DIRECT out, {DIRECT_CHUNK // MIB} MiB x 1", in_ram=1),
    Variant(f"in RAM, then O_DIRECT out, {DIRECT_CHUNK // MIB} MiB x 2", in_ram=2),
)


def copy_out_direct(source: Path, target: Path, writers: int) -> None:
    """*source* (in RAM) into *target* with O_DIRECT writes of DIRECT_CHUNK, *writers* at a
    time (each its own page-aligned buffer), then fdatasync: at most *writers* requests of
    the copy wait in the disk's queue, whatever the copy's size."""
    size = source.stat().st_size
    src = os.open(source, os.O_RDONLY)
    dst = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600)
    try:
        def writer(first: int) -> None:
            buffer = mmap.mmap(-1, DIRECT_CHUNK)
            try:
                for offset in range(first * DIRECT_CHUNK, size, writers * DIRECT_CHUNK):
                    got = os.preadv(src, [buffer], offset)
                    os.pwritev(dst, [buffer if got == DIRECT_CHUNK else buffer[:got]], offset)
            finally:
                buffer.close()
        threads = [threading.Thread(target=writer, args=(i,)) for i in range(writers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        os.fdatasync(dst)
    finally:
        os.close(src)
        os.close(dst)


def one_copy(work: Path, variant: Variant) -> tuple[float, float, float]:
    """(the probe's longest gap, written, flushed) in seconds."""
    target, probe = work / "target", work / "probe"
    for path in (target, probe):
        path.unlink(missing_ok=True)
    os.sync()  # nobody's earlier writes in this copy's flushes
    gaps: list[float] = []
    stop = threading.Event()

    def probing() -> None:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            last = time.monotonic()
            while not stop.wait(PROBE_EVERY):
                os.write(fd, b"p" * 4096)
                os.fdatasync(fd)
                now = time.monotonic()
                gaps.append(now - last)
                last = now
        finally:
            os.close(fd)

    prober = threading.Thread(target=probing)
    prober.start()
    data = os.urandom(CHUNK)
    first = RAM_DIR / f"bbsnap-bench-writeback.{os.getpid()}" if variant.in_ram else target
    fd = os.open(first, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        begun = time.monotonic()
        with variant.pacing(target):
            for _ in range(SIZE // CHUNK):
                os.write(fd, data)
            written = time.monotonic() - begun
            if variant.in_ram:
                copy_out_direct(first, target, variant.in_ram)
            else:
                os.fdatasync(fd)
            flushed = time.monotonic() - begun
    finally:
        os.close(fd)
        stop.set()
        prober.join()
        for path in (first, target, probe):
            path.unlink(missing_ok=True)
    return max(gaps), written, flushed


def main() -> None:
    work = Path(sys.argv[1]) if len(sys.argv) > 1 else bench_dir()
    work.mkdir(parents=True, exist_ok=True)
    samples: dict[str, list[tuple[float, float, float]]] = {v.label: [] for v in VARIANTS}
    shipped = writeback.WINDOW, writeback.DEPTH
    try:
        for _ in range(ROUNDS):
            for variant in VARIANTS:
                samples[variant.label].append(one_copy(work, variant))
    finally:
        writeback.WINDOW, writeback.DEPTH = shipped
        if len(sys.argv) <= 1:
            work.rmdir()
    medians = {label: tuple(statistics.median(s[i] for s in runs) for i in range(3))
               for label, runs in samples.items()}
    base = medians[VARIANTS[0].label]
    print(f"1 GiB written at page-cache speed, then fdatasync; probe: 4 KiB + fdatasync every "
          f"{PROBE_EVERY * 1000:.0f} ms; median of {ROUNDS} interleaved rounds")
    print(f"{'variant':44} {'probe gap':>10} {'written':>9} {'flushed':>9}  gap / flushed vs baseline")
    for label, (gap, written, flushed) in medians.items():
        print(f"{label:44} {gap * 1000:8.0f}ms {written * 1000:7.0f}ms {flushed * 1000:7.0f}ms  "
              f"{gap / base[0]:4.2f}x / {flushed / base[2]:4.2f}x")


if __name__ == "__main__":
    main()
