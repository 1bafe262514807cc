"""Normal users: the automatic connection choice, QEMU's passage to the data directory (real
modes and ACLs, set with the real setfacl), a data directory bound to one connection, and
the ssh error that names the user to pass (a real ssh against a closed 127.0.0.1 port)."""

from __future__ import annotations

import grp
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

from bbsnap import host_access
from bbsnap.config import SESSION_URI, SYSTEM_URI, choose_connection, load_settings
from bbsnap.errors import ConflictError, UsageError
from bbsnap.models import Server, ServerStatus
from bbsnap.proc import run_attached
from bbsnap.services import ssh

LIBVIRT_GID = grp.getgrnam("libvirt").gr_gid
QEMU = host_access.qemu_user_for(SYSTEM_URI, "libvirt-qemu")


def test_root_gets_qemu_system():
    assert choose_connection(uid=0) == (SYSTEM_URI, "automatic: running as root")


def test_a_libvirt_group_member_gets_qemu_system_and_others_qemu_session():
    assert choose_connection(uid=4242, groups=[100, LIBVIRT_GID]) == \
        (SYSTEM_URI, "automatic: you are in the 'libvirt' group")
    assert choose_connection(uid=4242, groups=[100]) == \
        (SESSION_URI, "automatic: you are not in the 'libvirt' group")


def test_flag_environment_and_config_file_win_over_the_choice(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("connect: qemu:///session\n")
    env = {"BBSNAP_CONFIG": str(config), "BBSNAP_HOME": str(tmp_path)}
    from_file = load_settings({}, env)
    assert from_file.connect == SESSION_URI and from_file.connect_origin.startswith("'connect' in")
    from_env = load_settings({}, {**env, "LIBVIRT_DEFAULT_URI": "test:///default"})
    assert (from_env.connect, from_env.connect_origin) == ("test:///default", "LIBVIRT_DEFAULT_URI")
    from_flag = load_settings({"connect": "qemu:///system"},
                              {**env, "LIBVIRT_DEFAULT_URI": "test:///default"})
    assert (from_flag.connect, from_flag.connect_origin) == (SYSTEM_URI, "--connect")
    nothing = load_settings({}, {"BBSNAP_CONFIG": "", "BBSNAP_HOME": str(tmp_path)})
    assert nothing.connect_origin.startswith("automatic")


def test_the_origin_is_no_setting_a_config_file_may_hold(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("connect_origin: me\n")
    with pytest.raises(UsageError, match="unknown setting"):
        load_settings({}, {"BBSNAP_CONFIG": str(config), "BBSNAP_HOME": str(tmp_path)})


def test_only_local_qemu_system_runs_qemu_as_its_own_user():
    assert QEMU is not None and QEMU.name == "libvirt-qemu"
    for uri in ("qemu:///session", "test:///default", "qemu+ssh://elsewhere/system"):
        assert host_access.qemu_user_for(uri, "libvirt-qemu") is None
    assert host_access.is_system("qemu+unix:///system?socket=/x")


@pytest.fixture()
def passable(tmp_path_factory):
    """A directory QEMU's user may reach (pytest's own temporary root is 0700)."""
    base = Path(tempfile.mkdtemp(prefix="bbsnap-tests-acl-", dir="/var/tmp"))
    os.chmod(base, 0o755)
    yield base
    shutil.rmtree(base)


def test_a_0700_home_blocks_qemu_until_the_acl_grants_execute_only(passable):
    assert QEMU is not None
    tmp_path = passable
    home = tmp_path / "home"
    data = home / ".local" / "share" / "bbsnap"
    data.mkdir(parents=True)
    os.chmod(tmp_path, 0o755)
    os.chmod(home, 0o700)
    for path in (home / ".local", home / ".local" / "share", data):
        os.chmod(path, 0o711)
    os.chown(home, 4242, 4242)  # a normal user's home (uid 0 passes anything)
    assert host_access.blocked_directories(data, QEMU) == [home]

    assert host_access.grant_traversal([home], QEMU) == [home]
    assert host_access.blocked_directories(data, QEMU) == []
    acl = subprocess.run(["getfacl", "-cp", str(home)], capture_output=True, text=True,
                         check=True).stdout.split()
    assert "user:libvirt-qemu:--x" in acl and "other::---" in acl
    assert home.stat().st_mode & 0o007 == 0  # never opened to others
    # a named entry without execute, or masked off, still blocks
    subprocess.run(["setfacl", "-m", "u:libvirt-qemu:r", str(home)], check=True)
    assert host_access.blocked_directories(data, QEMU) == [home]
    subprocess.run(["setfacl", "-m", "u:libvirt-qemu:x,m::-", str(home)], check=True)
    assert host_access.blocked_directories(data, QEMU) == [home]


def test_group_and_other_bits_decide_without_an_acl(passable):
    assert QEMU is not None
    box = passable / "box"
    box.mkdir()
    os.chown(box, 4242, 4242)
    os.chmod(box, 0o701)
    assert host_access.may_traverse(box, QEMU)
    os.chmod(box, 0o710)
    assert not host_access.may_traverse(box, QEMU)  # 4242 is not one of QEMU's groups
    os.chown(box, 4242, grp.getgrnam("libvirt-qemu").gr_gid)
    assert host_access.may_traverse(box, QEMU)


def test_a_data_directory_belongs_to_the_first_connection_that_answered(tmp_path):
    host_access.refuse_other_connection(tmp_path, SYSTEM_URI)  # no record: anything goes
    assert host_access.needs_record(tmp_path, SYSTEM_URI)
    assert not host_access.needs_record(tmp_path, "test:///default")  # no QEMU: no record
    host_access.record_connection(tmp_path, SYSTEM_URI)
    assert host_access.recorded_connection(tmp_path) == SYSTEM_URI
    assert (tmp_path / host_access.CONNECTION_RECORD).stat().st_mode & 0o777 == 0o600
    host_access.refuse_other_connection(tmp_path, SYSTEM_URI)
    host_access.refuse_other_connection(tmp_path, "test:///default")
    with pytest.raises(ConflictError) as refused:
        host_access.refuse_other_connection(tmp_path, SESSION_URI)
    assert "belongs to qemu:///system" in str(refused.value)
    assert "use -c qemu:///system with it" in str(refused.value)


def test_the_cli_refuses_another_connection_before_connecting(bbsnap):
    bbsnap.data_dir.mkdir()
    host_access.record_connection(bbsnap.data_dir, SESSION_URI)
    result = bbsnap("-c", "qemu:///system", "servers", "list")
    assert result.exit_code == 4
    assert result.stderr.count("\n") == 1 and "belongs to qemu:///session" in result.stderr
    # doctor reports it instead of refusing
    doctor = bbsnap("-c", "qemu:///system", "doctor")
    assert "FAIL  data directory connection" in doctor.stdout
    assert "use -c qemu:///session with it" in doctor.stdout


def test_snapshot_refuses_a_bad_username_before_any_output(bbsnap):
    result = bbsnap("-c", "test:///default", "servers", "snapshot", "test", "--username",
                    "Bad User")
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and "not a valid login name" in result.stderr
    assert "Snapshotting" not in result.stderr


def _server(username: str | None, port: int) -> Server:
    return Server(id="srv-abcde", uuid="u", name="x", status=ServerStatus.ACTIVE, managed=True,
                  image_id="img-fghij", username=username, ssh_port=port)


def test_ssh_as_the_fallback_root_that_fails_names_the_user_to_pass():
    with socket.socket() as probe:  # a 127.0.0.1 port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = _server(None, port)
    assert ssh.guessed_login(server, None)
    argv = ssh.ssh_argv(server, command=["true"])
    status = run_attached([argv[0], "-o", "BatchMode=yes", *argv[1:]])
    assert status == ssh.SSH_FAILED
    message = str(ssh.login_failed(server, status))
    assert "as root failed (exit 255)" in message
    assert "bbsnap servers ssh srv-abcde -l USER" in message
    assert "bbsnap images update img-fghij -u USER" in message
    # a user given or recorded is no guess: ssh then replaces bbsnap (its own errors)
    assert not ssh.guessed_login(server, "debian")
    assert not ssh.guessed_login(_server("debian", port), None)
    assert ssh.ssh_argv(_server("debian", port))[:3] == ["ssh", "-l", "debian"]
