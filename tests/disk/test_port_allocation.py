"""SSH forward ports are claimed host-wide, not per data directory (hardening #10, item 14).

The per-data-directory lock let two data directories hand out one port: nothing listens on
a stopped or not-yet-started server's port, and a domain on another libvirt connection is
invisible. Claims in one registry (netports.PortRegistry) close both gaps.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import socket
import uuid
from pathlib import Path

import pytest

from bbsnap.state.catalogue import Catalogue
from bbsnap.config import Settings
from bbsnap.errors import ConflictError
from bbsnap.hypervisor import DomainInfo, DomainSpec
from bbsnap.state.layout import DataDir
from bbsnap.netports import PortRegistry
from bbsnap.services.server_create import CreateRequest, ServerCreator
from tests.conftest import Bbsnap
from tests.fakes.hypervisor import FakeHypervisor
from tests.images import raw_disk

ROUNDS = 25
WORKERS = 4  # two data directories on each of two libvirt connections


def _free_base(width: int) -> int:
    """The start of *width* ports nothing on this host is bound to now."""
    for _ in range(100):
        base = random.randrange(20000, 30000)
        if all(_bindable(p) for p in range(base, base + width)):
            return base
    raise AssertionError("no free port range")


def _bindable(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _worker(registry: str, connection: str, defined: str, data_dir: str, base: int,
            out: str) -> None:
    """Claim ROUNDS ports as servers create does, each then 'defined' on *connection* (its
    UUID appended to the *defined* file, which stands for the connection's domain list)
    and never started: nothing listens on any of them."""
    ports = PortRegistry(Path(registry), connection)

    def live() -> set[str]:
        return set(Path(defined).read_text().split()) if os.path.exists(defined) else set()

    for _ in range(ROUNDS):
        domain = str(uuid.uuid4())
        port = ports.claim(range(base, base + 4 * WORKERS * ROUNDS), in_use=set(),
                           live_domains=live, domain_uuid=domain, data_dir=data_dir)
        with open(defined, "a") as handle:
            handle.write(domain + "\n")
        with open(out, "a") as handle:
            handle.write(f"{port}\n")


def test_concurrent_claims_from_several_data_directories_never_share_a_port(tmp_path):
    base = _free_base(4 * WORKERS * ROUNDS)
    context = multiprocessing.get_context("fork")
    jobs = []
    for index in range(WORKERS):
        connection = f"qemu:///conn{index % 2}"
        job = context.Process(target=_worker, args=(
            str(tmp_path / "registry"), connection, str(tmp_path / f"defined{index % 2}"),
            str(tmp_path / f"data{index}"), base, str(tmp_path / f"out{index}")))
        job.start()
        jobs.append(job)
    for job in jobs:
        job.join(120)
        assert job.exitcode == 0
    ports = [int(line) for index in range(WORKERS)
             for line in (tmp_path / f"out{index}").read_text().split()]
    assert len(ports) == WORKERS * ROUNDS
    assert len(set(ports)) == len(ports), "two creates were given the same port"


def test_a_claim_lapses_only_when_its_domain_is_gone_and_its_maker_dead(tmp_path):
    base = _free_base(3)
    candidates = range(base, base + 3)
    registry = PortRegistry(tmp_path / "registry", "qemu:///system")
    first = registry.claim(candidates, in_use=set(), live_domains=set, domain_uuid="u1")
    # Our own process is alive: the claim holds though no domain u1 exists yet.
    second = registry.claim(candidates, in_use=set(), live_domains=set, domain_uuid="u2")
    assert (first, second) == (base, base + 1)
    dead = dict(json.loads((tmp_path / "registry" / f"{first}.json").read_text()),
                job="1:0:nobootid")
    (tmp_path / "registry" / f"{first}.json").write_text(json.dumps(dead))
    # A dead maker but its domain is defined: still held.
    assert registry.claim(candidates, in_use=set(), live_domains=lambda: {"u1"},
                          domain_uuid="u3") == base + 2
    with pytest.raises(ConflictError, match="no free port"):
        registry.claim(candidates, in_use=set(), live_domains=lambda: {"u1"}, domain_uuid="u4")
    # Seen from another connection, the domain cannot be looked for: still held.
    other = PortRegistry(tmp_path / "registry", "qemu:///session")
    with pytest.raises(ConflictError):
        other.claim(candidates, in_use=set(), live_domains=set, domain_uuid="u4")
    # Domain gone (destroyed) and maker dead: the port is free again.
    assert registry.claim(candidates, in_use=set(), live_domains=set,
                          domain_uuid="u4") == first
    registry.release(first, "someone-else")  # only the claim's own domain gives it back
    assert registry.claims()[first].domain_uuid == "u4"
    registry.release(first, "u4")
    assert first not in registry.claims()


def test_an_unreadable_claim_holds_its_port_and_other_registries_are_honoured(tmp_path):
    base = _free_base(3)
    candidates = range(base, base + 3)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / f"{base}.json").write_text("{not json")
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / f"{base + 1}.json").write_text("{}")
    registry = PortRegistry(tmp_path / "mine", "qemu:///session",
                            honour=[tmp_path / "root"])
    assert registry.claim(candidates, in_use=set(), live_domains=set,
                          domain_uuid="u") == base + 2


# -- through servers create ------------------------------------------------------------------

def _creator(bbsnap: Bbsnap, work_dir: Path, connection: FakeHypervisor, registry: Path,
             uri: str, ports: str) -> tuple[ServerCreator, str, Catalogue]:
    source = raw_disk(work_dir / f"{bbsnap.data_dir.name}.raw")
    result = bbsnap("images", "import", str(source), "-n", "base")
    assert result.exit_code == 0, result.stderr
    catalogue = Catalogue(bbsnap.data_dir / "catalogue.sqlite3")
    settings = Settings(data_dir=bbsnap.data_dir, connect=uri, ssh_ports=ports)
    creator = ServerCreator(catalogue, DataDir(bbsnap.data_dir).ensure(), connection,
                            settings, lambda: "tcg",
                            port_registry=PortRegistry(registry, uri))
    return creator, result.stdout.strip(), catalogue


def test_servers_in_two_data_directories_never_share_a_port(work_dir):
    """Data directory A's server is stopped (its port not bound) on one connection; B,
    on another connection, used to be given the same port: its start then failed."""
    base = _free_base(4)
    ports = f"{base}-{base + 3}"
    key = work_dir / "id.pub"
    key.write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIG me@host\n")
    registry = work_dir / "registry"
    made = []
    catalogues = []
    for name, uri in (("a", "qemu:///system"), ("b", "qemu:///session")):
        creator, image_id, catalogue = _creator(Bbsnap(work_dir / name), work_dir,
                                                FakeHypervisor(), registry, uri, ports)
        catalogues.append(catalogue)
        for _ in range(2):
            made.append(creator.create(CreateRequest(image_id=image_id, start=False,
                                                     ssh_key_files=(key,))))
    try:
        assert sorted(s.ssh_port for s in made) == list(range(base, base + 4))
    finally:
        for catalogue in catalogues:
            catalogue.close()


def test_a_failed_create_gives_its_port_back(work_dir):
    base = _free_base(2)
    key = work_dir / "id.pub"
    key.write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIG me@host\n")
    connection = FakeHypervisor()

    def refuse(_spec: DomainSpec) -> DomainInfo:
        raise ConflictError("libvirt said no")

    creator, image_id, catalogue = _creator(Bbsnap(work_dir / "a"), work_dir, connection,
                                            work_dir / "registry", "qemu:///system",
                                            f"{base}-{base + 1}")
    try:
        connection.define = refuse  # type: ignore[method-assign]
        with pytest.raises(ConflictError, match="libvirt said no"):
            creator.create(CreateRequest(image_id=image_id, start=False, ssh_key_files=(key,)))
        assert PortRegistry(work_dir / "registry", "qemu:///system").claims() == {}
    finally:
        catalogue.close()


def test_root_claims_host_wide_and_a_normal_user_also_honours_root_s(monkeypatch, tmp_path):
    from bbsnap import netports

    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert netports.user_registry() == (netports.HOST_REGISTRY, ())
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    assert netports.user_registry() == (tmp_path / "bbsnap" / "ssh-ports",
                                        (netports.HOST_REGISTRY,))
