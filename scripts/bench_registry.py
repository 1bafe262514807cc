#!/usr/bin/env python3
"""Benchmark: what `images push` uploads and how fast push and pull are, in one run.

On an 8 GiB-virtual image holding ~1 GiB of real files (ext4 by `mke2fs -d`), and ten
snapshots of a server built on it, each stored as a 64 MiB delta on the one before (made
with qemu-io, as a server's snapshot chain is stored), against Debian's docker-registry
on 127.0.0.1:
  - bytes uploaded pushing snapshot 10 after snapshots 1-9 were pushed, against a full
    push of snapshot 10 (its flattened disk, `--containerdisk`; goal: >= 10x fewer);
  - push and pull time of the 1 GiB image against the same file moved as one blob by curl
    (a monolithic PUT, a GET: the registry's own floor; goal: <= 1.2x);
  - the same against the ORAS project's own client, the issue's baseline (goal: <= 1.2x):
    the oras CLI is a Go program that Debian does not package and the Go module proxy is
    out of reach here, so oras-py (PyPI `oras`, the `bench` extra) pushes and pulls the
    same qcow2 file as one layer, each in a new process as the oras CLI and bbsnap's run;
    its push again with `do_chunked` (16 MiB PATCHes), and the peak memory of each, since
    its default push reads the whole blob into memory. Pulls, curl and oras-py take turns,
    PULL_ROUNDS times, and the medians are compared: each timed download starts right
    after the previous one's 1.2 GiB was deleted, so all find memory in the same state (on
    these VMs pages freed long ago come back slowly: a 1.2 GiB dd took 3.7-4.9 s onto
    them, 0.4-0.7 s onto pages just freed), and one load spike does not decide;
  - the same GET followed by the file's SHA-256 (`openssl dgst`, which uses the CPU's SHA
    instructions; coreutils' sha256sum does not and took 5-8 s here): what a client that
    verifies the digest (as bbsnap does; oras-py's pull does not) costs done in turn, printed
    for reference, not a goal;
  - where a pull's time goes: one more pull run in this process, its phases (download
    with hashing and vetting of the head, QEMU's vetting, a rewrite if the layer needed
    one, the fsync before it is published) from PullResult.seconds.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
from benchlib import GIB, MIB, bench_dir, filesystem_image  # noqa: E402

from bbsnap.state.catalogue import Catalogue  # noqa: E402
from bbsnap.models import Image, ImageStatus, ImageType  # noqa: E402
from tests.registry import running_registry  # noqa: E402

SNAPSHOTS = 10
DELTA = 64 * MIB
PULL_ROUNDS = 3

# oras-py driven the way its CLI would be: a new process per command, the file as one layer
# (media type and title annotation are oras' defaults), a plain-HTTP loopback registry.
ORAS = """
import sys
import oras.client
verb, host, ref, path = sys.argv[1:]
client = oras.client.OrasClient(hostname=host, insecure=True)
if verb == "pull":
    client.pull(target=ref, outdir=path)
else:
    client.push(files=[path], target=ref, disable_path_validation=True,
                do_chunked=verb == "push-chunked")
"""


def bbsnap(data: Path, *args: str) -> tuple[float, str, str]:
    env = {**os.environ, "BBSNAP_HOME": str(data), "BBSNAP_CONFIG": ""}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "bbsnap.cli.main", *args], env=env,
                          capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"bbsnap {' '.join(args)} failed: {done.stderr}")
    return elapsed, done.stdout.strip(), done.stderr


def uploaded(stderr: str) -> int:
    line = [x for x in stderr.splitlines() if x.endswith("bytes uploaded)")][-1]
    return int(line.rsplit("(", 1)[1].split()[0])


def snapshot_chain(data: Path, base: str) -> list[str]:
    """Ten snapshots, each a 64 MiB delta on the previous one, registered as a server's."""
    catalogue = Catalogue(data / "catalogue.sqlite3")
    images = data / "images"
    parent, made = base, []
    start = datetime.now(timezone.utc)
    for index in range(1, SNAPSHOTS + 1):
        image_id = f"img-bnch{index % 10}" if index < 10 else "img-bnchz"
        path = images / f"{image_id}.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b",
                        f"{parent}.qcow2", str(path)], check=True)
        offset = (index * 512 * MIB) % (7 * GIB)
        subprocess.run(["qemu-io", "-f", "qcow2", "-c",
                        f"write -P {index} {offset} {DELTA}", str(path)], check=True,
                       stdout=subprocess.DEVNULL)
        os.chmod(path, 0o600)
        catalogue.add(Image(id=image_id, type=ImageType.SNAPSHOT, owner="bench",
                            created_at=start + timedelta(minutes=index),
                            status=ImageStatus.AVAILABLE, name=f"snapshot {index}",
                            path=path.name, virtual_size=8 * GIB, ancestor_id=base,
                            parent_id=parent, source_server="srv-bench"), depends_on=parent)
        made.append(image_id)
        parent = image_id
    catalogue.close()
    return made


def curl_push(host: str, disk: Path) -> tuple[float, str]:
    """The floor: the same file as one blob, a monolithic PUT by curl (streamed, no
    hashing by the client, no chunks), on the same registry API."""
    digest = hashlib.sha256()
    start = time.perf_counter()
    with open(disk, "rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)  # any client must know the digest before the PUT
    headers = subprocess.run(["curl", "-sS", "-D", "-", "-o", "/dev/null", "-X", "POST",
                              f"http://{host}/v2/b/base/blobs/uploads/"], check=True,
                             capture_output=True, text=True).stdout
    location = next(line.split(": ", 1)[1].strip() for line in headers.splitlines()
                    if line.lower().startswith("location:"))
    url = location if location.startswith("http") else f"http://{host}{location}"
    glue = "&" if "?" in url else "?"
    subprocess.run(["curl", "-sS", "-f", "-o", "/dev/null", "-X", "PUT", "-T", str(disk),
                    "-H", "Content-Type: application/octet-stream",
                    f"{url}{glue}digest=sha256:{digest.hexdigest()}"], check=True)
    return time.perf_counter() - start, "sha256:" + digest.hexdigest()


def oras(verb: str, host: str, ref: str, path: Path) -> tuple[float, int]:
    """One oras-py command in a new process: its seconds and its peak RSS in bytes."""
    with tempfile.TemporaryFile() as stderr:
        start = time.perf_counter()
        process = subprocess.Popen([sys.executable, "-c", ORAS, verb, host, ref, str(path)],
                                   stdout=subprocess.DEVNULL, stderr=stderr)
        _pid, status, usage = os.wait4(process.pid, 0)  # rusage of this child alone
        elapsed = time.perf_counter() - start
        process.returncode = os.waitstatus_to_exitcode(status)
        if process.returncode != 0:
            stderr.seek(0)
            lines = stderr.read().decode(errors="replace").strip().splitlines() or ["?"]
            raise SystemExit(f"oras-py {verb} {ref} failed: {lines[-1]}")
    return elapsed, usage.ru_maxrss * 1024  # Linux counts ru_maxrss in KiB


def timed(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    if importlib.util.find_spec("oras") is None:
        raise SystemExit("bench_registry: oras-py (PyPI oras, the baseline) is not installed: "
                         "pip install -e '.[bench]' (scripts/setup does)")
    work = bench_dir()
    try:
        print("preparing an 8 GiB image with ~1 GiB of files and 10 snapshots ...",
              file=sys.stderr)
        disk = filesystem_image(work / "base.qcow2")
        data = work / "data"
        _t, base, _e = bbsnap(data, "images", "import", str(disk), "--name", "bench base")
        disk.unlink()
        snaps = snapshot_chain(data, base)
        rows = []
        with running_registry() as registry:
            for index, image_id in enumerate(snaps[:-1], start=1):
                bbsnap(data, "images", "push", image_id, f"{registry.host}/bench/srv:s{index}")
            delta_time, _d, err = bbsnap(data, "images", "push", snaps[-1],
                                         f"{registry.host}/bench/srv:s10")
            delta = uploaded(err)
            full_time, _d, err = bbsnap(data, "images", "push", snaps[-1],
                                        f"{registry.host}/bench/flat:s10", "--containerdisk")
            full = uploaded(err)
            rows.append(("push snapshot 10, snapshots 1-9 pushed before", delta_time, delta,
                         ""))
            rows.append(("push snapshot 10 flattened (full push)", full_time, full,
                         f"{full / delta:.1f}x the bytes of the delta push (goal >= 10x: "
                         f"{'met' if full / delta >= 10 else 'MISSED'})"))

        # Speed of the transfer itself: the 1 GiB image to registries that hold nothing.
        stored = data / "images" / f"{base}.qcow2"
        size = stored.stat().st_size
        with running_registry() as fresh, running_registry() as floor, \
                running_registry() as orasreg:
            curl_up, digest = curl_push(floor.host, stored)
            push_time, _d, err = bbsnap(data, "images", "push", base,
                                        f"{fresh.host}/speed/base:1")
            oras_ref = f"{orasreg.host}/oras/base:1"
            oras_up, oras_up_rss = oras("push", orasreg.host, oras_ref, stored)
            chunked_up, chunked_rss = oras("push-chunked", orasreg.host,
                                           f"{orasreg.host}/chunked/base:1", stored)
            oras_out = work / "oras-out"
            blob = work / "blob"
            fetch = ["curl", "-sS", "-f", "-o", str(blob),
                     f"http://{floor.host}/v2/b/base/blobs/{digest}"]
            timed(fetch)  # untimed: the first timed curl then also follows a deletion
            curls, verified, pulls, oras_pulls, oras_rss = [], [], [], [], []
            for _round in range(PULL_ROUNDS):
                blob.unlink()
                curls.append(timed(fetch))
                blob.unlink()
                verified.append(timed(fetch) + timed(["openssl", "dgst", "-sha256", str(blob)]))
                blob.unlink()
                pulls.append(bbsnap(work / "data2", "images", "pull",
                                    f"{fresh.host}/speed/base:1")[0])
                shutil.rmtree(work / "data2")
                seconds, rss = oras("pull", orasreg.host, oras_ref, oras_out)
                oras_pulls.append(seconds)
                oras_rss.append(rss)
                shutil.rmtree(oras_out)
                timed(fetch)  # the next curl follows a deletion as the pulls did
            blob.unlink()
            phases = pull_phases(work / "data3", f"{fresh.host}/speed/base:1")
        curl_down, pull_time = statistics.median(curls), statistics.median(pulls)
        rows.append(("curl: one monolithic blob PUT (baseline)", curl_up, size, ""))
        rows.append(("bbsnap images push (1 GiB image)", push_time, uploaded(err),
                     _goal(push_time / curl_up)))
        rows.append(("oras-py push (the ORAS client; one PUT)", oras_up, size,
                     _against_oras("push", push_time / oras_up)))
        rows.append(("oras-py push, do_chunked (16 MiB PATCHes)", chunked_up, size,
                     f"bbsnap's push takes {push_time / chunked_up:.2f}x this (not a goal)"))
        rows.append((f"curl: one blob GET (baseline, median of {PULL_ROUNDS})", curl_down,
                     size, ""))
        rows.append((f"bbsnap images pull (median of {PULL_ROUNDS})", pull_time, size,
                     _goal(pull_time / curl_down)))
        oras_down = statistics.median(oras_pulls)
        rows.append((f"oras-py pull (the ORAS client; median of {PULL_ROUNDS})", oras_down,
                     size, _against_oras("pull", pull_time / oras_down)))
        checked = statistics.median(verified)
        rows.append(("curl GET, then its SHA-256 (openssl: verifying)", checked, size,
                     f"the pull takes {pull_time / checked:.2f}x this (not a goal)"))
        print(f"{'measurement':50} {'time':>8} {'uploaded/size':>14}  ratio / goal")
        for name, seconds, count, note in rows:
            print(f"{name:50} {seconds:7.2f}s {count / MIB:10.1f} MiB  {note}")
        print(f"curl GETs: {_seconds(curls)}; curl + openssl: {_seconds(verified)}; "
              f"pulls: {_seconds(pulls)}; oras-py pulls: {_seconds(oras_pulls)}")
        print(f"oras-py peak RSS: push {oras_up_rss / MIB:.0f} MiB, chunked push "
              f"{chunked_rss / MIB:.0f} MiB, pull {max(oras_rss) / MIB:.0f} MiB "
              f"(of a {size / MIB:.0f} MiB blob)")
        total = phases.pop("total")
        print("one pull in process, by phase: " + ", ".join(
            f"{name} {seconds:.2f}s" for name, seconds in phases.items()) +
            f", the rest (manifest, config, catalogue) {total - sum(phases.values()):.2f}s;"
            f" total {total:.2f}s")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def pull_phases(data: Path, ref: str) -> dict[str, float]:
    """One pull by the library in this process: its seconds per phase, and its total."""
    from bbsnap.cli.context import AppContext
    from bbsnap.registry.pull import Puller
    from bbsnap.registry.reference import parse
    from bbsnap.reporting import SILENT

    saved = {k: os.environ.get(k) for k in ("BBSNAP_HOME", "BBSNAP_CONFIG")}
    os.environ.update(BBSNAP_HOME=str(data), BBSNAP_CONFIG="")
    context = AppContext({}, reporter=SILENT)
    try:
        start = time.perf_counter()
        result = Puller(context.catalogue, context.data_dir, context.settings).pull(parse(ref))
        total = time.perf_counter() - start
    finally:
        context.close()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    phases = {name: result.seconds.get(name, 0.0)
              for name in ("download", "vet", "rewrite", "fsync")}
    return {**phases, "total": total}


def _seconds(samples: list[float]) -> str:
    return " ".join(f"{x:.2f}s" for x in samples)


def _against_oras(verb: str, ratio: float) -> str:
    return (f"bbsnap's {verb} takes {ratio:.2f}x this (goal <= 1.2: "
            f"{'met' if ratio <= 1.2 else 'MISSED'})")


def _goal(ratio: float) -> str:
    return f"{ratio:.2f}x the baseline (goal <= 1.2: {'met' if ratio <= 1.2 else 'MISSED'})"


if __name__ == "__main__":
    main()
