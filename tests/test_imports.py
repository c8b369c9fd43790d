"""Modules share only public names: no altgrad module imports (or reaches into) another module's
`_private` name, so a private name can change without breaking a neighbour."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = {"altgrad": ROOT / "altgrad", "altgrad.kernels": ROOT / "kernels"}

KNOWN: set[tuple[str, str, str]] = set()  # (file, module, private name) pairs still allowed: none


def _sources():
    return [(pkg, p) for pkg, d in PACKAGE.items() for p in sorted(d.glob("*.py"))]


def _target(pkg: str, path: pathlib.Path, node: ast.ImportFrom) -> str | None:
    """The altgrad module an ImportFrom reads, or None for a module outside the package."""
    siblings = {p.stem for p in path.parent.glob("*.py")}
    if node.level:  # relative: `from .quantize import x`
        return f"{pkg}.{node.module}" if node.module else pkg
    mod = node.module or ""
    if mod == "altgrad" or mod.startswith("altgrad."):
        return mod
    if pkg == "altgrad.kernels" and mod in siblings:  # a kernel run as a script: `from quantize import x`
        return f"{pkg}.{mod}"
    return None


def private_uses(pkg: str, path: pathlib.Path) -> list[tuple[str, str, str]]:
    """(file, module, name) for each private name the file imports from, or reads off, an altgrad module."""
    rel = path.relative_to(ROOT).as_posix()
    tree = ast.parse(path.read_text(), filename=rel)
    found, aliases = [], {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (mod := _target(pkg, path, node)):
            for a in node.names:
                if a.name.startswith("_"):
                    found.append((rel, mod, a.name))
                aliases[a.asname or a.name] = f"{mod}.{a.name}"  # maybe a module: `from altgrad import x`
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "altgrad" or a.name.startswith("altgrad."):
                    if a.asname:
                        aliases[a.asname] = a.name
                    else:
                        aliases["altgrad"] = "altgrad"
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            owner = _dotted(node.value)
            if owner and owner.split(".")[0] in aliases:
                head, _, rest = owner.partition(".")
                found.append((rel, ".".join(filter(None, (aliases[head], rest))), node.attr))
    return found


def _dotted(node: ast.expr) -> str | None:
    """"a.b.c" for a Name / Attribute chain, else None."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute) and (base := _dotted(node.value)):
        return f"{base}.{node.attr}"
    return None


def test_no_module_uses_another_modules_private_names():
    found = [u for pkg, p in _sources() for u in private_uses(pkg, p) if u not in KNOWN]
    assert found == [], "private names used across modules (make them public or move them): " + "; ".join(
        f"{f} uses {m}.{n}" for f, m, n in found)


@pytest.mark.parametrize("src, expected", [
    ("from altgrad.quantize import _round\n", [("altgrad.quantize", "_round")]),
    ("from .quantize import (check_format,\n    _scalar_tensor)\n", [("altgrad.kernels.quantize", "_scalar_tensor")]),
    ("from quantize import _check_device\n", [("altgrad.kernels.quantize", "_check_device")]),
    ("from altgrad import kernels as k\nk._x\n", [("altgrad.kernels", "_x")]),
    ("import altgrad.metrics\naltgrad.metrics._to_host([])\n", [("altgrad.metrics", "_to_host")]),
    ("import altgrad.metrics as am\nam._to_host([])\n", [("altgrad.metrics", "_to_host")]),
    ("from altgrad.quantize import quantize\nimport torch\ntorch._C\n", []),
])
def test_the_check_sees_each_form(tmp_path, src, expected):
    d = tmp_path / "kernels"
    d.mkdir()
    (d / "quantize.py").write_text("")
    f = d / "demo.py"
    f.write_text(src)
    global ROOT
    old, ROOT = ROOT, tmp_path
    try:
        got = [(m, n) for _, m, n in private_uses("altgrad.kernels", f)]
    finally:
        ROOT = old
    assert got == expected
