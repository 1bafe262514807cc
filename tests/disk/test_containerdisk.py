"""`images push --containerdisk`: a standard container image KubeVirt boots, checked with
Debian's skopeo (what the registry serves) and umoci (the unpacked filesystem): one layer,
/disk/<id>.qcow2 owned by 107:107 with mode 0440, holding the image's flattened disk."""

from __future__ import annotations

import json
import os
import stat
import subprocess

from tests import registry as fixtures
from tests.conftest import Bbsnap
from tests.disk import prune_chain

registry = fixtures.registry


def run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def test_containerdisk_layout_seen_by_skopeo_and_umoci(work_dir, registry):
    chain = prune_chain.build(work_dir / "a")
    top = chain.snapshots[3]
    ref = f"{registry.host}/kubevirt/devbox:cd"
    pushed = Bbsnap(work_dir / "a")("images", "push", top, ref, "--containerdisk")
    assert pushed.exit_code == 0, pushed.stderr
    digest = pushed.stdout.strip()

    inspect = json.loads(run("skopeo", "inspect", "--tls-verify=false", f"docker://{ref}"))
    assert inspect["Digest"] == digest
    assert len(inspect["Layers"]) == 1
    assert inspect["Os"] == "linux" and inspect["Architecture"] == "amd64"
    raw = json.loads(run("skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{ref}"))
    assert raw["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    assert raw["layers"][0]["mediaType"] == "application/vnd.oci.image.layer.v1.tar"

    layout = work_dir / "oci"
    run("skopeo", "copy", "--src-tls-verify=false", f"docker://{ref}", f"oci:{layout}:cd")
    bundle = work_dir / "bundle"
    run("umoci", "unpack", "--image", f"{layout}:cd", str(bundle))
    rootfs = bundle / "rootfs"
    assert sorted(p.name for p in rootfs.iterdir()) == ["disk"]
    files = list((rootfs / "disk").iterdir())
    assert [f.name for f in files] == [f"{top}.qcow2"]
    disk = files[0]
    info = os.stat(disk)
    assert (info.st_uid, info.st_gid) == (107, 107)
    assert stat.S_IMODE(info.st_mode) == 0o440
    directory = os.stat(rootfs / "disk")
    assert (directory.st_uid, directory.st_gid) == (107, 107)
    # A standalone qcow2 (no backing file: the chain is flattened) with the image's content.
    details = json.loads(run("qemu-img", "info", "--output=json", str(disk)))
    assert details["format"] == "qcow2" and "backing-filename" not in details
    assert prune_chain.same(chain.file(top), disk)
    # The same image pushed again gives the same layer: nothing but the manifest goes up.
    again = Bbsnap(work_dir / "a")("images", "push", top, ref, "--containerdisk")
    assert again.exit_code == 0, again.stderr
    line = [x for x in again.stderr.splitlines() if x.endswith("bytes uploaded)")][-1]
    assert int(line.rsplit("(", 1)[1].split()[0]) < 64 * 1024, again.stderr
    assert not list((work_dir / "a" / "tmp").glob("containerdisk.*"))
