"""Prune's merge with real qemu-img chains: every remaining image keeps exactly its content
(`qemu-img compare`), removed snapshots' data moves into the later ones, files a reader has
open are never written in place, and a prune killed mid-merge is recovered."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bbsnap.state.layout import FILE_MODE
from bbsnap.models import DependentKind
from bbsnap.services.retention import Policy
from tests.disk import prune_chain
from tests.disk.prune_chain import SERVER, Chain, build, prune, references, same


def backing(path: Path) -> str | None:
    info = json.loads(prune_chain.run("qemu-img", "info", "-U", "--output=json", str(path)))
    return info.get("backing-filename")


def rows(chain: Chain) -> dict[str, tuple[str, str | None]]:
    catalogue = chain.catalogue()
    try:
        return {i: (catalogue.get(i, include_deleted=True).status.value,
                    catalogue.get(i, include_deleted=True).parent_id)
                for i in [chain.base, *chain.snapshots]}
    finally:
        catalogue.close()


def assert_unchanged(chain: Chain, refs: dict[str, Path]) -> None:
    for image_id, state in rows(chain).items():
        if state[0] != "deleted":
            assert same(chain.file(image_id), refs[image_id]), f"{image_id} changed"


def sha(fd: int) -> str:
    digest = hashlib.sha256()
    os.lseek(fd, 0, os.SEEK_SET)
    while block := os.read(fd, 1 << 20):
        digest.update(block)
    return digest.hexdigest()


def test_removed_snapshots_are_merged_into_the_newest_which_keeps_its_content(work_dir):
    chain = build(work_dir / "data")
    refs = references(chain, work_dir / "refs")
    s0, s1, s2, s3 = chain.snapshots
    # A reader (as a running QEMU) holding the newest file and its parent open.
    held = {i: os.open(chain.file(i), os.O_RDONLY) for i in (s2, s3)}
    before = {i: sha(fd) for i, fd in held.items()}

    report = prune(chain.data.root, Policy(last=1))

    assert [(d.image.id, d.keep) for d in report.decisions] == [
        (s3, True), (s2, False), (s1, False), (s0, False)]
    assert report.decisions[0].reasons == ["newest", "last"]
    assert report.decisions[1].merged_into == [s3]
    # Oldest first: each removed snapshot's child was rewritten onto the base in turn.
    assert rows(chain) == {chain.base: ("available", None), s0: ("deleted", chain.base),
                           s1: ("deleted", chain.base), s2: ("deleted", chain.base),
                           s3: ("available", chain.base)}
    assert_unchanged(chain, refs)
    assert backing(chain.file(s3)) == f"{chain.base}.qcow2"  # relative, as bbsnap stores it
    assert not any(chain.file(i).exists() for i in (s0, s1, s2))
    # The open files were never written: same bytes, and the path names a new inode.
    for image_id, fd in held.items():
        assert sha(fd) == before[image_id]
        os.close(fd)
    assert os.stat(chain.file(s3)).st_mode & 0o777 == FILE_MODE
    catalogue = chain.catalogue()
    assert [d.dependent_id for d in catalogue.dependents(chain.base)] == [s3]
    catalogue.close()
    assert not list(chain.data.images_dir.glob("*.merge")) and \
        not list(chain.data.tmp_dir.glob("prune.*"))


def test_snapshots_used_as_a_base_are_kept_and_named(work_dir):
    chain = build(work_dir / "data")
    refs = references(chain, work_dir / "refs")
    s0, s1, s2, s3 = chain.snapshots
    prune_chain.hold(chain, s1, DependentKind.SERVER, "srv-clone")  # a clone runs on s1

    report = prune(chain.data.root, Policy(last=1))

    decided = {d.image.id: d for d in report.decisions}
    assert decided[s1].keep and decided[s1].reasons == ["base of server srv-clone"]
    assert not decided[s0].keep and decided[s0].merged_into == [s1]
    assert not decided[s2].keep and decided[s2].merged_into == [s3]
    assert rows(chain)[s1] == ("available", chain.base)
    assert rows(chain)[s3] == ("available", s1)
    assert backing(chain.file(s3)) == f"{s1}.qcow2"
    assert_unchanged(chain, refs)


def test_an_image_of_another_server_stored_on_a_snapshot_keeps_it(work_dir):
    chain = build(work_dir / "data")
    s0 = chain.snapshots[0]
    prune_chain.hold(chain, s0, DependentKind.IMAGE, "img-other")
    report = prune(chain.data.root, Policy(last=1))
    decided = {d.image.id: d for d in report.decisions}
    assert decided[s0].keep and decided[s0].reasons == ["base of image img-other"]


def test_a_standalone_first_snapshot_makes_its_child_standalone(work_dir):
    chain = build(work_dir / "data", standalone_first=True)
    refs = references(chain, work_dir / "refs")
    s0, s1, _, _ = chain.snapshots
    assert backing(chain.file(s0)) is None
    prune(chain.data.root, Policy(last=3))
    assert rows(chain)[s0][0] == "deleted" and rows(chain)[s1] == ("available", None)
    assert backing(chain.file(s1)) is None
    assert_unchanged(chain, refs)


def test_a_dry_run_changes_nothing(work_dir):
    chain = build(work_dir / "data")
    before = {p.name: p.stat().st_ino for p in chain.data.images_dir.iterdir()}
    report = prune(chain.data.root, Policy(last=2), dry_run=True)
    assert [d.keep for d in report.decisions] == [True, True, False, False]
    assert report.decisions[2].merged_into == [chain.snapshots[2]]
    assert {p.name: p.stat().st_ino for p in chain.data.images_dir.iterdir()} == before
    assert all(state[0] == "available" for state in rows(chain).values())


def test_other_servers_snapshots_are_not_touched(work_dir):
    chain = build(work_dir / "data")
    report = prune(chain.data.root, Policy(last=1), server="srv-other")
    assert report.decisions == []
    assert all(state[0] == "available" for state in rows(chain).values())


def test_pruning_without_a_rule_is_refused(bbsnap):
    result = bbsnap("servers", "prune", "srv-abcde")
    assert result.exit_code == 2 and "no retention rule" in result.stderr


def _prune_process(chain: Chain, *extra: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    return subprocess.Popen([sys.executable, "-m", "tests.disk.prune_chain", str(chain.data.root),
                             SERVER, "1", *extra], env=env, cwd=env["PYTHONPATH"])


def _recover(chain: Chain) -> None:
    from bbsnap.services.prune import recover_interrupted_prunes

    catalogue = chain.catalogue()
    try:
        recover_interrupted_prunes(catalogue, chain.data)
    finally:
        catalogue.close()


def _consistent(chain: Chain, refs: dict[str, Path]) -> None:
    """Nothing lost, nothing half-merged: every file left shows what it did, its header
    names the parent its row says, and no merge work file is left."""
    assert_unchanged(chain, refs)
    for image_id, (status, parent) in rows(chain).items():
        if status != "deleted" and image_id != chain.base:
            assert backing(chain.file(image_id)) == f"{parent}.qcow2", image_id
    assert not list(chain.data.images_dir.glob("*.merge"))
    assert not list(chain.data.tmp_dir.glob("prune.*"))


def test_sigkill_during_the_merge_copy_is_recovered(work_dir):
    chain = build(work_dir / "data", scale=16)  # a rebase long enough to be caught
    refs = references(chain, work_dir / "refs")
    process = _prune_process(chain)
    deadline = time.monotonic() + 60
    while not list(chain.data.images_dir.glob("*.merge")):
        assert process.poll() is None and time.monotonic() < deadline, "no merge seen"
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    # qemu-img, its child, may still be finishing its write into the work file.
    time.sleep(0.5)
    _recover(chain)
    _consistent(chain, refs)
    assert rows(chain)[chain.snapshots[1]][0] == "available"  # not removed half-way
    prune(chain.data.root, Policy(last=1))  # and the next prune completes
    _consistent(chain, refs)
    assert [s for s, (status, _) in rows(chain).items() if status == "available"] == [
        chain.base, chain.snapshots[3]]


def test_sigkill_right_after_the_rename_is_recovered(work_dir):
    chain = build(work_dir / "data")
    refs = references(chain, work_dir / "refs")
    s0, s1 = chain.snapshots[:2]
    process = _prune_process(chain, "--die-at-commit")
    assert process.wait() == -signal.SIGKILL
    assert backing(chain.file(s1)) == f"{chain.base}.qcow2"  # renamed: the new file
    assert rows(chain)[s1] == ("available", s0)              # not recorded yet
    _recover(chain)
    assert rows(chain)[s1] == ("available", chain.base)
    _consistent(chain, refs)
    prune(chain.data.root, Policy(last=1))
    _consistent(chain, refs)


@pytest.mark.parametrize("keep", [2, 3])
def test_partial_prunes_keep_every_remaining_image(work_dir, keep):
    chain = build(work_dir / "data")
    refs = references(chain, work_dir / "refs")
    prune(chain.data.root, Policy(last=keep))
    _consistent(chain, refs)
    assert sum(status == "available" for status, _ in rows(chain).values()) == keep + 1


def test_doctor_leaves_a_running_prunes_work_files_alone(work_dir):
    from bbsnap import safe_files
    from bbsnap.state.process_tokens import current_job_token
    from bbsnap.services import reclaim

    chain = build(work_dir / "data")
    temp = chain.data.images_dir / "img-snap3.qcow2.0123456789abcdef.merge"
    temp.write_bytes(b"half a merge")
    journal = chain.data.tmp_dir / f"prune.{current_job_token()}.journal"  # alive: ours
    safe_files.write_atomic(journal, json.dumps({"child": "img-snap3", "pruned": "img-snap2",
                                                 "pruned_file": "img-snap2.qcow2",
                                                 "new_parent": "img-snap1",
                                                 "temp": temp.name}).encode())
    catalogue = chain.catalogue()
    try:
        found = reclaim.survey(chain.data, catalogue, "qemu:///system", list)
        assert not {o.path for o in found.orphans} & {temp, journal}
        _recover(chain)  # a live prune's journal is not recovery's either
        assert temp.exists() and journal.exists()
    finally:
        catalogue.close()
    journal.unlink()
    temp.unlink()
