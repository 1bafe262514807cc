"""Hostile multi-disk artifacts (config format version 2), served by a registry of our own on
127.0.0.1: a disk list naming a layer twice, a layer of one disk backing another, a missing
disk, path-like disk names, a further disk naming a host file as its backing file... each is
refused by `images pull` with one error line, registers nothing, leaves no file and reads no
host byte (the checks of tests/hostile_registry.py's ``refused``)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from bbsnap.registry import artifact, layers
from tests import hostile_registry as fixtures
from tests.hostile_registry import SIZE, Served, delta, refused, sha
from tests.images import MIB, run, written_qcow2

hostile = fixtures.hostile
base = fixtures.base
secret_file = fixtures.secret_file
VDB = 8 * MIB


@pytest.fixture()
def vdb(work_dir: Path) -> Path:
    return written_qcow2(work_dir / "vdb0.qcow2", VDB, "0x7c 1M 2M")


def on(work_dir: Path, name: str, below: Path, size: int) -> Path:
    """A qcow2 delta whose backing name is the title of *below*'s layer, as pushed."""
    path = written_qcow2(work_dir / name, size, "0x3d 2M 1M", "-F", "qcow2", "-b", str(below))
    run("qemu-img", "rebase", "-u", "-F", "qcow2", "-b", layers.title(sha(below.read_bytes())),
        str(path))
    return path


def two_images(work_dir: Path, base: Path, vdb: Path, second_vdb: Path | None = None,
               claims: Path | None = None) -> list[tuple[Path, list[Any]]]:
    """base + vdb, then a delta on base + *second_vdb* (default: a delta on vdb) claiming to
    be stored on *claims* (default: vdb)."""
    primary = on(work_dir, "d1.qcow2", base, SIZE)
    second = second_vdb or on(work_dir, "vdb1.qcow2", vdb, VDB)
    return [(base, [("vdb", vdb, None)]), (primary, [("vdb", second, claims or vdb)])]


def volume_rows(data: Path) -> int:
    db = data / "catalogue.sqlite3"
    if not db.exists():
        return 0
    with sqlite3.connect(db) as conn:
        return int(conn.execute("SELECT count(*) FROM image_volumes").fetchone()[0])


def test_a_well_formed_two_disk_chain_is_pulled(bbsnap, hostile, base, vdb, work_dir):
    """The control case: what the refusals below change is all that is wrong with them."""
    hostile.publish_disks("good", two_images(work_dir, base, vdb))
    result = bbsnap("images", "pull", f"{hostile.host}/h/x:good")
    assert result.exit_code == 0, result.stderr
    assert bbsnap.rows() == 2 and volume_rows(bbsnap.data_dir) == 2


def test_disk_list_naming_a_layer_twice(bbsnap, hostile, base, vdb, work_dir):
    def twice(config: dict[str, Any]) -> None:
        config["disks"][1]["layers"] = [config["disks"][1]["layers"][0]] * 2

    hostile.publish_disks("v1", two_images(work_dir, base, vdb), edit_config=twice)
    refused(bbsnap, f"{hostile.host}/h/x:v1", "lists a layer twice")


def test_image_naming_one_disk_twice(bbsnap, hostile, base, vdb):
    def twice(config: dict[str, Any]) -> None:
        config["chain"][0]["volumes"] *= 2

    hostile.publish_disks("v1", [(base, [("vdb", vdb, None)])], edit_config=twice)
    refused(bbsnap, f"{hostile.host}/h/x:v1", "names disk vdb twice")


def test_layer_of_another_disk_as_backing(bbsnap, hostile, base, vdb, work_dir):
    """The second image's vdb is a delta on the first image's vda layer, and says so."""
    crossed = on(work_dir, "crossed.qcow2", base, VDB)
    hostile.publish_disks("v1", two_images(work_dir, base, vdb, crossed, claims=base))
    refused(bbsnap, f"{hostile.host}/h/x:v1", "not disk vdb of the image below")


def test_layer_whose_header_names_another_disks_layer(bbsnap, hostile, base, vdb, work_dir):
    """Config and annotations say vdb's layer below; the qcow2 header names vda's."""
    crossed = on(work_dir, "crossed.qcow2", base, VDB)
    hostile.publish_disks("v1", two_images(work_dir, base, vdb, crossed, claims=vdb))
    refused(bbsnap, f"{hostile.host}/h/x:v1", "backing")


def test_disk_list_missing_a_disk(bbsnap, hostile, base, vdb, work_dir):
    def drop(config: dict[str, Any]) -> None:
        del config["disks"][1]

    hostile.publish_disks("v1", two_images(work_dir, base, vdb), edit_config=drop)
    refused(bbsnap, f"{hostile.host}/h/x:v1", "misses disk vdb")


def test_disk_list_naming_a_disk_the_image_lacks(bbsnap, hostile, base, vdb):
    def extra(config: dict[str, Any]) -> None:
        config["disks"].append(dict(config["disks"][1], target="vdc"))

    hostile.publish_disks("v1", [(base, [("vdb", vdb, None)])], edit_config=extra)
    refused(bbsnap, f"{hostile.host}/h/x:v1", "which the image does not have")


@pytest.mark.parametrize("name", ["../../../etc/passwd", "vdb/../../x", "/tmp/x", "vd b", ""],
                         ids=["dot-dot", "slash-inside", "absolute", "space", "empty"])
def test_path_like_disk_names(bbsnap, hostile, base, vdb, name):
    def rename(config: dict[str, Any]) -> None:
        config["chain"][0]["volumes"][0]["target"] = name
        config["disks"][1]["target"] = name

    hostile.publish_disks("v1", [(base, [("vdb", vdb, None)])], edit_config=rename)
    refused(bbsnap, f"{hostile.host}/h/x:v1", "not a disk name")


def test_path_like_name_in_the_disk_list_only(bbsnap, hostile, base, vdb):
    def rename(config: dict[str, Any]) -> None:
        config["disks"][1]["target"] = "../vdb"

    hostile.publish_disks("v1", [(base, [("vdb", vdb, None)])], edit_config=rename)
    refused(bbsnap, f"{hostile.host}/h/x:v1", "not a disk name")


def test_layer_that_no_disk_uses(bbsnap, hostile, base, vdb, work_dir):
    stray = on(work_dir, "stray.qcow2", vdb, VDB)
    hostile.publish_disks("v1", [(base, [("vdb", vdb, None)])], extra_layers=(stray,))
    refused(bbsnap, f"{hostile.host}/h/x:v1", "belongs to no disk")


def test_further_disk_naming_a_host_file_as_backing(bbsnap, hostile, base, work_dir,
                                                    secret_file):
    crafted = delta(work_dir, "evil-vdb.qcow2", str(secret_file), fmt="raw")
    hostile.publish_disks("v1", [(base, [("vdb", crafted, None)])])
    refused(bbsnap, f"{hostile.host}/h/x:v1", "backing file")


def test_further_disk_whose_size_the_config_lies_about(bbsnap, hostile, base, vdb):
    def lie(config: dict[str, Any]) -> None:
        config["chain"][0]["volumes"][0]["virtual_size"] = VDB * 4
        config["disks"][1]["virtual_size"] = VDB * 4

    hostile.publish_disks("v1", [(base, [("vdb", vdb, None)])], edit_config=lie)
    refused(bbsnap, f"{hostile.host}/h/x:v1", "config says")


def test_format_version_that_is_not_its_media_types(bbsnap, hostile, base, vdb):
    def older(config: dict[str, Any]) -> None:
        config["bbsnap"] = 1

    hostile.publish_disks("v1", [(base, [("vdb", vdb, None)])], edit_config=older)
    refused(bbsnap, f"{hostile.host}/h/x:v1", "format version")


def test_version_1_config_listing_further_disks(bbsnap, hostile, base, vdb):
    """A v1 config may not smuggle volumes past an older puller's checks."""
    digest = hostile.publish("v1", [base], virtual_sizes=[SIZE])
    config_digest = json.loads(hostile.manifests[digest].body)["config"]["digest"]
    document = json.loads(hostile.blobs[config_digest].body)
    document["chain"][0]["volumes"] = [{"target": "vdb", "digest": sha(vdb.read_bytes()),
                                        "virtual_size": VDB, "backing": None}]
    config = json.dumps(document).encode()
    hostile.blobs[sha(config)] = Served(config)
    manifest = json.loads(hostile.manifests[digest].body)
    manifest["config"].update(digest=sha(config), size=len(config))
    hostile.serve_manifest("smuggled", json.dumps(manifest).encode(), artifact.OCI_MANIFEST)
    refused(bbsnap, f"{hostile.host}/h/x:smuggled", "version 1 config blob lists further")


def test_newer_format_is_refused_with_the_upgrade_hint(bbsnap, hostile, base, vdb):
    digest = hostile.publish_disks("v2", [(base, [("vdb", vdb, None)])])
    manifest = json.loads(hostile.manifests[digest].body)
    manifest["config"]["mediaType"] = "application/vnd.bbsnap.image.config.v3+json"
    hostile.serve_manifest("v3", json.dumps(manifest).encode(), artifact.OCI_MANIFEST)
    result = bbsnap("images", "pull", f"{hostile.host}/h/x:v3")
    assert result.exit_code == 1, result.stderr
    assert "does not read" in result.stderr and "upgrade bbsnap" in result.stderr
    assert bbsnap.rows() == 0

