"""The package's layout: every module of livediff imports, and no two of them import each other.

A pair of modules that import each other works only while one of the imports stays inside a
function or under `TYPE_CHECKING`, and breaks as soon as someone moves it; the pieces both need
belong in a third module both import. The imports are read from the source with `ast`: module
level, inside functions and under `TYPE_CHECKING` alike, relative ones resolved.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import livediff

PACKAGE = Path(livediff.__file__).resolve().parent


def modules(root: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> source file, for every .py file under `root` (the package `package`)."""
    found = {}
    for file in sorted(root.rglob("*.py")):
        parts = [package, *file.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = file
    return found


def imported(name: str, file: Path, known: dict[str, Path]) -> set[str]:
    """The modules of `known` that module `name` (source `file`) imports anywhere in its source.

    `from a import b` counts as importing `a.b` when that is a module, else `a`; the packages above
    an imported module are not counted (importing `a.b` runs `a/__init__.py`, but that is a
    dependency of `a.b`'s, not a choice of the importer's).
    """
    package = name if file.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(file.read_text(), str(file))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names if alias.name in known)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                if f"{source}.{alias.name}" in known:
                    out.add(f"{source}.{alias.name}")
                elif source in known:
                    out.add(source)
    out.discard(name)
    return out


def mutual_imports(root: Path, package: str) -> list[tuple[str, str]]:
    """Every pair of modules under `root` that import each other, sorted."""
    known = modules(root, package)
    edges = {name: imported(name, file, known) for name, file in known.items()}
    return sorted({(min(a, b), max(a, b)) for a, targets in edges.items() for b in targets if a in edges[b]})


def test_no_two_modules_of_livediff_import_each_other() -> None:
    known = modules(PACKAGE, "livediff")
    assert len(known) > 50 and "livediff.models.loading" in known and "livediff.backends.unet_extras" in known
    assert mutual_imports(PACKAGE, "livediff") == []


def test_every_module_of_livediff_imports() -> None:
    for name in modules(PACKAGE, "livediff"):
        importlib.import_module(name)


def test_the_check_finds_modules_that_import_each_other(tmp_path: Path) -> None:
    """Each kind of import the check must see: relative, in a function, under TYPE_CHECKING, `from pkg import mod`."""
    files = {
        "pkg/__init__.py": "",
        "pkg/a.py": "from pkg.b import thing\n",
        "pkg/b.py": "def f():\n    from . import a\n",
        "pkg/c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.d\n",
        "pkg/d.py": "from pkg import c\n",
        "pkg/sub/__init__.py": "from .e import x\n",
        "pkg/sub/e.py": "from ..sub import y\n",
        "pkg/f.py": "import pkg.a\nfrom pkg.sub import e\n",  # one way only: not a pair
    }
    for path, text in files.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(text)
    assert mutual_imports(tmp_path / "pkg", "pkg") == [("pkg.a", "pkg.b"), ("pkg.c", "pkg.d"), ("pkg.sub", "pkg.sub.e")]
