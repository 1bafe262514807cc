"""The files a stored image reads: its own, then its backing chain, all inside images/.

A qcow2 header is data. A stored file whose header names a host file as its
backing file (or an external data file) would make export serve that file, and a
guest booted on it read it. Snapshot deltas legitimately have backing files: the
ancestors', in images/ too. ``qemu-img info`` reads only the one header (it does
not open the backing file), so each layer is checked before anything reads it.
"""

from __future__ import annotations

from pathlib import Path

from bbsnap.disks import qemu_img
from bbsnap.errors import CataloguePathError
from bbsnap.state.layout import DataDir

MAX_CHAIN = 256              # backing files followed before giving up (bbsnap's chains are short)
BACKING_FORMATS = ("qcow2", "raw")


def require_inside(data_dir: DataDir, image_id: str, source: Path) -> list[Path]:
    """The chain of *source* (itself first), each file inside images/; else refused."""
    inside = data_dir.images_dir.resolve()
    chain, path, fmt = [source], source, "qcow2"
    for _ in range(MAX_CHAIN):
        info = qemu_img.info(path, fmt, force_share=True)
        if info.data_file:
            raise CataloguePathError(f"image {image_id}: {path.name} names the external data "
                                     f"file {info.data_file!r}; refusing to read it")
        backing = info.raw.get("full-backing-filename") or info.backing_file
        if not backing:
            return chain
        # Absolute (qemu-img resolves a relative name against the image's directory) and
        # not a protocol or json: name; then, symlinks followed, a file in images/.
        resolved = Path(backing).resolve() if str(backing).startswith("/") else None
        if resolved is None or resolved == inside or not resolved.is_relative_to(inside):
            raise CataloguePathError(
                f"image {image_id}: {path.name} has the backing file {backing!r}, which is "
                f"not inside {data_dir.images_dir}; refusing to read it")
        if info.backing_format not in BACKING_FORMATS:
            raise CataloguePathError(f"image {image_id}: {path.name} names its backing file "
                                     "without a format; refusing to read it")
        chain.append(resolved)
        path, fmt = resolved, info.backing_format
    raise CataloguePathError(f"image {image_id}: its backing chain is longer than {MAX_CHAIN}")
