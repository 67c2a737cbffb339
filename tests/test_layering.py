"""Imports point one way: ``models`` <- ``nnoculation`` <- ``service`` / ``worker``, and the
service and the worker never import each other (they talk through Redis and the store).

Every ``.py`` file under those packages is parsed with ``ast``: ``import x``, ``from x import
y``, relative imports, imports inside functions, and ``importlib.import_module("x")`` /
``__import__("x")`` with a literal name. Packages that do not exist yet are skipped, and the
checker is tested on synthetic sources so a broken checker cannot pass silently.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN: dict[str, frozenset[str]] = {
    "models": frozenset({"nnoculation", "service", "worker"}),
    "nnoculation": frozenset({"service", "worker"}),
    "service": frozenset({"worker"}),
    "worker": frozenset({"service"}),
}
DYNAMIC_IMPORTERS = frozenset({"import_module", "__import__"})


def imported_names(source: str, module: str, is_package: bool = False) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``source``, the text of ``module``
    (``is_package``: it is a package's ``__init__``)."""
    package = module.split(".") if is_package else module.split(".")[:-1]
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                found.append((node.lineno, node.module or ""))
                continue
            if node.level - 1 >= len(package):
                found.append((node.lineno, f"<relative import above {module}>"))
                continue
            base = package[: len(package) - (node.level - 1)]
            name = ".".join(base + ([node.module] if node.module else []))
            found.append((node.lineno, name))
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            first = node.args[0]
            if (
                called in DYNAMIC_IMPORTERS
                and isinstance(first, ast.Constant)
                and isinstance(first.value, str)
            ):
                found.append((node.lineno, first.value))
    return found


def violations(source: str, module: str, is_package: bool = False) -> list[str]:
    """Imports in ``source`` that point the wrong way for ``module``'s top-level package."""
    forbidden = FORBIDDEN.get(module.split(".")[0], frozenset())
    out = []
    for line, name in imported_names(source, module, is_package):
        top = name.split(".")[0]
        if top in forbidden or name.startswith("<relative import above"):
            out.append(f"{module}:{line} imports {name}")
    return out


def package_files() -> list[tuple[Path, str, bool]]:
    files = []
    for package in FORBIDDEN:
        directory = ROOT / package
        if not directory.is_dir():
            continue  # service/ and worker/ arrive in a later release
        for path in sorted(directory.rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts = parts[:-1]
            files.append((path, ".".join(parts), is_package))
    return files


def test_imports_point_one_way() -> None:
    files = package_files()
    assert any(module.startswith("models.") for _, module, _ in files)
    assert any(module.startswith("nnoculation.") for _, module, _ in files)
    bad = [v for path, module, pkg in files for v in violations(path.read_text(), module, pkg)]
    assert not bad, "imports that point the wrong way:\n" + "\n".join(bad)


@pytest.mark.parametrize(
    ("module", "is_package", "source"),
    [
        ("models.store", False, "import nnoculation.runtime\n"),
        ("models.store", False, "from nnoculation import cli\n"),
        ("models.store", False, "def f():\n    from service.app import app\n"),
        ("models", True, "import worker as w\n"),
        ("models.sub.x", False, "from ...nnoculation import cli\n"),  # climbs out of models
        ("models.store", False, "import importlib\nimportlib.import_module('nnoculation.cli')\n"),
        ("models.store", False, "__import__('service')\n"),
        ("nnoculation.online.poller", False, "from service import settings\n"),
        ("nnoculation.repair.engine", False, "if True:\n    import worker.jobs\n"),
        ("service.app", False, "from worker.jobs import run\n"),
        ("worker.jobs", False, "from service.app import app\n"),
        ("models.store", False, "from .. import nnoculation\n"),  # above the top level
    ],
)
def test_the_checker_catches_a_wrong_import(module: str, is_package: bool, source: str) -> None:
    assert violations(source, module, is_package), source


@pytest.mark.parametrize(
    ("module", "source"),
    [
        ("models.store", "from models.bundle import Bundle\nfrom .durable import fsync_path\n"),
        ("nnoculation.cli", "from models.store import ModelStore\nimport torch\n"),
        ("service.app", "from nnoculation.repair.engine import repair\nimport models\n"),
        ("worker.jobs", "from nnoculation import runtime\nfrom . import settings\n"),
        ("models.store", "import nnoculation_extra\n"),  # another distribution, not ours
    ],
)
def test_the_checker_allows_imports_down_the_layers(module: str, source: str) -> None:
    assert violations(source, module) == []


def test_relative_imports_resolve_against_the_package() -> None:
    names = imported_names("from . import a\nfrom ..b import c\n", "pkg.sub.mod")
    assert [n for _, n in names] == ["pkg.sub", "pkg.b"]
    names = imported_names("from . import a\n", "pkg.sub", is_package=True)
    assert [n for _, n in names] == ["pkg.sub"]
