"""A stored chain file as a registry layer: only the backing name's bytes change, the same
file always gives the same layer, and reads from any offset (a resumed upload) agree."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from bbsnap.registry import layers


def _qcow2(path: Path, backing: str | None) -> Path:
    import subprocess

    argv = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if backing:
        argv += ["-u", "-F", "qcow2", "-b", backing]
    subprocess.run([*argv, str(path), "1M"], check=True)
    return path


def test_layer_patch_renames_only_the_backing_file(tmp_path):
    stored = _qcow2(tmp_path / "img-child.qcow2", "img-parent.qcow2")
    name = "ab" * 32 + ".qcow2"
    layer = layers.open_layer(stored, name)
    try:
        reader = layer.opener()(0)
        data = b"".join(iter(lambda: reader.read(4096), b""))
        offset, size = struct.unpack(">QI", data[8:20])
        assert data[offset:offset + size].decode() == name
        original = stored.read_bytes()
        assert len(data) == len(original) and data[4096:] == original[4096:]
        assert layer.digest() == layers.open_layer(stored, name).digest()  # deterministic
        assert layers.open_layer(stored, name).opener()(10).read(4) == data[10:14]
    finally:
        layer.close()
    base = _qcow2(tmp_path / "base.qcow2", None)
    with pytest.raises(Exception, match="no backing file"):
        layers.open_layer(base, name)
