#!/usr/bin/env python3
"""Benchmark: CLI start-up and `images list` with 10,000 catalogue rows.

Each figure is the median of several runs and is printed as a ratio to a bare
`python -c pass` measured in the same run (these machines are noisy).
Goals (issue 2): `--help` under 150 ms, the 10k list under 300 ms.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import BBSNAP, PYTHON, bbsnap_entry, cli_env, command_server, command_server_env

RUNS = 9


def timed(argv: list[str], env: dict[str, str]) -> float:
    samples = []
    for _ in range(RUNS):
        start = time.perf_counter()
        subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       check=True)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def fill_catalogue(data_dir: Path, rows: int) -> None:
    from bbsnap import ids
    from bbsnap.state.catalogue import Catalogue, utcnow
    from bbsnap.state.layout import DataDir
    from bbsnap.models import Image, ImageStatus, ImageType

    layout = DataDir(data_dir).ensure()
    catalogue = Catalogue(layout.catalogue_path)
    template = Image(id="", type=ImageType.UPLOAD, owner="bench", created_at=utcnow(),
                     status=ImageStatus.AVAILABLE, name="", virtual_size=8 << 30, disk_size=1 << 30)
    seen: set[str] = set()
    for n in range(rows):
        image_id = ids.new_id("img")
        while image_id in seen:
            image_id = ids.new_id("img")
        seen.add(image_id)
        kind = ImageType.SNAPSHOT if n % 3 == 0 else ImageType.UPLOAD
        catalogue.add(replace(template, id=image_id, type=kind, name=f"bench image {n}",
                              created_at=utcnow()))
    catalogue.close()


# One `images list` in phases, in a fresh interpreter (as the command runs), each phase timed
# with perf_counter: where the 10k-row listing's time goes beyond Python's own start-up.
_PHASES = """
import gc, io, json, sys, time
t = [time.perf_counter()]
from bbsnap.cli.main import cli
from bbsnap.cli import image_views, render
from bbsnap.cli.context import AppContext
t.append(time.perf_counter())
app = AppContext(overrides={"data_dir": None, "connect": None})
service = app.images()
t.append(time.perf_counter())
gc.disable()
found = service.summaries()
t.append(time.perf_counter())
rows = [image_views.list_row(s) for s in found]
t.append(time.perf_counter())
text = render.table(image_views.LIST_COLUMNS, rows)
t.append(time.perf_counter())
print(json.dumps([b - a for a, b in zip(t, t[1:])]))
"""
PHASE_NAMES = ("imports (click, bbsnap.cli)", "catalogue open + recovery", "read 10k summaries",
               "build the rows", "render the table")


def phases(env: dict[str, str]) -> list[float]:
    import json

    runs = [json.loads(subprocess.run([PYTHON, "-c", _PHASES], env=env, check=True,
                                      capture_output=True, text=True).stdout)
            for _ in range(RUNS)]
    return [statistics.median(run[i] for run in runs) for i in range(len(PHASE_NAMES))]


def main() -> None:
    # On the installed interpreter with bytecode, as an installed bbsnap runs (benchlib.cli_env).
    env = cli_env(BBSNAP_CONFIG="")
    with tempfile.TemporaryDirectory(prefix="bbsnap-bench-") as tmp:
        data_dir = Path(tmp) / "data"
        fill_catalogue(data_dir, 10_000)
        env["BBSNAP_HOME"] = str(data_dir)
        bbsnap = BBSNAP
        subprocess.run([*bbsnap, "images", "list"], env=env, stdout=subprocess.DEVNULL,
                       check=True)  # writes the bytecode the timed runs then read
        baseline = timed([PYTHON, "-c", "pass"], env)
        help_time = timed([*bbsnap, "--help"], env)
        list_time = timed([*bbsnap, "images", "list"], env)
        json_time = timed([*bbsnap, "images", "list", "--format", "json"], env)
        breakdown = phases(env)
        # The same through a command server (`command-server start`), as the console
        # script runs them: its entry point, not `-m bbsnap.cli.main`.
        with command_server(env, Path(tmp)) as through_server:
            server_env = command_server_env(env, Path(tmp))
            through_server("images", "list")
            served = {"help": timed([*bbsnap_entry(), "--help"], server_env),
                      "list": timed([*bbsnap_entry(), "images", "list"], server_env)}
    print(f"{'measurement':34} {'median':>9} {'ratio':>7}  goal")
    print(f"{'python -c pass (baseline)':34} {baseline * 1000:7.1f}ms {1:7.2f}")
    print(f"{'bbsnap --help':34} {help_time * 1000:7.1f}ms {help_time / baseline:7.2f}  "
          f"< 150 ms: {'met' if help_time < 0.150 else 'MISSED'}")
    print(f"{'bbsnap images list (10k rows)':34} {list_time * 1000:7.1f}ms {list_time / baseline:7.2f}  "
          f"< 300 ms: {'met' if list_time < 0.300 else 'MISSED'}")
    print(f"{'bbsnap images list --format json':34} {json_time * 1000:7.1f}ms {json_time / baseline:7.2f}")
    print(f"{'  --help through the command server':34} {served['help'] * 1000:7.1f}ms "
          f"{served['help'] / baseline:7.2f}")
    print(f"{'  list through the command server':34} {served['list'] * 1000:7.1f}ms "
          f"{served['list'] / baseline:7.2f}")
    print("where `images list` spends its time (medians, in-process):")
    for name, seconds in zip(PHASE_NAMES, breakdown, strict=True):
        print(f"  {name:32} {seconds * 1000:7.1f}ms")


if __name__ == "__main__":
    main()
