"""DESIGN.md §2: exporters take arrays plus metadata and import no other RadSynth package."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import exporters

FORBIDDEN = {"generator", "conditioning", "privacy", "radsynth", "torch", "diffusers"}


def test_exporters_import_no_pipeline_packages():
    root = Path(exporters.__file__).parent
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] not in FORBIDDEN, f"{path.name} imports {name}"


def test_import_stays_light():
    code = "import sys, exporters; print(any(m in sys.modules for m in ('torch', 'generator', 'diffusers')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "False"
