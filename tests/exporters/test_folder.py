"""export_imagefolder: path safety, file modes, temporary files, resume, refusal of another export."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from exporters.files import atomic_write, clean_stale_temps
from exporters.folder import MANIFEST, RECORD, export_imagefolder, resolve_member


def _imagefolder(root: Path, meta, smooth, n: int = 5, names: list[str] | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        line = meta(i)
        Image.fromarray(np.round(smooth(12, 12, seed=i) * 255).astype(np.uint8)).save(root / f"{i}.png")
        line["file_name"] = f"{i}.png" if names is None else names[i]
        lines.append(json.dumps(line))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# -- 1. one resolver for metadata file names ---------------------------------------------------------
@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    (root / "sub").mkdir(parents=True)
    (root / "a.png").write_bytes(b"x")
    (root / "sub" / "b.png").write_bytes(b"x")
    (tmp_path / "secret.png").write_bytes(b"secret")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "c.png").write_bytes(b"secret")
    (root / "link_out.png").symlink_to(tmp_path / "secret.png")
    (root / "dir_out").symlink_to(tmp_path / "outside")
    (root / "link_in.png").symlink_to(root / "sub" / "b.png")
    return root


@pytest.mark.parametrize(
    "name,expected",
    [("a.png", "a.png"), ("sub/b.png", "sub/b.png"), ("sub/../a.png", "a.png"), ("./sub/b.png", "sub/b.png"),
     ("link_in.png", "sub/b.png"), ("missing.png", "missing.png")],
)
def test_resolve_member_accepts_names_inside(root, name, expected):
    assert resolve_member(root, name) == (root / expected).resolve()


@pytest.mark.parametrize(
    "name",
    [
        "../secret.png",  # parent
        "../../etc/passwd",
        "sub/../../secret.png",  # climbs out through a sub-folder
        "/etc/passwd",  # absolute POSIX
        "//server/share/x.png",  # POSIX-spelled UNC
        "\\\\server\\share\\x.png",  # Windows UNC
        "C:\\Windows\\x.png",  # drive + backslashes
        "C:x.png",  # drive-relative
        "C:/x.png",  # drive with slash
        "..\\secret.png",  # backslash trick
        "sub\\..\\..\\secret.png",
        "",  # empty
        "   ",  # blank
        "a\x00.png",  # NUL
        "link_out.png",  # symlink to a file outside
        "dir_out/c.png",  # through a symlinked folder outside
        ".",  # the folder itself
        "sub/..",
        None,  # not a string
        7,
    ],
)
def test_resolve_member_refuses(root, name):
    source = root / "metadata.jsonl"
    with pytest.raises(ValueError) as info:
        resolve_member(root, name, source=source, row=12)
    message = str(info.value)
    assert str(source) in message and "row 12" in message and repr(name) in message
    assert "\n" not in message


def test_export_refuses_outside_row_up_front(tmp_path, meta, smooth):
    src = _imagefolder(tmp_path / "in", meta, smooth, n=3, names=["0.png", "1.png", "../secret.png"])
    (tmp_path / "secret.png").write_bytes((src / "2.png").read_bytes())
    with pytest.raises(ValueError, match=r"metadata\.jsonl row 3: file_name='\.\./secret\.png'"):
        export_imagefolder(src, tmp_path / "out", ["dicom", "nifti"])
    assert not (tmp_path / "out").exists(), "nothing may be exported when a row is refused"


def test_export_refuses_symlink_outside(tmp_path, meta, smooth):
    src = _imagefolder(tmp_path / "in", meta, smooth, n=2)
    (tmp_path / "outside.png").write_bytes((src / "1.png").read_bytes())
    (src / "1.png").unlink()
    (src / "1.png").symlink_to(tmp_path / "outside.png")
    with pytest.raises(ValueError, match="row 2.*points outside"):
        export_imagefolder(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# -- 2. file modes follow the umask ----------------------------------------------------------------
@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_modes_follow_umask(tmp_path, meta, smooth, umask, mode):
    src = _imagefolder(tmp_path / "in", meta, smooth, n=2)
    old = os.umask(umask)
    try:
        export_imagefolder(src, tmp_path / "out", ["dicom", "nifti"])
        # a writer that creates a private file (as mkstemp does) must not leak 0600
        atomic_write(tmp_path / "out" / "private.bin", lambda p: os.close(os.open(p, os.O_CREAT | os.O_WRONLY, 0o600)))
    finally:
        os.umask(old)
    files = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    kinds = {p.suffix for p in files}
    assert {".dcm", ".gz", ".json", ".jsonl", ".bin"} <= kinds
    assert (tmp_path / "out" / MANIFEST) in files and (tmp_path / "out" / "nifti" / "0.json") in files
    assert {p.relative_to(tmp_path).as_posix(): oct(p.stat().st_mode & 0o777) for p in files} == {
        p.relative_to(tmp_path).as_posix(): oct(mode) for p in files
    }


# -- 3. temporary files: recognizable, removed when stale, never left by a failed write -------------
def test_failed_write_leaves_no_temp(tmp_path):
    def writer(path: Path) -> None:
        path.write_bytes(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(tmp_path / "x.dcm", writer)
    assert list(tmp_path.iterdir()) == []


def test_stale_temps_removed_live_ones_kept(tmp_path):
    (tmp_path / "d").mkdir()
    stale = tmp_path / "d" / ".0001.dcm.radsynth-tmp-999999999-0badf00d.dcm"
    own = tmp_path / f".x.nii.gz.radsynth-tmp-{os.getpid()}-00000000.nii.gz"
    live = tmp_path / ".y.dcm.radsynth-tmp-1-12345678.dcm"  # pid 1 always runs
    other = tmp_path / ".hidden-but-not-ours.dcm"
    for p in (stale, own, live, other):
        p.write_bytes(b"")
    assert sorted(clean_stale_temps(tmp_path)) == sorted([stale, own])
    assert live.exists() and other.exists() and not stale.exists()
    assert clean_stale_temps(tmp_path / "missing") == []


def test_export_cleans_stale_temps_on_rerun_and_overwrite(tmp_path, meta, smooth):
    src = _imagefolder(tmp_path / "in", meta, smooth, n=2)
    out = tmp_path / "out"
    export_imagefolder(src, out)
    stale = out / "dicom" / "0" / ".0.dcm.radsynth-tmp-999999999-0badf00d.dcm"
    stale.write_bytes(b"")  # what a killed export leaves
    export_imagefolder(src, out)  # the same command again
    assert not stale.exists()
    stale.write_bytes(b"")
    export_imagefolder(src, out, modality="CT", overwrite=True)
    assert not stale.exists()
    assert not [p for p in out.rglob("*") if ".radsynth-tmp-" in p.name]


# -- 3. resume -----------------------------------------------------------------------------------------
class _Stop(Exception):
    pass


@pytest.mark.parametrize("stop_after,images_per_study", [(3, 2), (1, 1), (4, 1)])
def test_interrupted_export_resumes_to_identical_result(tmp_path, meta, smooth, stop_after, images_per_study):
    src = _imagefolder(tmp_path / "in", meta, smooth, n=5)
    kw = dict(formats=["dicom", "nifti"], images_per_study=images_per_study)
    export_imagefolder(src, tmp_path / "reference", **kw)

    def stop(done: int) -> None:
        if done == stop_after:
            raise _Stop

    out = tmp_path / "out"
    with pytest.raises(_Stop):
        export_imagefolder(src, out, **kw, on_image=stop)
    assert not (out / MANIFEST).exists()
    # what a kill adds: a torn record line and a temporary file
    with open(out / RECORD, "a", encoding="utf-8") as fh:
        fh.write('{"file_name": "9.pn')
    (out / "dicom" / ".x.dcm.radsynth-tmp-999999999-0badf00d.dcm").write_bytes(b"")

    seen: list[int] = []
    summary = export_imagefolder(src, out, **kw, on_image=seen.append)
    assert summary.resumed == stop_after - stop_after % images_per_study
    assert seen == list(range(summary.resumed + 1, 6)), "only the missing images are exported again"
    assert summary.images == 5 and summary.files == {"dicom": 5, "nifti": 10}
    assert _tree(out) == _tree(tmp_path / "reference"), "resumed export differs from an uninterrupted one"
    uids = [pydicom.dcmread(p).SOPInstanceUID for p in sorted((out / "dicom").rglob("*.dcm"))]
    assert len(set(uids)) == 5


def test_completed_export_run_again_changes_nothing(tmp_path, meta, smooth):
    src = _imagefolder(tmp_path / "in", meta, smooth, n=3)
    out = tmp_path / "out"
    export_imagefolder(src, out, ["dicom"], images_per_study=2)
    before = _tree(out)
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.dcm")}
    summary = export_imagefolder(src, out, ["dicom"], images_per_study=2)
    assert summary.resumed == 3 and _tree(out) == before
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.dcm")} == stamps, "finished files were rewritten"


def test_missing_recorded_file_is_exported_again(tmp_path, meta, smooth):
    src = _imagefolder(tmp_path / "in", meta, smooth, n=3)
    out = tmp_path / "out"
    export_imagefolder(src, out, ["nifti"])
    reference = _tree(out)
    (out / "nifti" / "1.nii.gz").unlink()
    assert export_imagefolder(src, out, ["nifti"]).resumed == 1
    assert _tree(out) == reference


@pytest.mark.parametrize(
    "change,differs",
    [({"modality": "CT"}, "modality"), ({"formats": ["nifti"]}, "formats"), ({"images_per_study": 2}, "images_per_study")],
)
def test_another_command_on_existing_output_is_refused(tmp_path, meta, smooth, change, differs):
    src = _imagefolder(tmp_path / "in", meta, smooth, n=2)
    out = tmp_path / "out"
    export_imagefolder(src, out, ["dicom"])
    before = _tree(out)
    kw = {"formats": ["dicom"], **change}
    with pytest.raises(FileExistsError, match=f"another command.*{differs}.*--overwrite"):
        export_imagefolder(src, out, **kw)
    assert _tree(out) == before
    summary = export_imagefolder(src, out, **kw, overwrite=True)
    assert summary.resumed == 0 and summary.images == 2
    if "formats" in change:
        assert not (out / "dicom").exists(), "--overwrite replaces the previous export"


def test_changed_metadata_is_another_command(tmp_path, meta, smooth):
    src = _imagefolder(tmp_path / "in", meta, smooth, n=2)
    out = tmp_path / "out"
    export_imagefolder(src, out)
    with open(src / "metadata.jsonl", "a", encoding="utf-8") as fh:
        fh.write(json.dumps({**meta(9), "file_name": "0.png"}).replace('"seed": 1009', '"seed": 5') + "\n")
    with pytest.raises(ValueError, match="same name"):  # duplicate file_name is checked first
        export_imagefolder(src, out)
    lines = (src / "metadata.jsonl").read_text().splitlines()
    (src / "metadata.jsonl").write_text("\n".join(lines[:2]).replace("case 1", "case one") + "\n")
    with pytest.raises(FileExistsError, match="metadata_sha256"):
        export_imagefolder(src, out)


def test_foreign_files_in_output_are_refused(tmp_path, meta, smooth):
    src = _imagefolder(tmp_path / "in", meta, smooth, n=1)
    out = tmp_path / "out"
    (out / "dicom").mkdir(parents=True)
    (out / "dicom" / "mine.dcm").write_bytes(b"precious")
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="no export record"):
        export_imagefolder(src, out)
    export_imagefolder(src, out, overwrite=True)
    assert not (out / "dicom" / "mine.dcm").exists() and (out / "notes.txt").read_text() == "keep me"


def test_stale_temp_cleaning_stays_in_export_folders(tmp_path, meta, smooth):
    src = _imagefolder(tmp_path / "in", meta, smooth, n=1)
    out = tmp_path / "out"
    (out / "user").mkdir(parents=True)
    theirs = out / "user" / ".a.dcm.radsynth-tmp-999999999-0badf00d.dcm"  # not in a folder the export owns
    top = out / f".{MANIFEST}.radsynth-tmp-999999999-0badf00d.jsonl"
    theirs.write_bytes(b"")
    top.write_bytes(b"")
    export_imagefolder(src, out)
    assert theirs.exists() and not top.exists()
