"""Rules the code keeps, checked on its source: nothing reaches a shell, XML is built only
with ElementTree, and only the adapter imports libvirt."""

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


def test_subprocesses_start_only_in_proc():
    for path in SOURCES:
        if path.name == "proc.py":
            continue
        assert "subprocess.Popen(" not in path.read_text(), path
        assert "subprocess.run(" not in path.read_text(), path


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
