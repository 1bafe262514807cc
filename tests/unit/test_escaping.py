"""Text from images, sidecars, guests and users never reaches a terminal raw (DESIGN §8).

Every human-readable path is checked: `show` tables (images and servers), `-s`, the stderr
notes, progress lines and error messages; JSON and YAML keep the data verbatim.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import yaml

from bbsnap.state.catalogue import Catalogue, utcnow
from bbsnap.cli import render
from bbsnap.models import Image, ImageStatus, ImageType
from bbsnap.text import escape

# A sidecar's name that retitles the terminal window and clears the screen.
HOSTILE = "\u001b]0;owned\u0007\u001b[2J"
RAW = ("\x1b", "\x07", "\x9b", "\x85", "\u2028")


def _no_raw_controls(text: str) -> None:
    for char in RAW:
        assert char not in text, f"{char!r} reached the terminal"


def _add_image(data_dir: Path, name: str, description: str) -> str:
    data_dir.mkdir(parents=True, exist_ok=True)
    catalogue = Catalogue(data_dir / "catalogue.sqlite3")
    try:
        catalogue.add(Image(id="img-aaaaa", type=ImageType.UPLOAD, owner="me",
                            created_at=utcnow(), status=ImageStatus.AVAILABLE, name=name,
                            description=description, username="debian", failure_reason=None))
    finally:
        catalogue.close()
    return "img-aaaaa"


def test_escape_turns_every_control_into_its_escape():
    assert escape(HOSTILE) == "\\x1b]0;owned\\x07\\x1b[2J"
    assert escape("a\nb\tc\x9b\u2028é<>") == "a\\nb\\tc\\x9b\\u2028é<>"
    assert escape(None) == "" and escape(22) == "22"


def test_vertical_escapes_values():
    """`show` printed values raw before: the name drove the terminal."""
    out = render.vertical([("name", HOSTILE), ("description", "two\nlines")])
    assert out == "       name: \\x1b]0;owned\\x07\\x1b[2J\ndescription: two\\nlines\n"


def test_json_escapes_what_its_encoder_leaves_raw_and_keeps_the_data():
    text = render.as_json({"name": HOSTILE + "\x7f\x9b\x85\u2028é"})
    _no_raw_controls(text)
    assert "\x7f" not in text and "é" in text
    assert json.loads(text) == {"name": HOSTILE + "\x7f\x9b\x85\u2028é"}


def test_yaml_escapes_c0_and_c1_controls_and_keeps_the_data():
    value = HOSTILE + "\x7f\x9b\x85\u2028\t"
    text = render.as_yaml({"name": value})
    _no_raw_controls(text)
    assert "\x7f" not in text
    assert yaml.safe_load(text) == {"name": value}


def test_images_show_escapes_a_sidecar_s_name_in_tables_and_simple_output(bbsnap):
    image_id = _add_image(bbsnap.data_dir, HOSTILE, "line one\nline two \x9b31m")
    shown = bbsnap("images", "show", image_id)
    assert shown.exit_code == 0, shown.stderr
    _no_raw_controls(shown.stdout)
    assert "name: \\x1b]0;owned\\x07\\x1b[2J\n" in shown.stdout
    assert "description: line one\\nline two \\x9b31m\n" in shown.stdout
    simple = bbsnap("images", "show", image_id, "-s").stdout
    _no_raw_controls(simple)
    assert simple.count("\n") == 1
    for fmt, load in (("json", json.loads), ("yaml", yaml.safe_load)):
        data = bbsnap("images", "show", image_id, "--format", fmt).stdout
        _no_raw_controls(data)
        assert load(data)["name"] == HOSTILE, "data formats keep the name verbatim"
    listed = bbsnap("images", "list").stdout
    _no_raw_controls(listed)


def test_images_update_prints_the_escaped_table(bbsnap):
    image_id = _add_image(bbsnap.data_dir, "plain", "")
    out = bbsnap("images", "update", image_id, "-d", HOSTILE)
    assert out.exit_code == 0, out.stderr
    _no_raw_controls(out.stdout)
    assert "description: \\x1b]0;owned" in out.stdout


def test_error_messages_quoting_a_name_are_escaped(bbsnap):
    """The catch point printed `bbsnap: error: ...` raw."""
    result = bbsnap("images", "show", "img-" + HOSTILE)
    assert result.exit_code == 2
    _no_raw_controls(result.stderr)
    assert result.stderr.count("\n") == 1 and "\\x1b]0;owned" in result.stderr
    result = bbsnap("-c", "test:///default", "servers", "show", "x\n" + HOSTILE)
    assert result.exit_code == 3
    _no_raw_controls(result.stderr)
    assert result.stderr.count("\n") == 1 and "x\\n\\x1b]0;owned" in result.stderr


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_line_with_a_newline_in_its_label_stays_one_line():
    from bbsnap.cli.reporter import TerminalReporter

    terminal = _Terminal()
    reporter = TerminalReporter(terminal)
    reporter.progress("Importing evil\nname.raw" + HOSTILE, 2 << 20, 4 << 20)
    reporter.progress_end()
    text = terminal.getvalue()
    _no_raw_controls(text)
    assert text.count("\n") == 1 and "Importing evil\\nname.raw\\x1b]0;owned" in text
    assert "[" + "#" * 15 + "." * 15 + "] 2/4 MiB" in text


def test_reporter_lines_are_escaped_and_never_land_inside_a_progress_bar():
    from bbsnap.cli.reporter import TerminalReporter

    terminal = _Terminal()
    reporter = TerminalReporter(terminal)
    reporter.progress("img-aaaaa: copying", 3 << 20, percent=41)
    reporter.note("firmware set to uefi\n" + HOSTILE)
    reporter.warning("the agent did not answer")
    reporter.waiting("another operation on srv-aaaaa")
    lines = terminal.getvalue().split("\n")
    _no_raw_controls(terminal.getvalue())
    assert lines[0].startswith("\rimg-aaaaa: copying [" + "#" * 12) and "3 MiB so far" in lines[0]
    assert lines[1:] == ["bbsnap: note: firmware set to uefi\\n\\x1b]0;owned\\x07\\x1b[2J",
                         "bbsnap: warning: the agent did not answer",
                         "bbsnap: waiting for another operation on srv-aaaaa to finish", ""]


def test_off_a_terminal_there_is_no_progress_at_all():
    import io

    from bbsnap.cli.reporter import TerminalReporter

    log = io.StringIO()
    reporter = TerminalReporter(log)
    reporter.progress("Exporting img-aaaaa", 1 << 20, 2 << 20)
    reporter.progress_end()
    reporter.note("done")
    assert log.getvalue() == "bbsnap: note: done\n"


def test_stderr_notes_are_escaped(capsys):
    from bbsnap.cli.options import for_each

    for_each(("a\nb" + HOSTILE,), lambda _key: None, lambda key: f"Starting server {key}")
    err = capsys.readouterr().err
    _no_raw_controls(err)
    assert err == "Starting server a\\nb\\x1b]0;owned\\x07\\x1b[2J\n"


def test_failed_snapshot_reason_is_escaped_when_waiting(tmp_path, capsys):
    import click
    import pytest

    from bbsnap.cli.waiting import wait_for_images

    catalogue = Catalogue(tmp_path / "c.sqlite3")
    catalogue.add(Image(id="img-aaaaa", type=ImageType.SNAPSHOT, owner="me", created_at=utcnow(),
                        status=ImageStatus.FAILED, name="s",
                        failure_reason="qemu-img said:\n" + HOSTILE))

    from bbsnap.reporting import SILENT

    class App:
        def __init__(self) -> None:
            self.catalogue = catalogue
            self.reporter = SILENT

        def recover(self) -> None:
            pass

    try:
        with pytest.raises(click.exceptions.Exit):
            wait_for_images(App(), ["img-aaaaa"])
    finally:
        catalogue.close()
    err = capsys.readouterr().err
    _no_raw_controls(err)
    assert err.count("\n") == 1 and "qemu-img said:\\n\\x1b]0;owned" in err


def _domain_node(tmp_path: Path, name: str, title: str, extra_meta: str = "") -> str:
    """A libvirt test-driver node with one bbsnap-made domain (no libvirtd involved)."""
    import xml.etree.ElementTree as ET

    from bbsnap.hypervisor.domain_xml import METADATA_NS

    node = ET.Element("node")
    domain = ET.SubElement(node, "domain", type="test")
    ET.SubElement(domain, "name").text = "srv-aaaaa"
    ET.SubElement(domain, "uuid").text = "6b3c6f0a-1b9e-4d0c-9a53-6f1d2e3c4b5a"
    ET.SubElement(domain, "title").text = title
    holder = ET.SubElement(ET.SubElement(domain, "metadata"), f"{{{METADATA_NS}}}server")
    facts = {"name": name, "image_id": "img-aaaaa", "hostname": "web", "username": "debian"}
    facts.update(json.loads(extra_meta or "{}"))
    for key, value in facts.items():
        ET.SubElement(holder, f"{{{METADATA_NS}}}{key}").text = value
    ET.SubElement(domain, "memory").text = "131072"
    ET.SubElement(ET.SubElement(domain, "os"), "type").text = "hvm"
    path = tmp_path / "node.xml"
    path.write_text(ET.tostring(node, encoding="unicode"))
    return f"test://{path}"


def test_servers_show_escapes_names_a_domain_carries(bbsnap, tmp_path):
    """XML cannot carry ESC, but a domain's metadata can hold newlines and C1 controls
    (0x9b is CSI): `servers show` printed them raw."""
    name = "two\nlines \x9b2J \x85"
    uri = _domain_node(tmp_path, name, "a title \x9b2J")
    shown = bbsnap("-c", uri, "servers", "show", "srv-aaaaa")
    assert shown.exit_code == 0, shown.stderr
    _no_raw_controls(shown.stdout)
    assert "name: two\\nlines \\x9b2J \\x85\n" in shown.stdout
    simple = bbsnap("-c", uri, "servers", "show", "srv-aaaaa", "-s").stdout
    _no_raw_controls(simple)
    assert simple.count("\n") == 1
    data = bbsnap("-c", uri, "servers", "show", "srv-aaaaa", "--format", "json").stdout
    _no_raw_controls(data)
    assert json.loads(data)["name"] == name
    listed = bbsnap("-c", uri, "servers", "list").stdout
    _no_raw_controls(listed)
    assert listed.count("\n") == 4


def test_library_warnings_reach_the_reporter_and_are_escaped_there():
    """Library code never prints: a rollback step's error (which can quote a guest agent or
    libvirt) goes to the reporter it was given, and the CLI's reporter escapes it."""
    from bbsnap.cli.reporter import TerminalReporter
    from bbsnap.services.compensation import Compensation

    def failing_undo() -> None:
        raise RuntimeError("agent said \x1b]0;owned\x07\nsecond line")

    terminal = _Terminal()
    try:
        with Compensation(TerminalReporter(terminal)) as undo:
            undo.push("the \x1b[2J disk", failing_undo)
            raise ValueError("the step that failed")
    except ValueError:
        pass
    err = terminal.getvalue()
    assert err.count("\n") == 1 and "\x1b" not in err, err
    assert err.startswith("bbsnap: warning: could not undo the \\x1b[2J disk: ")
    assert "\\x1b]0;owned\\x07\\nsecond line" in err


def test_login_names_and_arches_refuse_a_trailing_newline():
    import pytest

    from bbsnap.errors import UsageError
    from bbsnap.services.image_fields import check_arch, check_username

    for check, value in ((check_username, "debian\n"), (check_arch, "x86_64\n")):
        with pytest.raises(UsageError):
            check(value)
    assert check_username("debian") == "debian" and check_arch("x86_64") == "x86_64"
