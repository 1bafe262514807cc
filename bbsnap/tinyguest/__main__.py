"""``python3 -m bbsnap.tinyguest {build,path}``: the image path on stdout, progress on stderr."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bbsnap.errors import BbsnapError
from bbsnap.tinyguest.build import build_tiny_guest, image_path


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python3 -m bbsnap.tinyguest",
        description="Build (once per machine) the tiny real test guest and print its path.")
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build unless cached; print the qcow2 path")
    build.add_argument("--force", action="store_true", help="rebuild even if cached")
    path = sub.add_parser("path", help="print where the qcow2 is or would be")
    for command in (build, path):
        command.add_argument("--cache-dir", type=Path, default=None,
                             help="cache directory (default: $BBSNAP_CACHE, "
                                  "/var/cache/bbsnap for root, else ~/.cache/bbsnap)")
    return parser


def _progress(message: str) -> None:
    print(f"tiny-guest: {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "build":
            result = build_tiny_guest(args.cache_dir, force=args.force, progress=_progress)
        else:
            result = image_path(args.cache_dir)
    except BbsnapError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    print(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
