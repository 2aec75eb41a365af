"""Imports point down only: shells (MedSAM2.py, MedSAM2Web) -> MedSAM2Lib -> medsam2.

Read with `ast` from every .py file of each layer; an import inside a function counts as much as
one at the top (a lazy import still ties the layers together).

- medsam2 (the engine) imports nothing of Slicer, Qt, VTK, CTK, or the layers above it;
- its core (the top-level modules and io/) imports nothing from remote/ or cli/, which build on it;
- MedSAM2Lib (Slicer logic) imports no Qt/CTK and never a shell;
- MedSAM2Web (the web shell) imports no Qt/CTK and never the Qt module MedSAM2.py.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ROOT / "MedSAM2Slicer"
ENGINE = PACKAGES / "medsam2"
LIB = PACKAGES / "MedSAM2Lib"

QT = {"qt", "ctk", "PythonQt"}
SLICER = {"slicer", "vtk", "vtkmodules", "mrml", "trame_slicer"} | QT
SHELLS = {"MedSAM2", "MedSAM2Web"}


def module_name(path: Path) -> str:
    """Dotted name of a source file under MedSAM2Slicer/ (a package's __init__ is the package)."""
    parts = list(path.relative_to(PACKAGES).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(source: str, name: str, is_package: bool = False) -> set:
    """Every module a source imports, anywhere in it, as absolute dotted names (relative imports
    resolved against `name`; `from X import y` counts X and X.y, since y may be a module)."""
    package = name.split(".") if is_package else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names if alias.name != "*")
    return found


def _imports_of(path: Path) -> set:
    return imported_modules(path.read_text(), module_name(path), path.name == "__init__.py")


def _top(modules) -> set:
    return {m.split(".")[0] for m in modules}


def _files(folder: Path):
    return sorted(folder.rglob("*.py"))


def _web_shell_files():
    return [p for folder in PACKAGES.rglob("MedSAM2Web") if folder.is_dir() for p in _files(folder)] + \
        sorted(PACKAGES.glob("MedSAM2Web.py"))


def test_the_checker_sees_lazy_and_relative_imports():
    source = "import numpy\ndef f():\n    import qt\n    from ..remote import client\n    from . import cli\n"
    found = imported_modules(source, "medsam2.io.volume_io")
    assert {"numpy", "qt", "medsam2.remote", "medsam2.remote.client", "medsam2.io", "medsam2.io.cli"} <= found
    assert "medsam2.remote" in imported_modules("from .remote import wire", "medsam2", is_package=True)


@pytest.mark.parametrize("path", _files(ENGINE), ids=lambda p: p.relative_to(ENGINE).as_posix())
def test_engine_imports_no_slicer_qt_vtk_or_a_layer_above(path):
    bad = _top(_imports_of(path)) & (SLICER | SHELLS | {"MedSAM2Lib"})
    assert not bad, f"medsam2/{path.relative_to(ENGINE)} imports {sorted(bad)}: the engine runs without Slicer"


def _is_core(path: Path) -> bool:
    rel = path.relative_to(ENGINE).parts
    return len(rel) == 1 or rel[0] in ("io", "models", "tracking", "study")


@pytest.mark.parametrize("path", [p for p in _files(ENGINE) if _is_core(p)],
                         ids=lambda p: p.relative_to(ENGINE).as_posix())
def test_engine_core_imports_nothing_from_remote_or_cli(path):
    bad = sorted(m for m in _imports_of(path) if m.split(".")[:2] in (["medsam2", "remote"], ["medsam2", "cli"]))
    assert not bad, f"medsam2/{path.relative_to(ENGINE)} imports {bad}: remote/ and cli/ build on the core, not under it"


@pytest.mark.parametrize("path", _files(LIB), ids=lambda p: p.relative_to(LIB).as_posix())
def test_slicer_logic_imports_no_qt_and_no_shell(path):
    bad = _top(_imports_of(path)) & (QT | SHELLS)
    assert not bad, f"MedSAM2Lib/{path.relative_to(LIB)} imports {sorted(bad)}: the logic is shared by both shells"


@pytest.mark.parametrize("path", _web_shell_files(), ids=lambda p: p.relative_to(PACKAGES).as_posix())
def test_web_shell_imports_no_qt_and_not_the_qt_shell(path):
    bad = _top(_imports_of(path)) & (QT | {"MedSAM2"})
    assert not bad, f"{path.relative_to(PACKAGES)} imports {sorted(bad)}: the web shell runs without Qt"


def test_every_layer_was_scanned():
    engine = _files(ENGINE)
    assert len(engine) > 20 and any(p.parent.name == "io" for p in engine) and any(p.parent.name == "cli" for p in engine)
    assert len(_files(LIB)) >= 3
