"""Inputs refused up front (host names, server names, ssh login names, alias-bomb
user-data) and domain metadata that is read leniently (one odd domain breaks nothing)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from bbsnap.errors import InvalidInputError, UsageError
from bbsnap.hypervisor import DiskSpec, DomainInfo, DomainSpec, DomainState, NicSpec
from bbsnap.hypervisor.domain_xml import build_domain_xml, read_domain_facts
from bbsnap.models import Server, ServerStatus
from bbsnap.seed import check_hostname, validate_user_data
from bbsnap.services.server_records import check_server_name, server_from_domain
from bbsnap.services.ssh import check_login_name, ssh_argv
from tests.unit.test_escaping import _add_image, _domain_node


# -- host names ------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", ["evil\n", "web\n", "a\nb", "web\r", " web", "web "])
def test_a_host_name_with_a_trailing_newline_is_refused(bad):
    """`$` in re.match matched before a trailing newline: "evil\\n" passed."""
    with pytest.raises(UsageError, match="not a valid host name"):
        check_hostname(bad)


def test_create_refuses_a_bad_hostname_or_server_name_before_anything_exists(bbsnap):
    image_id = _add_image(bbsnap.data_dir, "img", "")
    cases = [(("--hostname", "evil\n"), "'evil\\n' is not a valid host name"),
             (("-n", "a\x1b]0;x\x07b"), "cannot contain \\x1b"),
             (("-n", "carriage\rreturn"), "cannot contain \\r")]
    for args, message in cases:
        result = bbsnap("-c", "test:///default", "servers", "create", image_id, *args)
        assert result.exit_code == 2, result.stderr
        # The error is the only line: validation happens before "Creating ..." is printed.
        assert result.stderr.count("\n") == 1 and message in result.stderr
        assert "Creating" not in result.stderr
        assert "<domain" not in result.stderr
    assert not (bbsnap.data_dir / "servers").exists() or not any(
        p.name.startswith("srv-") for p in (bbsnap.data_dir / "servers").iterdir())


# -- server names ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["My <test> & 'server' \"x\"", "two\nlines", "tab\there",
                                  "C1 \x85 \x9b and DEL \x7f", "../../etc", "é ☃ \u2028"])
def test_server_names_xml_can_hold_are_kept_verbatim(name):
    assert check_server_name(name) == name
    xml = build_domain_xml(DomainSpec(name="srv-aaaaa", uuid="u", memory_mib=128, vcpus=1,
                                      accel="tcg", disks=(DiskSpec(Path("/d")),),
                                      console_log=Path("/c"), title=name,
                                      metadata={"name": name}))
    assert read_domain_facts(xml).metadata["name"] == name


@pytest.mark.parametrize("name", ["a\x1bb", "nul\x00", "bell\x07", "cr\r", "vt\x0b", "\ufffe",
                                  "lone \udc80 surrogate", "", "   ", "x" * 256])
def test_server_names_xml_cannot_hold_are_refused_in_one_line(name):
    with pytest.raises(UsageError) as caught:
        check_server_name(name)
    assert "\n" not in str(caught.value)


def test_what_libvirt_refuses_is_what_check_server_name_refuses():
    """Defined through libvirt's test driver: the accepted names define, the refused ones
    are exactly those libvirt (libxml2) rejects with its whole XML in the message."""
    import libvirt

    libvirt.registerErrorHandler(lambda *_args: None, None)
    conn = libvirt.open("test:///default")
    try:
        for index, char in enumerate([chr(c) for c in range(0xa0)] + ["\ufffe"]):
            if char in "\n\r":
                continue  # the title joins lines (libvirt refuses newlines in titles)
            name = f"a{char}b"
            xml = build_domain_xml(DomainSpec(
                name=f"srv-{index:05d}", uuid=f"6b3c6f0a-1b9e-4d0c-9a53-{index:012d}",
                memory_mib=128, vcpus=1, accel="tcg", disks=(), console_log=Path("/c"),
                title=name, metadata={"name": name})).replace("type=\"qemu\"", "type=\"test\"")
            try:
                conn.defineXML(xml)
                accepted = True
            except (libvirt.libvirtError, ValueError):  # ValueError: NUL, refused by Python
                accepted = False
            try:
                check_server_name(name)
                allowed = True
            except UsageError:
                allowed = False
            assert accepted == allowed, f"{char!r}: libvirt {accepted}, bbsnap {allowed}"
    finally:
        conn.close()


# -- ssh -------------------------------------------------------------------------------------

def _server(**changes) -> Server:
    base = {"id": "srv-aaaaa", "uuid": "u", "name": "n", "status": ServerStatus.ACTIVE,
            "managed": True, "ssh_port": 2222, "username": "debian"}
    base.update(changes)
    return Server(**base)


@pytest.mark.parametrize("user", ["-oProxyCommand=touch /tmp/owned", "-lroot", "a b", "a\n",
                                  "tab\tuser", "\x1b[2J"])
def test_a_login_name_that_ssh_would_read_as_an_option_is_refused(user):
    with pytest.raises(UsageError, match="not a login name"):
        ssh_argv(_server(), user=user)


def test_the_image_s_username_cannot_become_an_option_either():
    with pytest.raises(UsageError):
        ssh_argv(_server(username="-oProxyCommand=sh"))


def test_ssh_argv_passes_the_user_with_l_and_ends_options_before_the_host():
    """The user went into USER@HOST, a word ssh parses as an option when it starts with
    '-' (`-oProxyCommand=...@127.0.0.1` ran a local command), and options were not ended."""
    argv = ssh_argv(_server(), user="admin", command=["-oProxyCommand=x", "ls"])
    assert argv[1:3] == ["-l", "admin"]
    end = argv.index("--")
    assert argv[end + 1:] == ["127.0.0.1", "-oProxyCommand=x", "ls"]
    assert not any("@" in word for word in argv)
    assert check_login_name("user.name@ad.example") == "user.name@ad.example"
    with pytest.raises(UsageError):
        check_login_name("")


def test_ssh_uses_only_an_address_that_is_an_ip():
    """Addresses come from the guest agent: a guest may report any text."""
    server = _server(ssh_port=None, addresses=("-oProxyCommand=x", "ssh://evil", "10.0.0.5"))
    argv = ssh_argv(server)
    assert argv[argv.index("--") + 1] == "10.0.0.5" and "-oProxyCommand=x" not in argv


# -- domain metadata -------------------------------------------------------------------------

class _NoHypervisor:
    """server_from_domain with the facts given and no addresses asks the hypervisor nothing."""


def _xml_with(metadata: dict[str, str]) -> str:
    return build_domain_xml(DomainSpec(name="srv-aaaaa", uuid="u", memory_mib=128, vcpus=1,
                                       accel="tcg", disks=(DiskSpec(Path("/d")),),
                                       console_log=Path("/c"), metadata=metadata))


@pytest.mark.parametrize("field, value, attribute, expected", [
    ("ssh_port", "22x", "ssh_port", None), ("ssh_port", "0", "ssh_port", None),
    ("ssh_port", "99999", "ssh_port", None), ("ssh_port", "²²", "ssh_port", None),
    ("ssh_port", " 22", "ssh_port", None), ("ssh_port", "2222", "ssh_port", 2222),
    ("created_at", "yesterday", "created_at", None),
    ("created_at", "2026-13-45T99:00:00", "created_at", None),
    ("type_id", "typ-\x9bunknown", "type_id", "typ-\x9bunknown"),
])
def test_a_malformed_metadata_field_reads_as_unknown(field, value, attribute, expected):
    """int("22x") raised ValueError out of `servers list` for every user."""
    info = DomainInfo(name="srv-aaaaa", uuid="u", state=DomainState.SHUTOFF, persistent=True)
    facts = read_domain_facts(_xml_with({"image_id": "img-aaaaa", field: value}))
    server = server_from_domain(_NoHypervisor(), info, facts=facts)  # type: ignore[arg-type]
    assert getattr(server, attribute) == expected
    assert server.id == "srv-aaaaa" and server.managed


def test_malformed_numbers_in_a_domain_s_xml_read_as_zero():
    xml = _xml_with({}).replace(">128<", ">lots<").replace("<vcpu>1<", "<vcpu>x<")
    facts = read_domain_facts(xml)
    assert (facts.memory_mib, facts.vcpus) == (0, 0)


def test_forwarded_ports_are_read_from_slirp_and_passt_nics():
    xml = build_domain_xml(DomainSpec(
        name="s", uuid="u", memory_mib=128, vcpus=1, accel="tcg", disks=(),
        console_log=Path("/c"), nics=(NicSpec("52:54:00:00:00:01", ssh_forward_port=2345),
                                      NicSpec("52:54:00:00:00:02", ssh_forward_port=2346,
                                              passt=True))))
    assert read_domain_facts(xml).forwarded_ports == (2345, 2346)


def test_servers_list_and_show_survive_a_domain_with_malformed_metadata(bbsnap, tmp_path):
    uri = _domain_node(tmp_path, "odd", "odd", json.dumps(
        {"ssh_port": "22x", "created_at": "yesterday", "type_id": "typ-nope"}))
    listed = bbsnap("-c", uri, "servers", "list")
    assert listed.exit_code == 0, listed.stderr
    assert "srv-aaaaa" in listed.stdout and "odd" in listed.stdout
    shown = bbsnap("-c", uri, "servers", "show", "srv-aaaaa", "--format", "json")
    assert shown.exit_code == 0, shown.stderr
    record = json.loads(shown.stdout)
    assert record["ssh_port"] is None and record["created_at"] is None
    assert record["type_id"] == "typ-nope"


# -- user-data -------------------------------------------------------------------------------

def _laughs(levels: int, width: int = 9) -> str:
    text = "#cloud-config\nl0: &l0 [" + ", ".join(['"lol"'] * width) + "]\n"
    for level in range(1, levels + 1):
        text += f"l{level}: &l{level} [" + ", ".join([f"*l{level - 1}"] * width) + "]\n"
    return text


def test_billion_laughs_user_data_is_refused_quickly():
    started = time.monotonic()
    with pytest.raises(InvalidInputError, match="aliases expand it") as caught:
        validate_user_data(_laughs(9))
    assert "\n" not in str(caught.value)
    assert time.monotonic() - started < 5


def test_a_self_referencing_alias_is_refused():
    with pytest.raises(InvalidInputError, match="refers to itself"):
        validate_user_data("#cloud-config\na: &a [1, *a]\n")


def test_ordinary_aliases_and_merge_keys_pass():
    text = ("#cloud-config\nbase: &base {shell: /bin/bash, groups: [sudo]}\n"
            "users:\n  - <<: *base\n    name: a\n  - <<: *base\n    name: b\n"
            + _laughs(3)[len("#cloud-config\n"):])
    assert validate_user_data(text) == text
