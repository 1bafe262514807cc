"""Multi-disk images through a real registry (Debian's docker-registry on 127.0.0.1): one
layer chain per disk, pulled back as volume rows with equal content per disk, a second push
sending only what changed (bytes counted by a proxy in front of the registry), a connection
cut inside a further disk's layer resumed, a pull killed there recovered."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import time
from pathlib import Path

from tests import registry as fixtures
from tests.conftest import Bbsnap
from tests.disk import multi_disk, prune_chain
from tests.registry import CuttingProxy, statuses

registry = fixtures.registry
MIB = 1 << 20
NEVER = 1 << 62          # a CuttingProxy that only counts


def volumes(data: Path) -> dict[str, list[tuple[str, str]]]:
    with sqlite3.connect(data / "catalogue.sqlite3") as db:
        found: dict[str, list[tuple[str, str]]] = {}
        for image_id, device, path in db.execute(
                "SELECT image_id, device, path FROM image_volumes ORDER BY image_id, device"):
            found.setdefault(image_id, []).append((device, path))
        return found


def images(data: Path) -> dict[str, dict[str, object]]:
    with sqlite3.connect(data / "catalogue.sqlite3") as db:
        db.row_factory = sqlite3.Row
        return {r["id"]: dict(r) for r in db.execute("SELECT * FROM images")}


def walk(data: Path, top: str) -> list[dict[str, object]]:
    """The pulled chain from its base to *top*."""
    rows, out, current = images(data), [], top
    while current is not None:
        out.append(rows[current])
        current = rows[current]["parent_id"]  # type: ignore[assignment]
    return list(reversed(out))


def skopeo(*args: str) -> dict[str, object]:
    done = subprocess.run(["skopeo", "inspect", "--tls-verify=false", *args], check=True,
                          capture_output=True, text=True)
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def same_disks(chain: multi_disk.MultiChain, data: Path, top: str) -> None:
    """Every image of the pulled chain shows what the pushed one does, disk by disk."""
    pulled = walk(data, top)
    assert len(pulled) == 1 + len(chain.snapshots)
    for original, copy in zip([chain.base, *chain.snapshots], pulled, strict=True):
        assert prune_chain.same(chain.file(original), data / "images" / str(copy["path"]))
        if original == chain.base:
            assert str(copy["id"]) not in volumes(data)
            continue
        (device, name), = volumes(data)[str(copy["id"])]
        assert device == "vdb"
        assert prune_chain.same(chain.file(original, "vdb"), data / "images" / name), original


def test_two_disk_chain_round_trip_per_disk_and_no_op_again(work_dir, registry):
    chain = multi_disk.build(work_dir / "a", vdb=("standalone", "delta"))
    source, target = Bbsnap(work_dir / "a"), Bbsnap(work_dir / "b")
    ref = f"{registry.host}/multi/devbox:v1"
    pushed = source("images", "push", chain.snapshots[-1], ref)
    assert pushed.exit_code == 0, pushed.stderr

    # What a standard tool sees: the version 2 config, every layer named by its disk.
    raw = skopeo("--raw", f"docker://{ref}")
    assert raw["config"]["mediaType"] == "application/vnd.bbsnap.image.config.v2+json"  # type: ignore[index]
    layers = raw["layers"]
    assert isinstance(layers, list) and len(layers) == 5  # 3 of vda, 2 of vdb
    disks = [layer["annotations"]["dev.bbsnap.disk"] for layer in layers]
    assert disks == ["vda", "vda", "vda", "vdb", "vdb"]
    config = skopeo("--raw", "--config", f"docker://{ref}")
    assert config["bbsnap"] == 2
    listed = config["disks"]
    assert isinstance(listed, list)
    assert [(d["target"], d["virtual_size"], len(d["layers"])) for d in listed] == [
        ("vda", multi_disk.SIZE, 3), ("vdb", multi_disk.VDB_SIZE, 2)]
    assert listed[1]["layers"] == [layers[3]["digest"], layers[4]["digest"]]
    assert layers[4]["annotations"]["dev.bbsnap.backing"] == \
        layers[3]["annotations"]["org.opencontainers.image.title"]

    pulled = target("images", "pull", ref)
    assert pulled.exit_code == 0, pulled.stderr
    top = pulled.stdout.strip()
    same_disks(chain, work_dir / "b", top)
    rows = walk(work_dir / "b", top)
    assert all(r["status"] == "available" for r in rows)
    # The delta vdb is stored on the pulled image below's vdb, named relatively.
    (_device, name), = volumes(work_dir / "b")[top]
    info = json.loads(prune_chain.run("qemu-img", "info", "--output=json",
                                      str(work_dir / "b" / "images" / name)))
    assert info["backing-filename"] == f"{rows[1]['id']}-vdb.qcow2"
    shown = json.loads(target("images", "show", top, "--format", "json").stdout)
    assert [v["device"] for v in shown["volumes"]] == ["vdb"]

    again = target("images", "pull", ref)
    assert again.exit_code == 0 and again.stdout.strip() == top, again.stderr
    assert "already image" in again.stderr
    assert len(images(work_dir / "b")) == 3
    # Pushed on from here, every disk's layer is known by what it was pulled as: none is sent.
    relay = target("images", "push", top, f"{registry.host}/multi/devbox:relay")
    assert relay.exit_code == 0, relay.stderr
    assert "uploaded (" not in relay.stderr and relay.stderr.count(" present") == 5
    fixtures.doctor_finds_nothing(target)


def test_single_disk_images_keep_the_version_1_format(work_dir, registry):
    """Older bbsnap reads these: a single-disk chain is pushed exactly as before."""
    chain = prune_chain.build(work_dir / "a")
    ref = f"{registry.host}/multi/single:v1"
    assert Bbsnap(work_dir / "a")("images", "push", chain.snapshots[0], ref).exit_code == 0
    raw = skopeo("--raw", f"docker://{ref}")
    assert raw["config"]["mediaType"] == "application/vnd.bbsnap.image.config.v1+json"  # type: ignore[index]
    assert all("dev.bbsnap.disk" not in layer["annotations"]
               for layer in raw["layers"])  # type: ignore[union-attr]
    config = skopeo("--raw", "--config", f"docker://{ref}")
    assert config["bbsnap"] == 1 and "disks" not in config
    assert all("volumes" not in entry for entry in config["chain"])  # type: ignore[union-attr]


def test_second_push_uploads_only_the_changed_disks_layers(work_dir, registry):
    """snap 1's vdb did not change (a copy byte for byte of snap 0's, as bbsnap stores an
    unchanged further disk) and snap 2's is a delta: pushing snap 2 after snap 0 sends the
    two new vda deltas and snap 2's vdb delta, counted by a proxy, not the base, not snap 0's
    layers and not snap 1's vdb (the registry has it)."""
    chain = multi_disk.build(work_dir / "a", vdb=("standalone", "same", "delta"))
    source = Bbsnap(work_dir / "a")
    proxy = CuttingProxy(registry.port, NEVER, upstream=True)
    try:
        first = source("images", "push", chain.snapshots[0], f"{proxy.host}/multi/delta:s0")
        assert first.exit_code == 0, first.stderr
        before = proxy.counted
        second = source("images", "push", chain.snapshots[2], f"{proxy.host}/multi/delta:s2")
        assert second.exit_code == 0, second.stderr
        sent = proxy.counted - before
    finally:
        proxy.close()
    new = [chain.file(chain.snapshots[1]), chain.file(chain.snapshots[2]),
           chain.file(chain.snapshots[2], "vdb")]
    new_bytes = sum(p.stat().st_size for p in new)
    unchanged_vdb = chain.file(chain.snapshots[1], "vdb").stat().st_size
    # The new layers, a config blob, a manifest and the HTTP around them.
    assert new_bytes <= sent <= new_bytes + 64 * 1024, (sent, new_bytes)
    assert unchanged_vdb > 4 * MIB  # what would have gone up again
    assert [x for x in second.stderr.splitlines()
            if f"{chain.snapshots[1]} vdb: layer" in x][0].split()[4] == "present", second.stderr
    # Pulled elsewhere, both snapshots get the shared layer as their own vdb file: fetched
    # once (bytes counted by a proxy), copied for the second.
    reader = CuttingProxy(registry.port, NEVER, upstream=False)
    try:
        pulled = Bbsnap(work_dir / "b")("images", "pull", f"{reader.host}/multi/delta:s2")
    finally:
        reader.close()
    assert pulled.exit_code == 0, pulled.stderr
    same_disks(chain, work_dir / "b", pulled.stdout.strip())
    distinct = sum(chain.file(i).stat().st_size for i in [chain.base, *chain.snapshots]) + sum(
        chain.file(chain.snapshots[i], "vdb").stat().st_size for i in (0, 2))
    assert distinct <= reader.counted <= distinct + 64 * 1024, (reader.counted, distinct)
    copies = [x for x in pulled.stderr.splitlines() if "copying layer" in x]
    assert len(copies) == 1 and copies[0].endswith(" vdb"), pulled.stderr


def pushed_two_disks(data: Path, ref: str) -> multi_disk.MultiChain:
    """A chain whose snapshot has a standalone vdb, built in *data* and pushed as *ref*."""
    chain = multi_disk.build(data, vdb=("standalone",))
    assert Bbsnap(data)("images", "push", chain.snapshots[0], ref).exit_code == 0
    return chain


def before_vdb(chain: multi_disk.MultiChain) -> int:
    """The bytes of the download before the vdb layer's (it comes last): a cut past this
    falls inside it."""
    return sum(chain.file(i).stat().st_size for i in (chain.base, chain.snapshots[0]))


def test_pull_resumes_a_connection_cut_inside_a_further_disk(work_dir, registry):
    chain = pushed_two_disks(work_dir / "a", f"{registry.host}/multi/cut:v1")
    pulled = fixtures.pull_through_a_cut(registry, work_dir / "b", "multi/cut:v1",
                                         before_vdb(chain) + 3 * MIB)
    same_disks(chain, work_dir / "b", pulled)


def test_pull_killed_inside_a_further_disk_is_recovered(work_dir, registry):
    chain = pushed_two_disks(work_dir / "a", f"{registry.host}/multi/killed:v1")
    target = Bbsnap(work_dir / "b")
    with fixtures.stalled_pull(registry, work_dir / "b", "multi/killed:v1",
                               before_vdb(chain) + 3 * MIB):
        # The proxy has sent the bytes up to the stall; the pull is still vetting and
        # publishing the first disk's layers when it gets there: wait for its vdb file.
        deadline = time.monotonic() + 60
        while not list((work_dir / "b" / "images").glob("*-vdb.qcow2.partial")):
            assert time.monotonic() < deadline, list((work_dir / "b" / "images").iterdir())
            time.sleep(0.05)
        # The image's first disk is in place, its vdb half-way: nothing is available yet.
        assert set(statuses(work_dir / "b")) == {"creating"}
    fixtures.recover(target)
    assert "available" not in statuses(work_dir / "b")
    assert not volumes(work_dir / "b"), "a volume row of the killed pull was left"
    assert not list((work_dir / "b" / "images").glob("img-*")), "files of the killed pull"
    pulled = fixtures.pull(target, f"{registry.host}/multi/killed:v1")
    same_disks(chain, work_dir / "b", pulled)
    fixtures.doctor_finds_nothing(target)


def test_containerdisk_of_a_multi_disk_image_is_refused(work_dir, registry):
    """A KubeVirt containerDisk holds one disk: refused with one line, nothing pushed."""
    chain = multi_disk.build(work_dir / "a", vdb=("standalone",))
    blobs = registry.blob_files()
    result = Bbsnap(work_dir / "a")("images", "push", "--containerdisk", chain.snapshots[0],
                                    f"{registry.host}/multi/kubevirt:v1")
    assert result.exit_code == 1, result.stderr
    errors = [x for x in result.stderr.splitlines() if x.startswith("bbsnap: error:")]
    assert len(errors) == 1 and "a containerDisk holds one" in errors[0], result.stderr
    assert registry.blob_files() == blobs


def test_push_refuses_a_disk_stored_on_another_disks_file(work_dir, registry):
    """A vdb whose backing file is not the image below's vdb (here: its first disk) is not
    what the catalogue says: refused with one line before anything is sent."""
    chain = multi_disk.build(work_dir / "a", vdb=("standalone", "delta"))
    prune_chain.run("qemu-img", "rebase", "-u", "-F", "qcow2", "-b", f"{chain.snapshots[0]}.qcow2",
                    str(chain.file(chain.snapshots[1], "vdb")))
    blobs = registry.blob_files()
    result = Bbsnap(work_dir / "a")("images", "push", chain.snapshots[1],
                                    f"{registry.host}/multi/crossed:v1")
    assert result.exit_code == 1, result.stderr
    errors = [x for x in result.stderr.splitlines() if x.startswith("bbsnap: error:")]
    assert len(errors) == 1 and "not disk vdb of the image below" in errors[0], result.stderr
    assert registry.blob_files() == blobs
