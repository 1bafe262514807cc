"""A multi-disk snapshot chain built by hand with real qemu-img files, as bbsnap stores one:
a single-disk base image, then snapshots whose first disk is a delta on the one before and
whose further disk (vdb) is a standalone file or a delta on the snapshot before's vdb,
registered through the catalogue's own API (``Catalogue.finish_snapshot`` with volumes, as
the snapshot worker does)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from bbsnap.models import Image, ImageStatus, ImageType, ImageVolume
from bbsnap.state.catalogue import Catalogue
from bbsnap.state.layout import DataDir
from tests.disk.prune_chain import MIB, START, run

SIZE = 32 * MIB          # the first disk
VDB_SIZE = 24 * MIB      # the further disk


@dataclass
class MultiChain:
    data: DataDir
    base: str
    snapshots: list[str]            # oldest first

    def file(self, image_id: str, disk: str = "vda") -> Path:
        name = f"{image_id}.qcow2" if disk == "vda" else f"{image_id}-{disk}.qcow2"
        return self.data.images_dir / name


def build(root: Path, vdb: tuple[str, ...] = ("standalone", "delta")) -> MultiChain:
    """The base and one snapshot per item of *vdb*: how that snapshot stores its vdb
    ("standalone": its own data; "delta": on the previous snapshot's vdb; "same": a
    byte-for-byte copy of the previous snapshot's standalone vdb, as an unchanged disk)."""
    data = DataDir(root).ensure()
    catalogue = Catalogue(data.catalogue_path)
    base = "img-mbase"
    base_file = data.images_dir / f"{base}.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(base_file), str(SIZE))
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x01 0 12M", str(base_file))
    catalogue.add(Image(id=base, type=ImageType.UPLOAD, owner="local", created_at=START,
                        status=ImageStatus.AVAILABLE, name="base", path=base_file.name,
                        virtual_size=SIZE))
    chain = MultiChain(data, base, [])
    parent = base
    for index, how in enumerate(vdb):
        image_id = f"img-msn{index:02d}"
        primary = chain.file(image_id)
        run("qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", f"{parent}.qcow2",
            str(primary))
        run("qemu-io", "-f", "qcow2", "-c", f"write -P 0x{0x21 + index:02x} {index * 2}M 3M",
            str(primary))
        disk = chain.file(image_id, "vdb")
        if how == "standalone":
            run("qemu-img", "create", "-q", "-f", "qcow2", str(disk), str(VDB_SIZE))
            run("qemu-io", "-f", "qcow2", "-c", f"write -P 0x{0x51 + index:02x} 1M 6M",
                str(disk))
        elif how == "delta":
            run("qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b",
                f"{parent}-vdb.qcow2", str(disk))
            run("qemu-io", "-f", "qcow2", "-c", f"write -P 0x{0x61 + index:02x} 4M 2M",
                str(disk))
        else:
            shutil.copyfile(chain.file(parent, "vdb"), disk)
        catalogue.add(Image(id=image_id, type=ImageType.SNAPSHOT, owner="local",
                            created_at=START + timedelta(hours=index + 1),
                            status=ImageStatus.CREATING, name=f"msnap {index}",
                            virtual_size=SIZE, ancestor_id=base, parent_id=parent,
                            source_server="srv-multi"), depends_on=parent)
        catalogue.finish_snapshot(image_id, [ImageVolume("vdb", disk.name, VDB_SIZE,
                                                         disk.stat().st_size)],
                                  status=ImageStatus.AVAILABLE, path=primary.name)
        chain.snapshots.append(image_id)
        parent = image_id
    catalogue.close()
    return chain
