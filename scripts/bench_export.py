#!/usr/bin/env python3
"""Benchmark: export speed, size and memory against the usual tools, in one run.

On an 8 GiB-virtual image holding ~1 GiB of real filesystem data (ext4 made by
`mke2fs -d` from this machine's /usr files, converted to qcow2):
  - `bbsnap images export` (raw + gzip) against `qemu-img convert -O raw` followed by
    `gzip -6` (goal: >= 10x faster, output <= 1.10x the size), and against `pigz -6` where
    installed (goal: faster);
  - `--compress zstd` against `zstd -3` of the raw disk;
  - peak RSS of export and of importing the export (goal: under 200 MiB).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import BBSNAP, GIB, MIB, bench_dir, cli_env, filesystem_image


def timed(argv: list[str], env: dict[str, str], stdout: object = subprocess.DEVNULL,
          stdin: object = None) -> tuple[float, int]:
    """Wall time and peak RSS (bytes) of one command, children included."""
    start = time.perf_counter()
    child = subprocess.Popen(argv, env=env, stdout=stdout, stdin=stdin)
    _pid, status, usage = os.wait4(child.pid, 0)
    elapsed = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{argv[:4]} failed")
    return elapsed, usage.ru_maxrss * 1024


def shell_pipeline(commands: list[list[str]], out: Path) -> float:
    start = time.perf_counter()
    with open(out, "wb") as sink:
        procs, upstream = [], None
        for index, argv in enumerate(commands):
            last = index == len(commands) - 1
            p = subprocess.Popen(argv, stdin=upstream, stdout=sink if last else subprocess.PIPE)
            if upstream is not None:
                upstream.close()
            upstream = p.stdout
            procs.append(p)
        for p in procs:
            if p.wait() != 0:
                raise SystemExit(f"{commands} failed")
    return time.perf_counter() - start


def main() -> None:
    work = bench_dir()
    env = cli_env(BBSNAP_HOME=str(work / "data"), BBSNAP_CONFIG="")
    bbsnap = BBSNAP
    try:
        print("preparing an 8 GiB image with ~1 GiB of files ...", file=sys.stderr)
        image = filesystem_image(work / "fs.qcow2", 8 * GIB, GIB)
        image_id = subprocess.run([*bbsnap, "images", "import", str(image)], env=env, check=True,
                                  capture_output=True, text=True).stdout.strip()

        gz = work / "export.gz"
        t_export, rss_export = timed([*bbsnap, "images", "export", image_id, "-o", str(gz)], env)
        zst = work / "export.zst"
        t_export_zstd, rss_export_zstd = timed([*bbsnap, "images", "export", image_id, "-o",
                                                str(zst), "--compress", "zstd"], env)

        raw = work / "disk.raw"
        start = time.perf_counter()
        subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(image), str(raw)],
                       check=True)
        t_convert = time.perf_counter() - start
        t_gzip = shell_pipeline([["gzip", "-6", "-c", str(raw)]], work / "baseline.gz")
        t_pigz = (shell_pipeline([["pigz", "-6", "-c", str(raw)]], work / "baseline.pigz.gz")
                  if shutil.which("pigz") else None)
        t_zstd = shell_pipeline([["zstd", "-3", "-q", "-c", str(raw)]], work / "baseline.zst")
        raw.unlink()

        t_import, rss_import = timed([*bbsnap, "images", "import", str(gz), "--name", "again"],
                                     env, stdout=subprocess.DEVNULL)
        sizes = {p.name: p.stat().st_size for p in work.iterdir() if p.is_file()}
    finally:
        shutil.rmtree(work, ignore_errors=True)

    baseline = t_convert + t_gzip
    ratio_size = sizes["export.gz"] / sizes["baseline.gz"]

    def mib(n: int) -> str:
        return f"{n / MIB:8.1f} MiB"

    print(f"{'measurement':46} {'time':>9} {'size':>13}  ratio / goal")
    print(f"{'qemu-img convert -O raw + gzip -6 (baseline)':46} {baseline:8.2f}s {mib(sizes['baseline.gz'])}")
    print(f"{'bbsnap images export (raw + gzip)':46} {t_export:8.2f}s {mib(sizes['export.gz'])}  "
          f"{baseline / t_export:.1f}x faster (goal >= 10: {'met' if baseline / t_export >= 10 else 'MISSED'}), "
          f"size {ratio_size:.3f}x (goal <= 1.10: {'met' if ratio_size <= 1.10 else 'MISSED'})")
    if t_pigz is not None:
        pigz_total = t_convert + t_pigz
        print(f"{'qemu-img convert + pigz -6':46} {pigz_total:8.2f}s {mib(sizes['baseline.pigz.gz'])}  "
              f"export {pigz_total / t_export:.1f}x faster (goal > 1: "
              f"{'met' if pigz_total > t_export else 'MISSED'})")
    zstd_total = t_convert + t_zstd
    print(f"{'qemu-img convert + zstd -3':46} {zstd_total:8.2f}s {mib(sizes['baseline.zst'])}")
    print(f"{'bbsnap images export --compress zstd':46} {t_export_zstd:8.2f}s {mib(sizes['export.zst'])}  "
          f"{zstd_total / t_export_zstd:.1f}x faster")
    print(f"{'peak RSS: export gzip / export zstd':46} {rss_export / MIB:7.0f} / {rss_export_zstd / MIB:.0f} MiB "
          f"(goal < 200: {'met' if max(rss_export, rss_export_zstd) < 200 * MIB else 'MISSED'})")
    print(f"{'peak RSS: import of the export':46} {rss_import / MIB:7.0f} MiB ({t_import:.2f}s) "
          f"(goal < 200: {'met' if rss_import < 200 * MIB else 'MISSED'})")


if __name__ == "__main__":
    main()
