"""generator.volumes imports only the generator parts it may (DESIGN.md §2) and no radsynth/privacy/exporters."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ALLOWED_GENERATOR = {"_utils", "checkpoints", "data", "manifest", "models", "phantoms", "recipe", "volumes"}


def test_volume_imports():
    bad = []
    for f in sorted((ROOT / "generator" / "volumes").glob("*.py")):
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else [])
            for name in names:
                bits = name.split(".")
                if bits[0] in ("radsynth", "privacy", "exporters"):
                    bad.append(f"{f.name}: {name}")
                if bits[0] == "generator" and len(bits) > 1 and bits[1] not in ALLOWED_GENERATOR:
                    bad.append(f"{f.name}: {name}")
    assert not bad, bad
