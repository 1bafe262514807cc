"""Background workers: ``python -m bbsnap.services.snapshots.worker finish-snapshot IMG --lock-fd N``.

Started detached by ``servers snapshot`` (and by crash recovery to adopt an
orphaned copy); writes only to its log file in ``DATA/logs/``. The command line is
built (:func:`base_argv`, :func:`finish_snapshot_argv`) and parsed (:func:`main`) here
and nowhere else.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import sys
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from bbsnap.errors import BbsnapError

if TYPE_CHECKING:
    from bbsnap.state.catalogue import Catalogue


def base_argv(data_dir: str, connect: str) -> list[str]:
    """How to run a worker for the data directory *data_dir* on connection *connect*."""
    return [sys.executable, "-m", "bbsnap.services.snapshots.worker", "--data-dir", data_dir, "--connect", connect]


def finish_snapshot_argv(base: list[str], image_id: str, lock_fd: int) -> list[str]:
    """Finish *image_id*'s copy, holding the server's lock the caller passes as *lock_fd*."""
    return [*base, "finish-snapshot", image_id, "--lock-fd", str(lock_fd)]


def _holds_lock(fd: int) -> bool:
    """Whether *fd* is an open file whose exclusive flock this process holds (inherited: the
    same open file description, so taking it again succeeds at once; any other holder
    would make it fail)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bbsnap-worker")
    parser.add_argument("--data-dir")
    parser.add_argument("--connect")
    sub = parser.add_subparsers(dest="command", required=True)
    finish = sub.add_parser("finish-snapshot")
    finish.add_argument("image_id")
    finish.add_argument("--lock-fd", type=int, required=True,
                        help="the server lock inherited from the caller")
    args = parser.parse_args(argv)
    if not _holds_lock(args.lock_fd):
        # Copying without the server's lock would race a prune or revert of its chain.
        print(f"snapshot {args.image_id}: not started with the server's lock (fd "
              f"{args.lock_fd}); recovery will adopt it", flush=True)
        return 2

    from bbsnap.state.catalogue import Catalogue
    from bbsnap.config import load_settings
    from bbsnap.hypervisor.libvirt_adapter import LibvirtHypervisor
    from bbsnap.state.layout import DataDir
    from bbsnap.services.snapshots.finish import SnapshotFinisher
    from bbsnap.services.snapshots import timeline as snapshot_timeline

    timeline = snapshot_timeline.Timeline()
    started = snapshot_timeline.process_start()
    if started is not None:
        timeline.mark("worker-started", started)
    timeline.mark("imported")
    settings = load_settings({"data_dir": args.data_dir, "connect": args.connect})
    data_dir = DataDir.from_settings(settings).ensure()
    catalogue = Catalogue(data_dir.catalogue_path, images_dir=data_dir.images_dir)
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    print(f"{stamp} finishing snapshot {args.image_id}", flush=True)
    try:
        finisher = SnapshotFinisher(catalogue, data_dir,
                                    lambda: LibvirtHypervisor(settings.connect),
                                    timeline=timeline)
        image = finisher.run(args.image_id)
    except BbsnapError as exc:
        print(f"{stamp} snapshot {args.image_id} failed: {exc}", flush=True)
        return 1
    finally:
        _checkpoint(catalogue)
        catalogue.close()
        timeline.mark("checkpointed")
        print(timeline.line(), flush=True)  # read by scripts/bench_snapshot.py
    print(f"{datetime.now(timezone.utc).isoformat(timespec='seconds')} snapshot {image.id} is "
          f"{image.status.value}", flush=True)
    os.close(args.lock_fd)  # the server's lock: released once the image is settled
    return 0


def _checkpoint(catalogue: Catalogue) -> None:
    """After the final commit: the main file alone must hold the image's row (DESIGN §8).
    The `servers snapshot` that started this worker left its own rows to this checkpoint."""
    try:
        catalogue.checkpoint()
    except BbsnapError as exc:
        print(f"checkpointing the catalogue failed: {exc}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
