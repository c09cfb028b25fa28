"""Imports go one way (docs/architecture.md): each package imports only packages below it.

Read from the source (function-local imports included), so a lazy import cannot hide a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import napari_morphomol

RANKS = {
    **dict.fromkeys(("coords", "errors", "elements", "_atomic", "_lazy", "_native_libraries"), 0),
    "registration": 1,
    **dict.fromkeys(("io", "synthetic"), 2),
    "tiling": 3,
    "models": 4,
    "inference": 5,
    "analysis": 6,
    **dict.fromkeys(("layers", "export"), 7),
    **dict.fromkeys(("widgets", "_reader", "_writer", "_sample_data"), 8),
    **dict.fromkeys(("commands", "cli", "__init__"), 9),  # `morphomol demo` takes a screenshot with widgets
}
"""The rows of the diagram in docs/architecture.md, bottom (0) to top."""
SHARED_BASE = 0
"""The one row whose members may import each other."""


def _imported_parts(tree: ast.AST) -> set[str]:
    parts = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        for name in names:
            pieces = name.split(".")
            if pieces[0] == "napari_morphomol" and len(pieces) > 1 and pieces[1] in RANKS:
                parts.add(pieces[1])
    return parts


def test_every_import_goes_down_the_diagram():
    root = Path(napari_morphomol.__file__).parent
    wrong = []
    seen = set()
    for path in sorted(root.rglob("*.py")):
        part = path.relative_to(root).parts[0].removesuffix(".py")
        assert part in RANKS, f"{part} is not in the diagram of docs/architecture.md: give it a row in RANKS"
        seen.add(part)
        for imported in _imported_parts(ast.parse(path.read_text())) - {part}:
            rank, below = RANKS[part], RANKS[imported]
            if below > rank or (below == rank and rank != SHARED_BASE):
                wrong.append(f"{path.relative_to(root)} imports {imported}")
    assert not wrong, "imports that go up or sideways:\n" + "\n".join(wrong)
    assert seen == set(RANKS), f"rows without a module: {set(RANKS) - seen}"
