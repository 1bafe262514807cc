"""Interrupted transfers: a connection cut mid-blob (by a proxy in front of the real
registry) is resumed, and a push or pull killed with SIGKILL mid-blob is recovered by the
next command.

A pull resumes a cut blob with ``Range`` from the byte it got to. A push asks the
registry how much of the upload it holds; distribution 2.8 answers that for an upload
whose last chunk was cut mid-way by dropping the session (its size no longer matches the
state it signed), so there the cut blob starts over while every blob finished before is
not sent again: what these tests check against the real registry."""

from __future__ import annotations

import io
import signal
from pathlib import Path

from bbsnap.registry import layers, reference
from bbsnap.registry.client import RegistryClient
from bbsnap.registry.uploads import UploadJournal
from tests.conftest import Bbsnap
from tests.disk import prune_chain
from tests import registry as fixtures
from tests.registry import CuttingProxy, start_cli, statuses

registry = fixtures.registry
MIB = 1 << 20
CHUNK = {"BBSNAP_REGISTRY_CHUNK_SIZE": str(4 * MIB)}


def uploaded(stderr: str) -> int:
    line = [x for x in stderr.splitlines() if x.endswith("bytes uploaded)")][-1]
    return int(line.rsplit("(", 1)[1].split()[0])


def same_chain(chain: prune_chain.Chain, data: Path, top: str) -> None:
    assert prune_chain.same(chain.file(chain.snapshots[-1]), data / "images" / f"{top}.qcow2")


def pushed_chain(data: Path, ref: str) -> prune_chain.Chain:
    """A chain built in *data*, pushed (its snapshot 3 on top) as *ref* straight to the
    registry: what the pull tests fetch back."""
    chain = prune_chain.build(data)
    assert Bbsnap(data)("images", "push", chain.snapshots[3], ref).exit_code == 0
    return chain


def test_push_resumes_after_the_connection_is_cut_mid_blob(work_dir, registry):
    chain = prune_chain.build(work_dir / "a")
    proxy = CuttingProxy(registry.port, 10 * MIB + 12345, upstream=True)
    try:
        pushed = Bbsnap(work_dir / "a", env=CHUNK)(
            "images", "push", chain.snapshots[3], f"{proxy.host}/faults/push:v1")
    finally:
        proxy.close()
    assert pushed.exit_code == 0, pushed.stderr
    assert proxy.cuts == 1
    total = sum(chain.file(i).stat().st_size for i in [chain.base, *chain.snapshots])
    # Only the blob that was cut is sent again (from where distribution lets it resume):
    # beyond the chain's bytes, what went out before the cut, the chunk in flight, and one
    # more chunk: distribution may still report the last whole chunk as held when asked
    # (its handler of the cut PATCH has not yet run to the end), then refuse the PATCH that
    # resumes there once it has, and the blob starts over. Seen once in CI (16 MiB extra).
    assert uploaded(pushed.stderr) <= total + 10 * MIB + 12345 + 2 * 4 * MIB + 64 * 1024
    pulled = fixtures.pull(Bbsnap(work_dir / "b"), f"{registry.host}/faults/push:v1")
    same_chain(chain, work_dir / "b", pulled)


def test_pull_resumes_after_the_connection_is_cut_mid_blob(work_dir, registry):
    chain = pushed_chain(work_dir / "a", f"{registry.host}/faults/pull:v1")
    pulled = fixtures.pull_through_a_cut(registry, work_dir / "b", "faults/pull:v1",
                                         20 * MIB + 999)
    same_chain(chain, work_dir / "b", pulled)


def test_push_killed_mid_blob_resumes_on_the_next_push(work_dir, registry):
    chain = prune_chain.build(work_dir / "a")
    base_size = chain.file(chain.base).stat().st_size
    # Stalled (then killed) inside the second layer: the base's upload had finished.
    proxy = CuttingProxy(registry.port, base_size + 6 * MIB, upstream=True, stall=True)
    ref = f"{proxy.host}/faults/killed-push:v1"
    try:
        process = start_cli(work_dir / "a", "images", "push", chain.snapshots[3], ref, env=CHUNK)
        assert proxy.stalled.wait(120), "the push never got that far"
        process.send_signal(signal.SIGKILL)
        process.communicate(timeout=60)
        proxy.release()
        journals = list((work_dir / "a" / "registry" / "uploads").glob("*.json"))
        assert journals, "the killed push left no upload journal"
        again = Bbsnap(work_dir / "a", env=CHUNK)("images", "push", chain.snapshots[3], ref)
    finally:
        proxy.close()
    assert again.exit_code == 0, again.stderr
    total = sum(chain.file(i).stat().st_size for i in [chain.base, *chain.snapshots])
    # The base is not sent again; the killed layer's upload is taken up or started over.
    base_line = [x for x in again.stderr.splitlines() if "img-base0: layer" in x]
    assert base_line and base_line[0].endswith("present"), again.stderr
    assert uploaded(again.stderr) <= total - base_size + 64 * 1024
    assert not list((work_dir / "a" / "registry" / "uploads").glob("*.json"))
    pulled = fixtures.pull(Bbsnap(work_dir / "b"), f"{registry.host}/faults/killed-push:v1")
    same_chain(chain, work_dir / "b", pulled)


def test_a_journalled_session_refused_further_on_is_redone_in_a_fresh_one(work_dir, registry):
    """What a killed push's half-sent PATCH can leave when it reaches the registry after the
    next push asked for the session's status: a session the registry holds at the size the
    journal expects, with other bytes in it. Distribution refuses the closing PUT (digest
    mismatch); the push must send the blob again in a new session, not fail."""
    chain = prune_chain.build(work_dir / "a")
    ref = reference.parse(f"{registry.host}/faults/stale-session:v1")
    source = layers.open_layer(chain.file(chain.base), None)
    try:
        digest = source.digest()
    finally:
        source.close()
    client = RegistryClient(ref, scopes=[f"repository:{ref.repository}:pull,push"],
                            chunk_size=4 * MIB)
    try:
        location = client.start_upload()
        location, held = client.patch(location, lambda _offset: io.BytesIO(bytes(4 * MIB)),
                                      0, 4 * MIB)
        UploadJournal(work_dir / "a" / "registry" / "uploads").save(client, digest, location)
    finally:
        client.close()
    assert held == 4 * MIB
    pushed = Bbsnap(work_dir / "a", env=CHUNK)("images", "push", chain.snapshots[3], str(ref))
    assert pushed.exit_code == 0, pushed.stderr
    base_line = [x for x in pushed.stderr.splitlines() if "img-base0: layer" in x]
    assert base_line and "uploaded" in base_line[0], pushed.stderr
    assert not list((work_dir / "a" / "registry" / "uploads").glob("*.json"))
    same_chain(chain, work_dir / "b", fixtures.pull(Bbsnap(work_dir / "b"), str(ref)))


def test_pull_killed_mid_blob_is_recovered_by_the_next_command(work_dir, registry):
    chain = pushed_chain(work_dir / "a", f"{registry.host}/faults/killed-pull:v1")
    target = Bbsnap(work_dir / "b")
    with fixtures.stalled_pull(registry, work_dir / "b", "faults/killed-pull:v1", 20 * MIB):
        assert "creating" in statuses(work_dir / "b")
        # The layer streams straight into images/ (no work file): that is what is left.
        assert list((work_dir / "b" / "images").glob("*.qcow2.partial"))
    fixtures.recover(target)
    assert not list((work_dir / "b" / "images").glob("*.partial"))
    pulled = fixtures.pull(target, f"{registry.host}/faults/killed-pull:v1")
    same_chain(chain, work_dir / "b", pulled)
    fixtures.doctor_finds_nothing(target)
