"""Layering and size budget of the package (docs/architecture.md, "Contracts between rooms").

A module may import only rooms at its level or below; files stay under 600 lines (the hard
cap; 400 is the budget to aim for).
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "minicpm4"
HARD_CAP = 600

ALLOWED = {
    "cli": {"serve", "engine", "train", "model", "quant", "kernels", "data", "utils", "loading",
            "tokenizer", "detokenize"},
    "loading": {"model", "tokenizer", "detokenize", "kernels", "utils"},
    "serve": {"engine", "model", "quant", "kernels", "utils", "loading", "tokenizer",
              "detokenize"},
    "engine": {"model", "quant", "kernels", "utils", "tokenizer", "detokenize"},
    "train": {"model", "quant", "data", "kernels", "utils", "tokenizer", "detokenize"},
    "model": {"kernels", "utils"},
    "quant": {"kernels", "utils"},
    "kernels": {"utils"},
    "data": {"utils", "tokenizer", "detokenize"},
    "tokenizer": {"detokenize"},
    "detokenize": set(),
    "utils": set(),
}


def _room(path: Path) -> str:
    rel = path.relative_to(PKG)
    return rel.parts[0].removesuffix(".py")


def _imported_rooms(path: Path) -> set[str]:
    rooms = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        for name in names:
            parts = name.split(".")
            if parts[0] == "minicpm4" and len(parts) > 1:
                rooms.add(parts[1])
    return rooms


def _modules() -> list[Path]:
    return [p for p in PKG.rglob("*.py") if p.name not in ("__init__.py", "__main__.py")]


def test_layering() -> None:
    bad = []
    for path in _modules():
        room = _room(path)
        assert room in ALLOWED, f"{path}: room '{room}' is not in the layering table"
        for other in _imported_rooms(path) - {room}:
            if other not in ALLOWED[room]:
                bad.append(f"{path.relative_to(PKG)} imports minicpm4.{other}")
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_file_size_budget() -> None:
    big = [f"{p.relative_to(PKG)}: {n} lines" for p in PKG.rglob("*.py")
           if (n := len(p.read_text(encoding="utf-8").splitlines())) > HARD_CAP]
    assert not big, "modules over the hard cap:\n" + "\n".join(big)


def test_every_module_has_a_docstring() -> None:
    missing = [str(p.relative_to(PKG)) for p in PKG.rglob("*.py")
               if p.stat().st_size and ast.get_docstring(ast.parse(p.read_text())) is None]
    assert not missing, f"modules without a docstring: {missing}"
