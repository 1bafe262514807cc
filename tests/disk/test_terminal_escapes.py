"""A real import whose file name and sidecar carry terminal controls (DESIGN §8)."""

from __future__ import annotations

import json

from bbsnap.transfer.sidecar import FORMAT_VERSION
from tests.images import MIB, raw_disk

HOSTILE = "\u001b]0;owned\u0007\u001b[2J"


def test_import_of_a_hostile_file_name_and_sidecar_prints_escaped_lines(bbsnap, work_dir):
    source = raw_disk(work_dir / "evil\nname.raw")
    sidecar = {"bbsnap_sidecar": FORMAT_VERSION, "name": HOSTILE, "virtual_size": 8 * MIB,
               "description": "first\nsecond"}
    (work_dir / "evil\nname.raw.json").write_text(json.dumps(sidecar))
    result = bbsnap("images", "import", str(source))
    assert result.exit_code == 0, result.stderr
    image_id = result.stdout.strip()
    # "Importing PATH as img-..." was two lines, the second one starting with "name.raw".
    assert f"Importing {work_dir}/evil\\nname.raw as {image_id}\n" in result.stderr
    assert "\x1b" not in result.stderr
    shown = bbsnap("images", "show", image_id)
    assert "\x1b" not in shown.stdout and "\x07" not in shown.stdout
    assert "name: \\x1b]0;owned\\x07\\x1b[2J\n" in shown.stdout
    assert "description: first\\nsecond\n" in shown.stdout
    record = json.loads(bbsnap("images", "show", image_id, "--format", "json").stdout)
    assert record["name"] == HOSTILE and record["description"] == "first\nsecond"
