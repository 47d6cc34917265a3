"""Dependencies run one way (DESIGN.md §2, REVIEW §1): checked on every import, lazy ones included."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("conditioning", "generator", "privacy", "exporters", "radsynth")

#: What each library package may import from RadSynth (besides itself).
ALLOWED = {
    "conditioning": set(),
    "generator": {"conditioning"},
    "privacy": set(),
    "exporters": set(),
}
#: Inside ``generator``: module or subpackage -> the generator parts it may import.
GENERATOR_LAYERS = {
    "_utils": set(),
    "manifest": {"_utils"},
    "data": {"_utils", "manifest"},
    "models": {"_utils"},
    "phantoms": {"manifest"},
    "evaluation": {"_utils"},
    "gallery": {"manifest"},
    "demo": set(),
    "checkpoints": {"_utils"},
    "recipe": set(),
    "training": {"_utils", "checkpoints", "data", "models", "manifest", "recipe"},
    "generation": {"_utils", "manifest", "models"},
    "volumes": {"_utils", "checkpoints", "data", "manifest", "models", "phantoms", "recipe"},
    "stress": {"_utils", "data", "manifest", "models", "generation", "evaluation", "phantoms", "gallery"},
}


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.extend(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


def _files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_library_packages_import_one_way(package: str) -> None:
    bad = []
    for f in _files(package):
        for name in _imports(f):
            top = name.split(".")[0]
            if top in PACKAGES and top != package and top not in ALLOWED[package]:
                bad.append(f"{f.relative_to(ROOT)} imports {name}")
    assert not bad, "\n".join(bad)


def test_generator_subpackages_layered() -> None:
    bad = []
    for f in _files("generator"):
        rel = f.relative_to(ROOT / "generator")
        part = rel.parts[0].removesuffix(".py")
        if part == "__init__":
            continue
        assert part in GENERATOR_LAYERS, f"new generator part {part}: add it to GENERATOR_LAYERS"
        for name in _imports(f):
            bits = name.split(".")
            if bits[0] != "generator" or len(bits) < 2:
                continue
            if bits[1] != part and bits[1] not in GENERATOR_LAYERS[part]:
                bad.append(f"generator/{rel} imports {name}")
    assert not bad, "\n".join(bad)


def test_verbs_do_not_import_each_other() -> None:
    commands = ROOT / "radsynth" / "commands"
    verbs = {p.stem for p in commands.glob("*.py") if not p.stem.startswith("_")}
    bad = []
    for f in commands.glob("*.py"):
        for name in _imports(f):
            bits = name.split(".")
            if bits[:2] == ["radsynth", "commands"] and len(bits) > 2 and bits[2] in verbs:
                bad.append(f"{f.name} imports {name}")
    assert not bad, "\n".join(bad)


def test_scripts_do_not_edit_sys_path() -> None:
    bad = [p.name for p in (ROOT / "scripts").glob("*.py") if "sys.path.insert" in p.read_text(encoding="utf-8")]
    assert not bad, f"scripts import the installed package; these edit sys.path: {bad}"


def test_marked_copies_are_identical() -> None:
    """``exporters`` keeps a copy of the generator's file-name resolver; the two must not drift."""
    import inspect

    import exporters.folder
    import generator.data.metadata

    assert inspect.getsource(generator.data.metadata.resolve_member) == \
        inspect.getsource(exporters.folder.resolve_member)
