"""The package's layers: every import, at module level or inside a function,
goes to the same layer or one below it (README's layout table)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import qprobes

# Bottom to top. ``errors`` is the root every layer may use; ``progress``
# (the terminal's progress lines) sits just above it.
LAYERS = [
    "errors",
    "progress",
    "wire",
    "remote",
    "target",
    "machine",
    "arch",
    "symbols",
    "probes",
    "linux",
    "tracing",
    "frontends",
]
PACKAGE = Path(qprobes.__file__).parent


def _layer(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "qprobes" or len(parts) < 2:
        return None
    return parts[1] if parts[1] in LAYERS else None


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
    return found


def _sources() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if _layer_of_file(p) is not None)


def _layer_of_file(path: Path) -> str | None:
    rel = path.relative_to(PACKAGE).parts
    name = rel[0].removesuffix(".py")
    return name if name in LAYERS else None


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_import_runs_up_the_layers(path: Path) -> None:
    own = _layer_of_file(path)
    assert own is not None
    up = [
        f"line {line}: {module}"
        for line, module in _imports(path)
        if (target := _layer(module)) is not None and LAYERS.index(target) > LAYERS.index(own)
    ]
    assert not up, f"{path.relative_to(PACKAGE)} ({own}) imports from above: {up}"


def test_every_package_folder_is_a_known_layer() -> None:
    folders = {
        p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()
    }
    assert folders <= set(LAYERS), folders - set(LAYERS)


def test_the_checker_sees_an_upward_import(tmp_path: Path) -> None:
    """The walk finds imports inside functions too (the ones easiest to miss)."""
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from qprobes.frontends.session import Session\n")
    assert _imports(src) == [(2, "qprobes.frontends.session")]
