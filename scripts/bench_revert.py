#!/usr/bin/env python3
"""Benchmark: `bbsnap servers revert` against `bbsnap servers create` from the same image.

On the tiny real guest (TCG, 128 MiB): a running server is snapshotted, then, in one run on
the same machine, the whole commands are timed (a new Python process each: interpreter
start, imports, libvirt connection):
  - `servers create SNAPSHOT` (a new running server from the snapshot), destroyed between runs;
  - `servers revert SRV SNAPSHOT` of the running server (stop, new overlay, redefine, start).
Goal: revert <= 2x create. Each figure is the median of several runs. Needs libvirtd
(scripts/setup); on a shared host run it under the libvirtd lock the tests use.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import BBSNAP, cli_runner, guest_env, bench_dir, median_time

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bbsnap.tinyguest import build_tiny_guest

RUNS = 5
GOAL = 2.0


def main() -> None:
    work = bench_dir()
    env = guest_env(work)
    bbsnap = BBSNAP
    created: list[str] = []
    run = cli_runner(env)

    def create(image_id: str) -> str:
        server = run("servers", "create", image_id, "--memory", "128", "-s").split("\t")[0]
        created.append(server)
        return server

    try:
        print("preparing the tiny guest, a server and its snapshot ...", file=sys.stderr)
        image = run("images", "import", str(build_tiny_guest()), "--name", "tiny")
        server = create(image)
        snapshot = run("servers", "snapshot", server, "--wait").splitlines()[0]

        def destroy_last() -> None:
            run("servers", "destroy", created.pop())

        create_time = median_time(lambda: create(snapshot), RUNS, destroy_last)
        revert_time = median_time(lambda: run("servers", "revert", server, snapshot), RUNS)
    finally:
        for name in created:
            subprocess.run([*bbsnap, "servers", "destroy", name], env=env, check=False,
                           capture_output=True)
        shutil.rmtree(work, ignore_errors=True)

    ratio = revert_time / create_time
    print(f"{'measurement (tiny guest, TCG, 128 MiB, running)':52} {'median':>9}  ratio / goal")
    print(f"{'servers create SNAPSHOT (CLI)':52} {create_time * 1000:7.1f}ms  1.00")
    print(f"{'servers revert SRV SNAPSHOT (CLI)':52} {revert_time * 1000:7.1f}ms  {ratio:.2f} "
          f"vs create (goal <= {GOAL:g}: {'met' if ratio <= GOAL else 'MISSED'})")


if __name__ == "__main__":
    main()
