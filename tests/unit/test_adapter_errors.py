"""The libvirt adapter lets no libvirtError out: every call on the connection and on the
domains, checkpoints and networks it hands out goes through one error mapping.

No libvirtd here: libvirt's test driver (a node file of its own per test) raises libvirt's
real errors, and a scripted stand-in connection drops at any one of the calls a port
method makes (what a libvirtd restart mid-copy does), which says nothing of the real
hypervisor path, only of the adapter's wrapping (tests/contract runs that path)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import libvirt
import pytest

from bbsnap.errors import CheckpointBrokenError, HypervisorError, NotFoundError
from bbsnap.hypervisor import BackupPlan, BackupTarget, DiskReplacement, DiskSpec, DomainSpec
from bbsnap.hypervisor.domain_xml import build_domain_xml
from bbsnap.hypervisor.libvirt_adapter import LibvirtHypervisor

NAME = "bbsnap-unit-adapter"
LOST = "Cannot recv data: Connection reset by peer"


@pytest.fixture()
def test_driver(tmp_path: Path) -> Iterator[LibvirtHypervisor]:
    """The adapter on a test-driver node running one domain, NAME."""
    node = tmp_path / "node.xml"
    node.write_text(f"<node><domain type='test'><name>{NAME}</name><memory>8192</memory>"
                    "<os><type>hvm</type></os></domain></node>")
    hv = LibvirtHypervisor(f"test://{node}")
    yield hv
    hv.close()


def test_a_call_on_a_domain_handle_fails_as_a_bbsnap_error(test_driver):
    dom = test_driver._lookup(NAME)
    with pytest.raises(HypervisorError) as running:
        dom.create()  # a call the adapter makes without _call: mapped all the same
    assert not isinstance(running.value, NotFoundError)
    assert running.value.message.startswith(f"create on domain {NAME} failed: ")
    assert "already running" in running.value.message
    dom.destroy()
    dom.undefine()  # (the test driver takes none of the flags the port's undefine gives)
    with pytest.raises(NotFoundError) as gone:
        dom.isActive()  # the handle outlived its domain
    assert gone.value.message == f"isActive on domain {NAME}: no such domain"


def test_call_keeps_its_own_names_for_a_handles_methods(test_driver):
    with pytest.raises(HypervisorError) as again:
        test_driver.start(NAME)  # running already
    assert again.value.message.startswith(f"starting {NAME} failed: ")
    assert "already running" in again.value.message
    with pytest.raises(NotFoundError) as unknown:
        test_driver.info("bbsnap-unit-nope")
    assert unknown.value.message == "server bbsnap-unit-nope not found"


def test_what_the_connection_hands_out_is_wrapped_too(test_driver):
    (listed,) = test_driver.conn.listAllDomains(0)
    test_driver.destroy(NAME)
    with pytest.raises(HypervisorError, match=f"resume on domain {NAME} failed: "):
        listed.resume()  # not running
    with pytest.raises(NotFoundError, match="libvirt network 'bbsnap-unit-net' not found"):
        test_driver.check_network("bbsnap-unit-net")
    assert not test_driver.has_checkpoint(NAME, "no-such-checkpoint")


# -- a connection dropped at any call ---------------------------------------------------

class _Script:
    """Counts the libvirt calls made; the one numbered *fail_at* fails as a dropped
    connection does, or with *code*."""

    def __init__(self, fail_at: int, code: int = libvirt.VIR_ERR_SYSTEM_ERROR) -> None:
        self.fail_at, self.code, self.count = fail_at, code, 0

    def call(self, answer: Callable[..., Any], *args: Any) -> Any:
        self.count += 1
        if self.count == self.fail_at:
            exc = libvirt.libvirtError(LOST)
            exc.err = (self.code, libvirt.VIR_FROM_RPC, LOST, libvirt.VIR_ERR_ERROR,
                       None, None, None, -1, -1)
            raise exc
        return answer(*args)


def _stub(base: type, script: _Script, answers: dict[str, Callable[..., Any]],
          local: dict[str, Any]) -> Any:
    """An instance of libvirt class *base* (so the adapter wraps it as it wraps libvirt's)
    with no C object behind it: *answers* are scripted calls, *local* what libvirt-python
    answers without libvirtd (a name)."""

    class Stub(base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            self._o = None  # libvirt-python's __del__ frees no C object then

        def __getattribute__(self, attr: str) -> Any:
            if attr in local:
                return lambda *_args: local[attr]
            if attr in answers:
                return lambda *args: script.call(answers[attr], *args)
            return object.__getattribute__(self, attr)

    return Stub()


class _Dropping:
    """libvirt.open's stand-in: a connection to one running domain, NAME, whose calls are
    scripted (every answer a plausible one) until the scripted one fails."""

    def __init__(self, script: _Script, tmp_path: Path) -> None:
        spec = DomainSpec(name=NAME, uuid=str(uuid.uuid4()), memory_mib=64, vcpus=1,
                          accel="tcg", disks=(DiskSpec(tmp_path / "disk.qcow2"),),
                          console_log=tmp_path / "log")
        xml = build_domain_xml(spec)
        self.disk = str(spec.disks[0].path)
        dom: Any = None

        def checkpoint() -> Any:
            return _stub(libvirt.virDomainCheckpoint, script, {"delete": lambda *_: 0},
                         {"getName": "cp", "getDomain": dom})

        dom = _stub(libvirt.virDomain, script, {
            "UUIDString": lambda: spec.uuid, "isPersistent": lambda: 1, "isActive": lambda: 1,
            "state": lambda: [libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_IOERROR],
            "XMLDesc": lambda _flags: xml, "create": lambda: 0, "destroy": lambda: 0,
            "undefineFlags": lambda _flags: 0, "shutdown": lambda: 0, "reboot": lambda _f: 0,
            "resume": lambda: 0, "interfaceAddresses": lambda *_: {},
            "agentSetResponseTimeout": lambda *_: 0, "fsFreeze": lambda *_: 1,
            "fsThaw": lambda *_: 1, "guestInfo": lambda *_: {},
            "blockInfo": lambda _target: [1 << 20, 0, 0], "backupBegin": lambda *_: 0,
            "checkpointCreateXML": lambda *_: checkpoint(),
            "checkpointLookupByName": lambda *_: checkpoint(),
            "listAllCheckpoints": lambda _flags: [checkpoint()],
            "jobStats": lambda _flags: {"type": libvirt.VIR_DOMAIN_JOB_COMPLETED},
            "abortJob": lambda: 0, "migrateSetMaxDowntime": lambda *_: 0,
            "snapshotCreateXML": lambda *_: None}, {"name": NAME})
        network = _stub(libvirt.virNetwork, script, {"isActive": lambda: 1},
                        {"name": "default"})
        self._script = script
        self._answers: dict[str, Callable[..., Any]] = {
            "lookupByName": lambda _name: dom, "getLibVersion": lambda: 9_000_000,
            "getVersion": lambda: 7_002_000, "defineXML": lambda _xml: dom,
            "listAllDomains": lambda _flags: [dom],
            "networkLookupByName": lambda _name: network,
            "saveImageGetXMLDesc": lambda *_: xml, "restoreFlags": lambda *_: 0}

    def __getattr__(self, attr: str) -> Any:
        if attr == "close":
            return lambda: 0
        return lambda *args: self._script.call(self._answers[attr], *args)

    def monitor(self, _dom: Any, command: str, _flags: int) -> str:
        """libvirt_qemu.qemuMonitorCommand's stand-in (query-block, then the delete)."""
        if json.loads(command)["execute"] == "query-block":
            return self._script.call(lambda: json.dumps({"return": [
                {"inserted": {"file": self.disk, "node-name": "node0"}}]}))
        return self._script.call(lambda: json.dumps({"return": {}}))


def _port_calls(tmp_path: Path) -> dict[str, Callable[[LibvirtHypervisor], Any]]:
    spec = DomainSpec(name=NAME, uuid=str(uuid.uuid4()), memory_mib=64, vcpus=1, accel="tcg",
                      disks=(DiskSpec(tmp_path / "disk.qcow2"),), console_log=tmp_path / "log")
    plan = BackupPlan((BackupTarget("vda", tmp_path / "copy.qcow2"),))
    saved = tmp_path / "saved"
    return {
        "version": lambda hv: hv.version(), "define": lambda hv: hv.define(spec),
        "start": lambda hv: hv.start(NAME), "info": lambda hv: hv.info(NAME),
        "list_domains": lambda hv: hv.list_domains(), "destroy": lambda hv: hv.destroy(NAME),
        "undefine": lambda hv: hv.undefine(NAME), "facts": lambda hv: hv.facts(NAME),
        "replace_disks": lambda hv: hv.replace_disks(
            NAME, [DiskReplacement("vda", tmp_path / "new.qcow2")], metadata={"a": "b"}),
        "set_metadata": lambda hv: hv.set_metadata(NAME, {"a": "b"}),
        "shutdown": lambda hv: hv.shutdown(NAME), "reboot": lambda hv: hv.reboot(NAME),
        "addresses": lambda hv: hv.addresses(NAME),
        "check_network": lambda hv: hv.check_network("default"),
        "disks": lambda hv: hv.disks(NAME), "freeze": lambda hv: hv.freeze(NAME, 1),
        "thaw": lambda hv: hv.thaw(NAME),
        "logged_in_users": lambda hv: hv.logged_in_users(NAME, 1),
        "begin_backup": lambda hv: hv.begin_backup(NAME, plan),
        "disk_capacity": lambda hv: hv.disk_capacity(NAME, "vda"),
        "redefine_checkpoint": lambda hv: hv.redefine_checkpoint(NAME, "cp", "vda"),
        "has_checkpoint": lambda hv: hv.has_checkpoint(NAME, "cp"),
        "delete_checkpoint": lambda hv: hv.delete_checkpoint(NAME, "cp"),
        "checkpoints": lambda hv: hv.checkpoints(NAME),
        "job_status": lambda hv: hv.job_status(NAME),
        "completed_job": lambda hv: hv.completed_job(NAME),
        "abort_job": lambda hv: hv.abort_job(NAME),
        "hardware": lambda hv: hv.hardware(NAME, migratable=True),
        "save_memory_live": lambda hv: hv.save_memory_live(NAME, saved, ["vda"], [], 30),
        "memory_save_running": lambda hv: hv.memory_save_running(NAME),
        "pause_cause": lambda hv: hv.pause_cause(NAME), "resume": lambda hv: hv.resume(NAME),
        "delete_disk_snapshot": lambda hv: hv.delete_disk_snapshot(
            NAME, str(spec.disks[0].path), "s"),
        "saved_domain": lambda hv: hv.saved_domain(saved),
        "restore_memory": lambda hv: hv.restore_memory(saved, {}),
    }


# What a port method may do with a lost connection besides raising HypervisorError: go on
# without the answer, where it always did (abort_job: no job to abort; addresses: the next
# source; delete_checkpoint: forget the record only; logged_in_users: the timeout reset).
_MAY_GO_ON = {"abort_job", "addresses", "delete_checkpoint", "logged_in_users"}


def _adapter(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
             script: _Script) -> LibvirtHypervisor:
    import libvirt_qemu

    conn = _Dropping(script, tmp_path)
    monkeypatch.setattr(libvirt, "open", lambda _uri: conn)
    monkeypatch.setattr(libvirt_qemu, "qemuMonitorCommand", conn.monitor)
    return LibvirtHypervisor("test:///dropping")


@pytest.mark.parametrize("method", sorted(_port_calls(Path("/unused"))))
def test_a_connection_lost_at_any_call_of_a_port_method_is_a_hypervisor_error(
        method, monkeypatch, tmp_path):
    call = _port_calls(tmp_path)[method]
    counted = _Script(fail_at=0)
    call(_adapter(monkeypatch, tmp_path, counted))  # every call answered: how many it makes
    assert counted.count >= 1, f"{method} makes no libvirt call"
    for fail_at in range(1, counted.count + 1):
        hv = _adapter(monkeypatch, tmp_path, _Script(fail_at))
        try:
            call(hv)
        except HypervisorError as exc:  # the reconnectable error, QuiesceError and the like
            assert LOST in exc.message, exc.message
            continue
        except libvirt.libvirtError as exc:  # pragma: no cover - what this test is about
            pytest.fail(f"{method}: call {fail_at} let a libvirtError out: {exc}")
        assert method in _MAY_GO_ON, f"{method}: call {fail_at} failed, yet it returned"


def test_a_broken_bitmap_on_a_handles_method_is_checkpoint_broken(monkeypatch, tmp_path):
    hv = _adapter(monkeypatch, tmp_path,
                  _Script(fail_at=2, code=libvirt.VIR_ERR_CHECKPOINT_INCONSISTENT))
    plan = BackupPlan((BackupTarget("vda", tmp_path / "copy.qcow2"),), incremental_from="cp")
    with pytest.raises(CheckpointBrokenError):
        hv.begin_backup(NAME, plan)  # call 1 looks the domain up, call 2 begins the backup


def test_a_domain_gone_between_lookup_and_call_is_not_found(monkeypatch, tmp_path):
    hv = _adapter(monkeypatch, tmp_path, _Script(fail_at=2, code=libvirt.VIR_ERR_NO_DOMAIN))
    with pytest.raises(NotFoundError, match=f"isActive on domain {NAME}: no such domain"):
        hv.destroy(NAME)


def test_threads_calling_at_once_share_one_connection(tmp_path, monkeypatch):
    """A worker's guest-agent thread and its copy's poll may make the first call together:
    libvirt's open lets go of the GIL, and one connection is opened, not two (the test
    driver's open, slowed so both threads are inside it at once)."""
    import threading
    import time

    node = tmp_path / "node.xml"
    node.write_text(f"<node><domain type='test'><name>{NAME}</name><memory>8192</memory>"
                    "<os><type>hvm</type></os></domain></node>")
    opened: list[object] = []
    real_open = libvirt.open

    def slow_open(uri: str) -> object:
        time.sleep(0.05)
        conn = real_open(uri)
        opened.append(conn)
        return conn

    monkeypatch.setattr(libvirt, "open", slow_open)
    hv = LibvirtHypervisor(f"test://{node}")
    seen: list[object] = []
    threads = [threading.Thread(target=lambda: seen.append(hv.conn)) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert len(opened) == 1 and seen[0] is seen[1]
    finally:
        hv.close()
