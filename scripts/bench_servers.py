#!/usr/bin/env python3
"""Benchmark: `bbsnap servers create --no-start` is O(1) in the image's size.

In one run, on the same machine, measured twice: the create operation itself (bbsnap's
Python API in this process) and the whole `bbsnap servers create` command (a new Python
process each time: interpreter start, imports, libvirt connection):
  - create from an 8 GiB-virtual image holding ~1 GiB of real filesystem data (ext4 made with
    `mke2fs -d` from this machine's /usr files) against the same from a 64 MiB image
    (goal: ratio <= 1.5);
  - against a full copy of the big image with `qemu-img convert` (goal: create >= 20x faster).
Needs libvirtd (scripts/setup). Each figure is the median of several runs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import BBSNAP, cli_runner, guest_env, GIB, bench_dir, filesystem_image, median_time, small_image

RUNS = 5


def main() -> None:
    work = bench_dir()
    env = guest_env(work)
    bbsnap = BBSNAP
    run = cli_runner(env)

    try:
        print("preparing images (8 GiB virtual with ~1 GiB of files, and 64 MiB) ...", file=sys.stderr)
        big = filesystem_image(work / "big.qcow2", 8 * GIB, GIB)
        small = small_image(work / "small.qcow2")
        big_id, small_id = run("images", "import", str(big)), run("images", "import", str(small))
        created: list[str] = []

        def create(image_id: str) -> None:
            created.append(run("servers", "create", image_id, "--no-start", "--memory", "128",
                               "-s").split("\t")[0])

        def destroy_last() -> None:
            run("servers", "destroy", created.pop())

        small_time = median_time(lambda: create(small_id), RUNS, destroy_last)
        big_time = median_time(lambda: create(big_id), RUNS, destroy_last)
        small_api, big_api = api_times(env, small_id, big_id)
        copy = work / "copy.qcow2"

        def full_copy() -> None:
            subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "qcow2", str(big),
                            str(copy)], check=True)

        copy_time = median_time(full_copy, 3, lambda: copy.unlink())
        used = int(subprocess.run(["du", "-b", "--apparent-size", str(big)], capture_output=True,
                                  text=True).stdout.split()[0])
    finally:
        for server in list(locals().get("created", [])):
            subprocess.run([*bbsnap, "servers", "destroy", server], env=env, check=False)
        shutil.rmtree(work, ignore_errors=True)

    print(f"big image: 8 GiB virtual, {used / GIB:.2f} GiB of data in its qcow2")
    print(f"{'measurement':48} {'median':>9}  ratio / goal")
    for label, small_t, big_t in (("API", small_api, big_api), ("CLI", small_time, big_time)):
        print(f"{'create --no-start (' + label + '), 64 MiB image':48} {small_t * 1000:7.1f}ms  1.00")
        print(f"{'create --no-start (' + label + '), 8 GiB image':48} {big_t * 1000:7.1f}ms  "
              f"{big_t / small_t:.2f} vs 64 MiB (goal <= 1.5: "
              f"{'met' if big_t / small_t <= 1.5 else 'MISSED'})")
        print(f"{'  full copy (qemu-img convert) / create (' + label + ')':48} {'':9}  "
              f"{copy_time / big_t:.1f}x (goal >= 20x: {'met' if copy_time / big_t >= 20 else 'MISSED'})")
    print(f"{'qemu-img convert (full copy), 8 GiB image':48} {copy_time * 1000:7.1f}ms")


def api_times(env: dict[str, str], small_id: str, big_id: str) -> tuple[float, float]:
    """The create operation alone, through bbsnap's services in this process."""
    os.environ.update(env)
    from bbsnap.cli.context import AppContext
    from bbsnap.services.server_create import CreateRequest

    app = AppContext(overrides={})
    creator, service = app.server_creator(), app.servers()
    made: list[str] = []

    def create(image_id: str) -> None:
        made.append(creator.create(CreateRequest(image_id=image_id, memory_mib=128,
                                                 start=False)).id)

    try:
        create(small_id)  # warm-up: first libvirt calls, imports
        service.destroy(made.pop())
        small = median_time(lambda: create(small_id), RUNS, lambda: service.destroy(made.pop()))
        big = median_time(lambda: create(big_id), RUNS, lambda: service.destroy(made.pop()))
    finally:
        for server in made:
            service.destroy(server)
        app.close()
    return small, big


if __name__ == "__main__":
    start = time.perf_counter()
    main()
    print(f"(benchmark took {time.perf_counter() - start:.0f} s)", file=sys.stderr)
