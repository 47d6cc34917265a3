"""``radsynth export`` with bad input: one error line naming the file or flag, exit 2, nothing written."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image

from radsynth.cli import main

Case = Callable[[Path, Path], tuple[list[str], str]]  # (input folder, output) -> (extra argv, expected text)


def _png(path: Path, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (12, 12), dtype=np.uint8)).save(path)


def _folder(src: Path, rows: list | None = None, raw: bytes | None = None) -> None:
    src.mkdir(parents=True, exist_ok=True)
    for i in range(2):
        _png(src / f"{i}.png", i)
    if raw is None:
        rows = rows if rows is not None else [{"file_name": f"{i}.png", "text": "chest", "seed": i} for i in range(2)]
        raw = "".join(json.dumps(r) + "\n" for r in rows).encode()
    (src / "metadata.jsonl").write_bytes(raw)


def _ok(i: int = 0, **kw) -> dict:
    return {"file_name": f"{i}.png", "text": "chest", "seed": i, **kw}


def _rows(*rows: dict) -> Case:
    def make(src: Path, out: Path) -> tuple[list[str], str]:
        _folder(src, list(rows))
        return [], "metadata.jsonl row"

    return make


def _raw(data: bytes, expect: str) -> Case:
    def make(src: Path, out: Path) -> tuple[list[str], str]:
        _folder(src, raw=data)
        return [], expect

    return make


def _flags(*argv: str, expect: str) -> Case:
    def make(src: Path, out: Path) -> tuple[list[str], str]:
        _folder(src)
        return list(argv), expect

    return make


def _missing_input(src: Path, out: Path):
    return [], "does not exist"


def _input_is_file(src: Path, out: Path):
    src.parent.mkdir(parents=True, exist_ok=True)
    src.write_text("not a folder")
    return [], "not a folder"


def _no_metadata(src: Path, out: Path):
    src.mkdir(parents=True)
    _png(src / "0.png")
    return [], "no metadata.jsonl"


def _truncated_png(src: Path, out: Path):
    _folder(src)
    data = (src / "1.png").read_bytes()
    (src / "1.png").write_bytes(data[: len(data) // 2])
    return [], "1.png"


def _text_as_png(src: Path, out: Path):
    _folder(src)
    (src / "1.png").write_text("hello")
    return [], "1.png"


def _missing_png(src: Path, out: Path):
    _folder(src)
    (src / "1.png").unlink()
    return [], "1.png"


def _symlink_outside(src: Path, out: Path):
    _folder(src)
    (src / "1.png").unlink()
    (src / "1.png").symlink_to(src.parent / "elsewhere.png")
    _png(src.parent / "elsewhere.png")
    return [], "points outside"


def _output_is_file(src: Path, out: Path):
    _folder(src)
    out.write_text("I am a file")
    return [], str(out)


def _output_inside_input(src: Path, out: Path):
    _folder(src)
    return ["--output", str(src / "exported")], "inside the input folder"


def _bad_csv(src: Path, out: Path):
    src.mkdir(parents=True)
    _png(src / "0.png")
    (src / "metadata.csv").write_bytes(b"file_name,text\n0.png,caf\xe9\n")
    return [], "metadata.csv line 2: not UTF-8"


GOOD = b'{"file_name": "0.png", "text": "chest", "seed": 0}\n'

CASES: dict[str, Case] = {
    "missing input": _missing_input,
    "input is a file": _input_is_file,
    "no metadata": _no_metadata,
    "empty metadata": _raw(b"\n\n", "lists no images"),
    "line is a list": _raw(GOOD + b'["0.png", "chest"]\n', "line 2: expected a JSON object, got an array"),
    "line is a number": _raw(b"42\n", "line 1: expected a JSON object, got a number"),
    "line is a string": _raw(b'"0.png"\n', "expected a JSON object, got a string"),
    "not JSON": _raw(b"file_name=0.png\n" + GOOD, "line 1: not valid JSON"),
    "not UTF-8": _raw(GOOD + b'{"file_name": "1.png", "text": "caf\xe9"}\n', "line 2: not UTF-8"),
    "torn last line": _raw(GOOD + b'{"file_name": "1.png", "te', "line 2: torn last line"),
    "CSV not UTF-8": _bad_csv,
    "no file_name": _rows(_ok(0), {"text": "chest"}),
    "file_name not a string": _rows(_ok(0), {"file_name": 5}),
    "empty file_name": _rows({"file_name": ""}),
    "parent path": _rows(_ok(0), _ok(1, file_name="../../x.png")),
    "absolute path": _rows(_ok(0, file_name="/etc/passwd")),
    "backslash path": _rows(_ok(0, file_name="..\\1.png")),
    "drive path": _rows(_ok(0, file_name="C:/1.png")),
    "UNC path": _rows(_ok(0, file_name="//server/share/1.png")),
    "symlink outside": _symlink_outside,
    "listed file missing": _missing_png,
    "truncated PNG": _truncated_png,
    "not an image": _text_as_png,
    "duplicate file_name": _rows(_ok(0), _ok(1, file_name="0.png")),
    "bad seed": _rows(_ok(0), _ok(1, seed="abc")),  # "metadata.jsonl row 2"
    "bad sex": _rows(_ok(0, attributes={"sex": "X"})),
    "bad intensity": _rows(_ok(0, intensity={"low": 5, "high": 1})),
    "unknown modality": _flags("--modality", "US", expect="--modality 'US'"),
    "misspelt modality": _flags("--modality", "mri", expect="did you mean 'MR'"),
    "unknown format": _flags("--format", "png", expect="--format 'png'"),
    "images-per-study 0": _flags("--images-per-study", "0", expect="--images-per-study '0'"),
    "images-per-study negative": _flags("--images-per-study", "-3", expect="--images-per-study '-3'"),
    "images-per-study not a number": _flags("--images-per-study", "two", expect="--images-per-study 'two'"),
    "output is a file": _output_is_file,
    "output inside input": _output_inside_input,
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_error_line(tmp_path, capsys, name):
    src, out = tmp_path / "in", tmp_path / "out"
    extra, expect = CASES[name](src, out)
    argv = ["export", "--input", str(src), "--format", "dicom", "--format", "nifti", "--output", str(out), *extra]
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.rstrip("\n")
    assert "\n" not in err and "Traceback" not in err, err
    assert err.startswith("radsynth export: error: ") and expect in err, err
    assert captured.out == ""
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before, "files were written"


def test_permission_denied_on_output_is_one_line_exit_1(tmp_path):
    """A read-only parent folder: exit 1 (a run-time error), one line naming the output, nothing written.

    Root ignores permission bits, so as root the command runs under ``setpriv`` without the
    capabilities that bypass them (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER).
    """
    src, locked = tmp_path / "in", tmp_path / "locked"
    _folder(src)
    locked.mkdir()
    os.chmod(locked, 0o555)
    prefix: list[str] = []
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root without setpriv (util-linux): cannot drop CAP_DAC_OVERRIDE")
        prefix = [setpriv, "--bounding-set=-dac_override,-dac_read_search,-fowner", "--inh-caps=-all"]
    code = (
        "import sys; from radsynth.cli import main; "
        f"sys.exit(main(['export', '--input', {str(src)!r}, '--format', 'dicom', '--output', {str(locked / 'out')!r}]))"
    )
    try:
        proc = subprocess.run([*prefix, sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    finally:
        os.chmod(locked, 0o755)
    err = proc.stderr.strip()
    assert proc.returncode == 1, err
    assert "\n" not in err and err.startswith("radsynth export: error: ") and "ermission denied" in err, err
    assert str(locked / "out") in err
    assert list(locked.iterdir()) == []
