"""`radsynth index` and `radsynth audit` on tiny imagefolders of 8-bit PNGs."""

import json

import numpy as np
import pytest
from PIL import Image

from radsynth.cli import main


def write_folder(folder, images, names=None, patient_ids=None, extra=None):
    folder.mkdir(parents=True, exist_ok=True)
    names = names or [f"img_{i:03d}.png" for i in range(len(images))]
    lines = []
    for i, (img, name) in enumerate(zip(images, names)):
        Image.fromarray((np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8), mode="L").save(folder / name)
        row = {"file_name": name, "text": "frontal chest radiograph"}
        if patient_ids is not None:
            row["patient_id"] = patient_ids[i]
        row.update(extra or {})
        lines.append(json.dumps(row))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def quantize(x):
    return np.round(np.clip(x, 0, 1) * 255) / 255


@pytest.fixture(scope="module")
def cli_index(tmp_path_factory, train_images, holdout_images, patient_ids):
    root = tmp_path_factory.mktemp("cli")
    train = write_folder(root / "train", train_images, patient_ids=patient_ids)
    hold = write_folder(root / "hold", holdout_images)
    out = root / "index"
    rc = main(["index", "--data", str(train), "--holdout", str(hold), "--output", str(out),
               "--alpha", "0.05", "--embedder-steps", "10", "--quiet"])
    assert rc == 0
    return root, out


def test_index_writes_a_marked_separate_artifact(cli_index, capsys):
    root, out = cli_index
    assert "TRAINING-DERIVED DATA" in (out / "README.md").read_text()
    meta = json.loads((out / "index.json").read_text())
    assert meta["resolution"] == 24 and meta["alpha"] == 0.05
    assert meta["patient_ids"][:2] == ["p0", "p0"]
    assert meta["holdout"]["source"].startswith("separate held-out folder")
    # nothing is overwritten without --overwrite
    rc = main(["index", "--data", str(root / "train"), "--output", str(out), "--quiet"])
    assert rc == 2 and "--overwrite" in capsys.readouterr().err


def test_audit_flags_copies_and_updates_metadata(cli_index, train_images, novel_images, capsys):
    root, out = cli_index
    imgs = np.concatenate([quantize(train_images[[2, 9]]), quantize(train_images[[4]])[:, :, ::-1], novel_images[:4]])
    names = [f"s{i}.png" for i in range(len(imgs))]
    syn = write_folder(root / "syn", imgs, names=names, extra={"seed": 7, "sampler": "dpm"})
    rc = main(["audit", "--index", str(out), "--synthetic", str(syn), "--json", str(root / "a.json"),
               "--html", str(root / "a.html"), "--quiet"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "reject" in text and "guarantee" in text
    rows = [json.loads(x) for x in (syn / "metadata.jsonl").read_text().splitlines()]
    assert [r["file_name"] for r in rows] == names
    assert all(r["seed"] == 7 and r["sampler"] == "dpm" for r in rows)  # other fields kept
    assert [r["privacy_verdict"] for r in rows[:3]] == ["reject"] * 3
    assert "img_002.png" not in json.dumps(rows)  # training ids stay out of the shareable manifest
    assert sum(r["privacy_verdict"] != "keep" for r in rows[3:]) <= 1
    report = json.loads((root / "a.json").read_text())
    assert set(report) == {"images", "summary"}
    assert report["images"][0]["neighbours"]["ncc"][0]["id"] == "img_002.png"
    assert report["summary"]["counts"]["reject"] >= 3
    assert report["summary"]["training_patients_copied"] >= 3
    assert "s0.png" in (root / "a.html").read_text()


def test_audit_errors(cli_index, tmp_path, make_images, capsys):
    _, out = cli_index
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["audit", "--index", str(out), "--synthetic", str(empty)]) == 2
    assert "empty" in capsys.readouterr().err
    small = write_folder(tmp_path / "small", make_images(2, size=16, seed=9))
    assert main(["audit", "--index", str(out), "--synthetic", str(small), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "16x16" in err and "24x24" in err
    assert main(["audit", "--index", str(tmp_path / "nope"), "--synthetic", str(small)]) == 2
    err = capsys.readouterr().err
    assert "nope" in err and ("no reference index" in err or "not found" in err)


def test_index_without_holdout_uses_patient_disjoint_split(tmp_path, train_images, patient_ids, capsys):
    train = write_folder(tmp_path / "train", train_images, patient_ids=patient_ids)
    # 8 held-out images (20% of 20 patients) resolve alpha 0.2 (4 needed), not the default 0.01
    rc = main(["index", "--data", str(train), "--output", str(tmp_path / "idx"), "--embedder-steps", "5",
               "--alpha", "0.2", "--review-alpha", "0.3", "--quiet"])
    assert rc == 0
    assert "patient-disjoint split" in capsys.readouterr().out
    meta = json.loads((tmp_path / "idx" / "index.json").read_text())
    assert meta["holdout"]["split"] is True and len(meta["ids"]) == 40
