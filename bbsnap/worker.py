"""Background workers: ``python -m bbsnap.worker finish-snapshot IMG``.

Started detached by ``servers snapshot`` (and by crash recovery to adopt an
orphaned copy); writes only to its log file in ``DATA/logs/``.
"""

from __future__ import annotations

import argparse
import sys
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from .errors import BbsnapError

if TYPE_CHECKING:
    from .catalogue import Catalogue


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bbsnap-worker")
    parser.add_argument("--data-dir")
    parser.add_argument("--connect")
    sub = parser.add_subparsers(dest="command", required=True)
    finish = sub.add_parser("finish-snapshot")
    finish.add_argument("image_id")
    finish.add_argument("--lock-fd", type=int, help="the server lock inherited from the caller")
    args = parser.parse_args(argv)

    from .catalogue import Catalogue
    from .config import load_settings
    from .hypervisor.libvirt_adapter import LibvirtHypervisor
    from .layout import DataDir
    from .services.snapshot_finish import SnapshotFinisher

    settings = load_settings({"data_dir": args.data_dir, "connect": args.connect})
    data_dir = DataDir.from_settings(settings).ensure()
    catalogue = Catalogue(data_dir.catalogue_path, images_dir=data_dir.images_dir)
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    print(f"{stamp} finishing snapshot {args.image_id}", flush=True)
    try:
        finisher = SnapshotFinisher(catalogue, data_dir,
                                    lambda: LibvirtHypervisor(settings.connect))
        image = finisher.run(args.image_id)
    except BbsnapError as exc:
        print(f"{stamp} snapshot {args.image_id} failed: {exc}", flush=True)
        return 1
    finally:
        _checkpoint(catalogue)
        catalogue.close()
    print(f"{datetime.now(timezone.utc).isoformat(timespec='seconds')} snapshot {image.id} is "
          f"{image.status.value}", flush=True)
    return 0  # the inherited lock (--lock-fd) is released when this process exits


def _checkpoint(catalogue: Catalogue) -> None:
    """After the final commit: the main file alone must hold the image's row (DESIGN §8).
    The `servers snapshot` that started this worker left its own rows to this checkpoint."""
    try:
        catalogue.checkpoint()
    except BbsnapError as exc:
        print(f"checkpointing the catalogue failed: {exc}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
