"""Product code apart from experiments (issue 17): the product never imports benchmarks/, the measuring scripts in
benchmarks/ use only the public names of the workbench's modules, and eval/ holds no measuring script."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PRODUCT = ("calib", "common", "data", "engines", "eval", "interop", "model", "plugins", "quant", "qat")
BENCHMARKS = ROOT / "benchmarks"


def workbench_packages() -> set[str]:
    """Top-level names of the workbench's own modules: its package folders and cli."""
    return {p.parent.name for p in ROOT.glob("*/__init__.py")} | {p.stem for p in ROOT.glob("*.py")}


def product_files() -> list[Path]:
    files = [ROOT / "cli.py"]
    for package in PRODUCT:
        if (ROOT / package).is_dir():
            files += sorted((ROOT / package).rglob("*.py"))
    return files


def parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def where(path: Path, node: ast.AST) -> str:
    return f"{path.relative_to(ROOT)}:{node.lineno}"


def private(name: str) -> bool:
    """A name below a module's public surface: a leading underscore, not a dunder (__version__, __future__)."""
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def imported_modules(node: ast.AST) -> list[str]:
    """The dotted module names an import statement, or importlib.import_module("...") / __import__("..."), names."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom):
        return [node.module] if node.module and node.level == 0 else []
    if (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)):
        f = node.func
        name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
        if name in ("import_module", "__import__"):
            return [node.args[0].value]
    return []


def test_product_never_imports_benchmarks():
    files = product_files()
    assert len(files) > 20, "the product packages were not found"
    offenders = []
    for path in files:
        for node in ast.walk(parse(path)):
            for module in imported_modules(node):
                if module.split(".")[0] == "benchmarks":
                    offenders.append(f"{where(path, node)} imports {module}")
    assert not offenders, ("product code must not import the measuring scripts in benchmarks/:\n  "
                           + "\n  ".join(offenders))


def _dotted(node: ast.AST) -> list[str] | None:
    """a.b.c as ["a", "b", "c"]; None for anything but names and attributes."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return [node.id] + parts[::-1]


def private_uses(path: Path, ours: set[str]) -> list[str]:
    """Every private name or module of the workbench's own packages that `path` imports or reads."""
    tree = parse(path)
    found = []
    modules: dict[str, str] = {}  # local name -> the workbench module it is bound to
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] not in ours:
                    continue
                if any(private(part) for part in a.name.split(".")):
                    found.append(f"{where(path, node)}: import {a.name} (a private module)")
                if a.asname:
                    modules[a.asname] = a.name
                else:
                    modules[a.name.split(".")[0]] = a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                found.append(f"{where(path, node)}: relative import (name the module)")
                continue
            if not node.module or node.module.split(".")[0] not in ours:
                continue
            if any(private(part) for part in node.module.split(".")):
                found.append(f"{where(path, node)}: from {node.module} import ... (a private module)")
            for a in node.names:
                if private(a.name):
                    found.append(f"{where(path, node)}: from {node.module} import {a.name} (a private name)")
                submodule = f"{node.module}.{a.name}"
                if (ROOT / Path(*submodule.split("."))).with_suffix(".py").is_file() or \
                        (ROOT / Path(*submodule.split(".")) / "__init__.py").is_file():
                    modules[a.asname or a.name] = submodule
        elif isinstance(node, ast.Call):
            for module in imported_modules(node):
                if module.split(".")[0] in ours and any(private(part) for part in module.split(".")):
                    found.append(f"{where(path, node)}: imports {module} (a private module)")
    inner = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Attribute)}  # a.b of a.b.c
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute) or id(node) in inner:
            continue
        chain = _dotted(node)
        if chain and chain[0] in modules:
            bad = [part for part in chain[1:] if private(part)]
            if bad:
                found.append(f"{where(path, node)}: {'.'.join(chain)} ({modules[chain[0]]}: private {bad[0]})")
    return sorted(set(found))


def test_benchmarks_use_only_public_names():
    scripts = sorted(BENCHMARKS.glob("*.py"))
    assert (BENCHMARKS / "__init__.py").is_file() and len(scripts) > 5, "benchmarks/ was not found"
    ours = workbench_packages()
    assert {"plugins", "engines", "eval", "benchmarks"} <= ours
    offenders = [use for path in scripts for use in private_uses(path, ours)]
    assert not offenders, ("benchmarks/ may use only public names of the workbench's modules (make what a script "
                           "needs public in its module):\n  " + "\n  ".join(offenders))


def test_private_uses_are_found(tmp_path, monkeypatch):
    """The checker itself: each kind of private use is reported, public ones and other libraries' are not."""
    script = tmp_path / "probe.py"
    script.write_text("import importlib\nimport torch\nimport plugins.int8_linear as L\nimport plugins._x\n"
                      "from plugins import common, _y\nfrom plugins.layernorm import _launch, layernorm_quant\n"
                      "from plugins._z import w\nimport engines\n"
                      "L._gelu = 1\nL.int8_linear(1)\ncommon._hidden\ncommon.out_recip\nengines.tuning._t\n"
                      "torch._int_mm\nL.__name__\nimportlib.import_module('plugins._q')\n", encoding="utf-8")
    monkeypatch.setitem(globals(), "where", lambda path, node: f"line {node.lineno}")
    found = private_uses(script, {"plugins", "engines"})
    lines = sorted(int(f.split(":")[0].split()[1]) for f in found)
    assert lines == [4, 5, 6, 7, 9, 11, 13, 16], found


def test_eval_holds_no_measuring_scripts():
    offenders = sorted(p.name for p in (ROOT / "eval").iterdir() if p.name.startswith(("device_", "bench_")))
    assert not offenders, f"measuring scripts belong in benchmarks/, not eval/: {', '.join(offenders)}"
