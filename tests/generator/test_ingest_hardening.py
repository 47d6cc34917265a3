"""Bad training data: each case a clear error naming the file, or a counted, reasoned skip."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from generator.data import load_dataset, resolve_member


def _png(path: Path, side: int = 16, value: int = 128) -> None:
    Image.fromarray(np.full((side, side), value, np.uint8)).save(path)


def _jsonl(path: Path, rows: list) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_csv_with_unterminated_quote_is_an_error(tmp_path: Path) -> None:
    for n in "abcd":
        _png(tmp_path / f"{n}.png")
    (tmp_path / "metadata.csv").write_text(
        'file_name,text\na.png,"fine"\nb.png,"unterminated\nc.png,x\nd.png,y\n')
    with pytest.raises(ValueError, match=r"metadata.csv: malformed CSV near line \d+ .*unterminated quote"):
        load_dataset(tmp_path, progress=False)


def test_csv_row_with_extra_cells_is_an_error(tmp_path: Path) -> None:
    _png(tmp_path / "a.png")
    (tmp_path / "metadata.csv").write_text("file_name,text\na.png,x,surplus\n")
    with pytest.raises(ValueError, match="line 2 has more cells than the 2 columns"):
        load_dataset(tmp_path, progress=False)


def test_jsonl_not_utf8_or_not_object(tmp_path: Path) -> None:
    _png(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_bytes(b'{"file_name": "a.png", "text": "\xff\xfe"}\n')
    with pytest.raises(ValueError, match="line 1 is not valid UTF-8 JSON"):
        load_dataset(tmp_path, progress=False)
    (tmp_path / "metadata.jsonl").write_text('["a.png", "x"]\n')
    with pytest.raises(ValueError, match="line 1 is not a JSON object"):
        load_dataset(tmp_path, progress=False)


def test_duplicate_rows_are_counted_once_and_reported(tmp_path: Path) -> None:
    _png(tmp_path / "a.png")
    _png(tmp_path / "b.png")
    _jsonl(tmp_path / "metadata.jsonl", [{"file_name": "a.png", "text": "one"},
                                         {"file_name": "a.png", "text": "two"},
                                         {"file_name": "./b.png", "text": "three"}])
    res = load_dataset(tmp_path, progress=False)
    assert [r.file_name for r in res.records] == ["a.png", "b.png"]
    assert [r.text for r in res.records] == ["one", "three"]
    assert len(res.skipped) == 1 and "duplicate row" in res.skipped[0].reason
    assert "1 duplicate row" in res.summary


def test_tiny_images_are_skipped_not_upsampled(tmp_path: Path) -> None:
    _png(tmp_path / "a.png", side=16)
    _png(tmp_path / "dot.png", side=1)
    _jsonl(tmp_path / "metadata.jsonl", [{"file_name": "a.png", "text": "ok"},
                                         {"file_name": "dot.png", "text": "a dot"}])
    res = load_dataset(tmp_path, resolution=32, progress=False)
    assert [r.file_name for r in res.records] == ["a.png"]
    assert res.skipped[0].path == "dot.png" and "too small: 1x1 pixels" in res.skipped[0].reason


@pytest.mark.parametrize("name", ["../outside.png", "/etc/passwd", "C:\\\\x.png", "sub\\\\..\\\\x.png",
                                  "", "   ", "sub/../../outside.png", "."])
def test_rows_outside_the_folder_are_refused(tmp_path: Path, name: str) -> None:
    data = tmp_path / "data"
    data.mkdir()
    _png(tmp_path / "outside.png")
    _png(data / "a.png")
    _jsonl(data / "metadata.jsonl", [{"file_name": "a.png", "text": "ok"}, {"file_name": name, "text": "bad"}])
    res = load_dataset(data, progress=False)
    assert [r.file_name for r in res.records] == ["a.png"]
    assert len(res.skipped) == 1 and "bad metadata row" in res.skipped[0].reason
    with pytest.raises(ValueError, match="metadata.jsonl row 2"):
        resolve_member(data, name, source=data / "metadata.jsonl", row=2)


def test_symlink_leaving_the_folder_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    _png(tmp_path / "secret.png")
    os.symlink(tmp_path / "secret.png", data / "link.png")
    with pytest.raises(ValueError, match="points outside"):
        resolve_member(data, "link.png")
    inside = resolve_member(data, "sub/../link2.png")
    assert inside == (data / "link2.png").resolve()


def _dicom_copy(tmp_path: Path, **changes) -> Path:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    for key, value in changes.items():
        setattr(ds, key, value)
    path = tmp_path / "x.dcm"
    ds.save_as(path)
    _jsonl(tmp_path / "metadata.jsonl", [{"file_name": "x.dcm", "text": "ct"}])
    return path


def test_dicom_rescale_slope_zero_is_skipped_with_reason(tmp_path: Path) -> None:
    _dicom_copy(tmp_path, RescaleSlope=0)
    with pytest.raises(ValueError, match="RescaleSlope"):
        load_dataset(tmp_path, progress=False)  # the only image is unusable: the error lists why


def test_dicom_palette_color_without_table_is_skipped(tmp_path: Path) -> None:
    _dicom_copy(tmp_path, PhotometricInterpretation="PALETTE COLOR")
    with pytest.raises(ValueError, match="PALETTE COLOR image without a palette"):
        load_dataset(tmp_path, progress=False)
