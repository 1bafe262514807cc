"""What a pulled layer is stored as (bbsnap/registry/layer_store.py): a plain qcow2 layer
is kept as it was downloaded (only a delta's backing name changes, to its parent's stored
file), with no second write of its bytes; a layer carrying what a stored image must not
keep (a persistent bitmap) is written anew without it. Served by a registry of our own on
127.0.0.1, pulled by the real command, read back with the real qemu-img."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from bbsnap.registry import layers
from tests.hostile_registry import HostileRegistry, sha
from tests.images import MIB, run

SIZE = 16 * MIB
CLUSTER = 64 * 1024


@pytest.fixture()
def served() -> Iterator[HostileRegistry]:
    server = HostileRegistry().start()
    yield server
    server.stop()


def qcow2(path: Path, *, on: Path | None = None) -> Path:
    """A 16 MiB qcow2 with 2 MiB written; with *on*, a 1 MiB delta on it, which names
    *on*'s layer title as its backing file (as a pushed layer does)."""
    argv = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if on is not None:
        argv += ["-F", "qcow2", "-b", str(on)]
    run(*argv, str(path), str(SIZE))
    pattern = "0x6b 4M 1M" if on else "0x5a 0 2M"
    run("qemu-io", "-f", "qcow2", "-c", f"write -P {pattern}", str(path))
    if on is not None:
        run("qemu-img", "rebase", "-u", "-F", "qcow2", "-b",
            layers.title(sha(on.read_bytes())), str(path))
    return path


def pull(bbsnap, served: HostileRegistry, tag: str) -> list[Path]:
    result = bbsnap("images", "pull", f"{served.host}/s/x:{tag}")
    assert result.exit_code == 0, result.stderr
    stored = sorted((bbsnap.data_dir / "images").iterdir())
    assert all(p.suffix == ".qcow2" for p in stored), stored  # no partial or rewrite left
    return stored


def image_info(path: Path) -> dict:
    return json.loads(run("qemu-img", "info", "--output=json", "-f", "qcow2", str(path)))


def test_plain_base_layer_is_stored_byte_for_byte_as_it_came(bbsnap, served, work_dir):
    base = qcow2(work_dir / "base.qcow2")
    served.publish("v1", [base], virtual_sizes=[SIZE])
    [stored] = pull(bbsnap, served, "v1")
    assert sha(stored.read_bytes()) == sha(base.read_bytes())


def test_plain_delta_layer_keeps_its_clusters_and_names_its_parent(bbsnap, served,
                                                                   work_dir):
    base = qcow2(work_dir / "base.qcow2")
    top = qcow2(work_dir / "top.qcow2", on=base)
    served.publish("v1", [base, top], virtual_sizes=[SIZE, SIZE])
    stored = pull(bbsnap, served, "v1")
    by_backing = {p: image_info(p).get("backing-filename") for p in stored}
    [stored_base] = [p for p, name in by_backing.items() if name is None]
    [stored_top] = [p for p, name in by_backing.items() if name is not None]
    assert by_backing[stored_top] == stored_base.name           # relative, inside images/
    # Only the header cluster was written: every cluster after it is the layer's own.
    assert stored_top.read_bytes()[CLUSTER:] == top.read_bytes()[CLUSTER:]
    run("qemu-io", "-f", "qcow2", "-r", "-c", "read -P 0x6b 4M 1M", "-c",
        "read -P 0x5a 0 2M", str(stored_top))


def test_layer_with_a_persistent_bitmap_is_stored_without_it(bbsnap, served, work_dir):
    base = qcow2(work_dir / "base.qcow2")
    run("qemu-img", "bitmap", "--add", "-f", "qcow2", str(base), "pushed-along")
    assert image_info(base)["format-specific"]["data"].get("bitmaps")
    served.publish("v1", [base], virtual_sizes=[SIZE])
    [stored] = pull(bbsnap, served, "v1")
    assert not image_info(stored)["format-specific"]["data"].get("bitmaps")
    run("qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", str(base), str(stored))
