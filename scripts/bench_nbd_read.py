#!/usr/bin/env python3
"""Benchmark: the export's read path, bbsnap's NBD client (disks/nbd.py) against libnbd.

On an 8 GiB-virtual qcow2 holding 1 GiB, served by `qemu-nbd --read-only` on a Unix socket
as `images export` serves it, every data extent (`qemu-img map`) is read in 4 MiB requests
and dropped, three ways, interleaved (RUNS rounds, medians):
  1. bbsnap's client: one request in flight (what export does);
  2. libnbd's `pread` (Debian's python3-libnbd): the same requests, one in flight;
  3. libnbd's `aio_pread`: 8 requests in flight, consumed in order.
No libvirtd needed. Debian's python3-libnbd is found in /usr/lib/python3/dist-packages
when this Python does not have it (same CPython 3.11 ABI).
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

RUNS = 5
CHUNK = 4 << 20
IN_FLIGHT = 8


def libnbd() -> Any:
    try:
        import nbd
    except ImportError:
        sys.path.append("/usr/lib/python3/dist-packages")
        import nbd
    return nbd


def main() -> None:
    from bbsnap.disks.nbd import NbdImageReader, extents

    nbd = libnbd()
    work = Path(tempfile.mkdtemp(prefix="bbsnap-bench-nbd-", dir="/var/tmp"))
    try:
        image = work / "image.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "8G"], check=True)
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 1G 1G", str(image)],
                       check=True, capture_output=True)
        data = [e for e in extents(image, "qcow2") if e.data]
        total = sum(e.length for e in data)

        def requests() -> list[tuple[int, int]]:
            return [(start, min(CHUNK, e.start + e.length - start))
                    for e in data for start in range(e.start, e.start + e.length, CHUNK)]

        def ours() -> float:
            with NbdImageReader(image, "qcow2") as reader:
                start = time.perf_counter()
                read = sum(len(chunk) for e in data for chunk in reader.read(e.start, e.length))
                elapsed = time.perf_counter() - start
            assert read == total
            return elapsed

        def serve() -> tuple[subprocess.Popen[bytes], Path]:
            sock = work / "nbd.sock"
            server = subprocess.Popen(["qemu-nbd", "--read-only", "--persistent", "--shared=8",
                                       "--format=qcow2", f"--socket={sock}", str(image)])
            deadline = time.monotonic() + 30
            while not sock.exists():
                if time.monotonic() > deadline:
                    raise SystemExit("qemu-nbd did not start")
                time.sleep(0.01)
            return server, sock

        def theirs(parallel: bool) -> float:
            server, sock = serve()
            try:
                handle = nbd.NBD()
                handle.connect_unix(str(sock))
                start = time.perf_counter()
                read = 0
                if not parallel:
                    for offset, length in requests():
                        read += len(handle.pread(length, offset))
                else:
                    pending: deque[tuple[Any, int]] = deque()
                    for offset, length in requests():
                        buffer = nbd.Buffer(length)
                        pending.append((buffer, handle.aio_pread(buffer, offset)))
                        while len(pending) >= IN_FLIGHT:
                            read += _complete(handle, pending)
                    while pending:
                        read += _complete(handle, pending)
                elapsed = time.perf_counter() - start
                handle.shutdown()
            finally:
                server.terminate()
                server.wait()
                (work / "nbd.sock").unlink(missing_ok=True)
            assert read == total, (read, total)
            return elapsed

        samples: dict[str, list[float]] = {"ours": [], "pread": [], "aio": []}
        for _ in range(RUNS):
            samples["ours"].append(ours())
            samples["pread"].append(theirs(False))
            samples["aio"].append(theirs(True))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    base = statistics.median(samples["ours"])
    mib = total / (1 << 20)
    print(f"{'read path (1 GiB of data, 4 MiB requests)':52} {'median':>8} {'MiB/s':>7}  ratio")
    for key, label in (("ours", "bbsnap disks/nbd.py, 1 in flight (export today)"),
                       ("pread", "libnbd pread, 1 in flight"),
                       ("aio", f"libnbd aio_pread, {IN_FLIGHT} in flight")):
        median = statistics.median(samples[key])
        print(f"{label:52} {median:7.3f}s {mib / median:7.0f}  {median / base:.2f} vs bbsnap")


def _complete(handle: Any, pending: deque[tuple[Any, int]]) -> int:
    """Wait for the oldest request, in order, as export consumes them; its length."""
    buffer, cookie = pending[0]
    while not handle.aio_command_completed(cookie):
        handle.poll(-1)
    pending.popleft()
    return len(buffer.to_bytearray())


if __name__ == "__main__":
    os.environ.setdefault("LC_ALL", "C")
    main()
