"""Rules the code keeps, checked on its source: nothing reaches a shell, XML is built only
with ElementTree, only the adapter imports libvirt, and services and the CLI never handle
libvirt XML (they speak the hypervisor port's models)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "bbsnap"
SOURCES = sorted(PACKAGE.rglob("*.py"))


def _calls(tree: ast.AST):
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call)]


def test_no_shell_anywhere():
    for path in SOURCES:
        tree = ast.parse(path.read_text())
        for call in _calls(tree):
            for keyword in call.keywords:
                assert not (keyword.arg == "shell" and getattr(keyword.value, "value", False)), \
                    f"shell=True in {path}"
            func = call.func
            if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
                forbidden = {"os": ("system", "popen"), "subprocess": ("getoutput",
                                                                      "getstatusoutput")}
                assert func.attr not in forbidden.get(func.value.id, ()), \
                    f"{func.value.id}.{func.attr}() in {path}"


# Everything in these modules that starts a process; constants (PIPE, DEVNULL) and exception
# classes (TimeoutExpired) stay usable everywhere.
_PROCESS_STARTERS = {
    "subprocess": {"Popen", "run", "call", "check_call", "check_output", "getoutput",
                   "getstatusoutput"},
    "os": {"system", "popen", "fork", "forkpty", "posix_spawn", "posix_spawnp", "execv",
           "execve", "execvp", "execvpe", "execl", "execle", "execlp", "execlpe", "spawnv",
           "spawnve", "spawnvp", "spawnvpe", "spawnl", "spawnle", "spawnlp", "spawnlpe"},
    "pty": {"spawn", "fork"},
    "multiprocessing": {"Process", "Pool"},
}


def _process_starts(tree: ast.AST) -> list[str]:
    """Every way this module could start a process, found on its syntax tree (so an alias
    or a ``from subprocess import Popen`` cannot slip past a text search)."""
    aliases: dict[str, str] = {}  # local name -> module it stands for
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                root = alias.name.split(".")[0]
                if root in _PROCESS_STARTERS:
                    aliases[alias.asname or root] = root
        elif isinstance(node, ast.ImportFrom) and node.module:
            root = node.module.split(".")[0]
            for alias in node.names:
                if alias.name in _PROCESS_STARTERS.get(root, ()):
                    found.append(f"from {node.module} import {alias.name}")
                if alias.name == "*" and root in _PROCESS_STARTERS:
                    found.append(f"from {node.module} import *")
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and node.attr in _PROCESS_STARTERS[aliases[node.value.id]]):
            found.append(f"{node.value.id}.{node.attr}")
    return found


def test_subprocesses_start_only_in_proc():
    for path in SOURCES:
        if path.name == "proc.py" and path.parent == PACKAGE:
            continue
        assert _process_starts(ast.parse(path.read_text())) == [], path


def test_the_process_rule_sees_through_aliases():
    sneaky = ("from subprocess import Popen\n"
              "import subprocess as sp\n"
              "import os\n"
              "sp.run(['true'])\n"
              "os.execv('/bin/true', ['true'])\n")
    assert sorted(_process_starts(ast.parse(sneaky))) == [
        "from subprocess import Popen", "os.execv", "sp.run"]
    harmless = "import subprocess\nx = subprocess.DEVNULL\nsubprocess.TimeoutExpired\n"
    assert _process_starts(ast.parse(harmless)) == []


def test_xml_is_never_formatted_as_text():
    for path in SOURCES:
        text = path.read_text()
        for marker in ('f"<', "f'<", '"<domain', "'<domain", '"<disk', "'<disk"):
            assert marker not in text, f"XML built as text in {path} ({marker})"


def test_only_the_adapter_imports_libvirt():
    for path in SOURCES:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            if any(n.split(".")[0] in ("libvirt", "libvirt_qemu") for n in names):
                assert path.name == "libvirt_adapter.py", f"libvirt imported in {path}"


def _imports(path: Path, tree: ast.AST) -> set[str]:
    """Every module *path* imports, relative imports resolved (``from ..hypervisor import
    domain_xml`` names bbsnap.hypervisor.domain_xml too)."""
    package = list(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *(node.module.split(".") if node.module else [])])
            found.add(module)
            found.update(f"{module}.{a.name}" for a in node.names)
    return found


# Where the use cases and the command line live: they speak the port's models, never XML.
_MODEL_SPEAKERS = ("services", "cli")


def test_services_and_cli_never_touch_libvirt_xml():
    for path in SOURCES:
        if path.relative_to(PACKAGE).parts[0] not in _MODEL_SPEAKERS:
            continue
        tree = ast.parse(path.read_text())
        xml = sorted(m for m in _imports(path, tree)
                     if m in ("xml", "bbsnap.hypervisor.domain_xml")
                     or m.startswith(("bbsnap.hypervisor.domain_xml.", "xml.", "lxml")))
        assert xml == [], f"{path} imports {xml}"
        calls = [c.func.attr for c in _calls(tree) if isinstance(c.func, ast.Attribute)
                 and c.func.attr == "domain_xml"]
        assert calls == [], f"{path} reads a domain's XML (use the port's facts())"


def test_the_xml_rule_resolves_relative_imports():
    path = PACKAGE / "services" / "example.py"
    sneaky = ast.parse("from ..hypervisor import domain_xml\n"
                       "from ..hypervisor.domain_xml import read_disks\n"
                       "from xml.etree import ElementTree\n")
    assert {"bbsnap.hypervisor.domain_xml", "bbsnap.hypervisor.domain_xml.read_disks",
            "xml.etree", "xml.etree.ElementTree"} <= _imports(path, sneaky)
    fine = ast.parse("from ..hypervisor import DomainSpec\nfrom . import snapshot_chain\n")
    assert _imports(path, fine) == {"bbsnap.hypervisor", "bbsnap.hypervisor.DomainSpec",
                                    "bbsnap.services", "bbsnap.services.snapshot_chain"}


def test_cli_choices_come_from_the_shared_vocabulary():
    """`click.Choice` is never given a literal list: the words the CLI offers are the ones
    the services accept (bbsnap/vocabulary.py, models.py), defined once."""
    for path in sorted((PACKAGE / "cli").glob("*.py")):
        for call in _calls(ast.parse(path.read_text())):
            func = call.func
            if isinstance(func, ast.Attribute) and func.attr == "Choice" and call.args:
                assert not isinstance(call.args[0], (ast.List, ast.Tuple, ast.Set)), \
                    f"a literal click.Choice in {path}:{call.lineno}"


# Entry points that own a stream: the CLI, the snapshot worker (its log file), the command
# server's process and its spares (its log file), the tiny-guest builder's and the
# acceleration probe's own commands. Everything else reports through bbsnap/reporting.py.
_MAY_PRINT = {PACKAGE / "services" / "snapshots" / "worker.py", PACKAGE / "accel.py",
              PACKAGE / "tinyguest" / "__main__.py", PACKAGE / "cmdserver" / "server.py",
              PACKAGE / "cmdserver" / "session.py"}


def test_library_code_never_prints():
    for path in SOURCES:
        if path in _MAY_PRINT or (PACKAGE / "cli") in path.parents:
            continue
        tree = ast.parse(path.read_text())
        for call in _calls(tree):
            assert not (isinstance(call.func, ast.Name) and call.func.id == "print"), \
                f"print() in {path}:{call.lineno}"
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr == "stderr" and \
                    isinstance(node.value, ast.Name) and node.value.id == "sys":
                raise AssertionError(f"sys.stderr in {path}:{node.lineno}")
