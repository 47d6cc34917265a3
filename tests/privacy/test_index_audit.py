import json

import numpy as np
import pytest

from privacy.audit import audit_images
from privacy.gate import PrivacyGate, resample_seed
from privacy.index import ReferenceIndex
from privacy.report import render_html, write_json


def planted(train):
    return np.stack([
        train[3],                                   # identity
        train[7][:, ::-1],                          # flip
        np.roll(train[11], 1, axis=1),              # shift 1 px
        np.clip(train[15] * 1.2, 0, 1),             # brightness
    ]).astype(np.float32)


def test_planted_copies_rejected_and_novel_images_kept(index, train_images, novel_images):
    imgs = np.concatenate([planted(train_images), novel_images])
    res = audit_images(index, imgs, self_test=False)
    verdicts = [v.verdict for v in res.images]
    assert verdicts[:4] == ["reject"] * 4
    assert [v.nearest_ids[0] for v in res.images[:4]] == [f"train/{i}.png" for i in (3, 7, 11, 15)]
    flagged_novel = sum(v != "keep" for v in verdicts[4:])
    assert flagged_novel <= 2, verdicts[4:]
    assert all(v.reasons for v in res.images[:4])
    assert res.images[0].p_value == pytest.approx(min(1.0, 4 / (index.calibration.n + 1)))
    assert all(v.score > 0 for v in res.images[:4])


def test_summary_fields_and_per_patient_aggregation(index, train_images, novel_images):
    imgs = np.concatenate([planted(train_images), novel_images])
    res = audit_images(index, imgs, file_names=[f"s{i}.png" for i in range(len(imgs))], self_test=True)
    s = res.summary
    assert s["n_images"] == len(imgs)
    assert sum(s["counts"].values()) == len(imgs)
    assert s["copy_rate"] == pytest.approx(s["counts"]["reject"] / len(imgs))
    assert s["expected_chance_flags"]["reject"] == pytest.approx(0.05 * len(imgs))
    assert s["training_images_copied"] >= 4
    assert s["share_training_images_copied"] == pytest.approx(s["training_images_copied"] / 40)
    # train images 3, 7, 11, 15 belong to patients p1, p3, p5, p7
    assert {"p1", "p3", "p5", "p7"} <= set(s["copied_patient_ids"])
    assert s["share_training_patients_copied"] == pytest.approx(s["training_patients_copied"] / 20)
    assert res.images[0].nearest_patient_id == "p1"
    for view in ("ncc", "phash", "embedding", "fused"):
        assert set(s["similarity_quantiles"][view]) == {"synthetic", "heldout"}
    assert 0.0 <= s["authenticity_share"] <= 1.0
    assert s["self_test"]["identity"] == 1.0
    assert "differentially private" in s["statement"]
    fields = res.images[0].manifest_fields()
    for key in ("nearest_train_similarity", "privacy_threshold", "privacy_verdict", "privacy_p_value"):
        assert key in fields
    # training identifiers never go into the shareable manifest, only into the audit JSON
    assert "p1" not in json.dumps(fields) and res.images[0].nearest_ids[0] not in json.dumps(fields)
    assert res.to_dict()["images"][0]["nearest_patient_id"] == "p1"
    json.dumps(res.to_dict())  # serialisable


def test_same_patient_and_duplicate_holdout_images_are_left_out_of_the_null(
    train_images, holdout_images, patient_ids
):
    from privacy.embedding import EmbedderConfig

    hold = np.concatenate([holdout_images[:20], train_images[[0, 1]]])
    hold_pids = [f"h{i}" for i in range(20)] + ["p0", None]  # train[1] is p0's; train[0] copied, no id
    hold_pids[21] = None
    hold_pids[20] = "p0"
    idx = ReferenceIndex.build(
        train_images, patient_ids=patient_ids, holdout_images=hold,
        holdout_ids=[f"h{i}" for i in range(22)], holdout_patient_ids=hold_pids,
        embedder_config=EmbedderConfig(steps=5, batch_size=16, width=8, bf16=False), progress=False,
    )
    assert idx.holdout["excluded_same_patient"] == ["h20"]
    assert idx.holdout["excluded_duplicates"] == ["h21"]
    assert idx.calibration.n == 20

    split = ReferenceIndex.build(
        train_images, patient_ids=patient_ids, holdout_fraction=0.25,
        embedder_config=EmbedderConfig(steps=5, batch_size=16, width=8, bf16=False), progress=False,
    )
    assert "patient-disjoint split" in split.holdout["source"]
    assert split.holdout["split"] and split.holdout["n_holdout"] == 10  # 5 of 20 patients x 2 images
    assert len(split.ids) == 40  # held-out images were added back to the references


def test_save_load_roundtrip_and_errors(index, tmp_path, novel_images):
    out = index.save(tmp_path / "idx")
    assert "TRAINING-DERIVED DATA" in (out / "README.md").read_text()
    meta = json.loads((out / "index.json").read_text())
    assert meta["contains_training_data"] is True
    assert meta["alpha"] == 0.05 and meta["resolution"] == 24
    assert len(meta["calibration"]["null"]["ncc"]) == index.calibration.n
    assert meta["refine_top"] == index.refine_top > 0
    loaded = ReferenceIndex.load(out)
    assert loaded.refine_top == index.refine_top
    a = index.score(novel_images)
    b = loaded.score(novel_images)
    np.testing.assert_allclose(a.fused, b.fused, atol=1e-3)
    with pytest.raises(FileExistsError, match="overwrite"):
        index.save(out)
    index.save(out, overwrite=True)
    with pytest.raises(FileNotFoundError, match="no reference index"):
        ReferenceIndex.load(tmp_path / "missing")
    with pytest.raises(ValueError, match=r"16x16.*24x24"):
        index.score(np.zeros((2, 16, 16), np.float32))
    with pytest.raises(ValueError, match="empty"):
        audit_images(index, np.zeros((0, 24, 24), np.float32))


def test_gate_checks_and_resample_loop_terminates(index, train_images, novel_images):
    gate = PrivacyGate(index)
    assert gate.resolution == 24
    with pytest.raises(ValueError, match=r"32x32.*24x24"):
        gate.check(np.zeros((1, 32, 32), np.float32))

    def always_copy(seeds):
        return np.stack([train_images[s % 40] for s in seeds])

    out = gate.run_with_resampling(always_copy, [0, 1], max_resamples=2)
    assert out.n_unresolved == 2 and out.n_rejected == 6
    assert out.attempts[0] == [0, resample_seed(0, 1), resample_seed(0, 2)]
    assert all(gate.should_resample(v) for v in out.verdicts)

    def copy_first(seeds):  # original seeds give copies, replacement seeds give novel images
        return np.stack([train_images[s] if s < 40 else novel_images[s % 12] for s in seeds])

    out = gate.run_with_resampling(copy_first, [5, 6], max_resamples=3)
    assert out.n_rejected == 2 and out.n_unresolved == 0
    assert out.seeds == [resample_seed(5, 1), resample_seed(6, 1)]
    assert [v.verdict for v in out.verdicts] != ["reject", "reject"]
    np.testing.assert_array_equal(out.images[0], novel_images[resample_seed(5, 1) % 12])
    with pytest.raises(ValueError, match="max_resamples"):
        gate.run_with_resampling(copy_first, [1], max_resamples=-1)


def test_report_json_and_html(index, train_images, novel_images, tmp_path):
    imgs = np.concatenate([planted(train_images)[:2], novel_images[:2]])
    res = audit_images(index, imgs, file_names=["c0.png", "c1.png", "n0.png", "n1.png"], self_test=False)
    path = write_json(res, tmp_path / "a.json")
    data = json.loads(path.read_text())
    assert [r["file_name"] for r in data["images"]] == ["c0.png", "c1.png", "n0.png", "n1.png"]
    first = data["images"][0]
    for key in ("verdict", "reasons", "p_value", "nn_ratio", "neighbours", "similarity"):
        assert key in first
    assert first["neighbours"]["ncc"][0]["id"] == "train/3.png"
    html = render_html(res, index, imgs)
    assert "c0.png" in html and "data:image/png;base64," in html and "train/3.png" in html


def test_self_similar_data_keeps_the_null_and_raises_the_copy_rule():
    """Homogeneous images (every held-out image correlates >= 0.995 with training) are not 'leaks'."""
    from privacy.embedding import EmbedderConfig

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:24, 0:24] / 23.0
    base = (0.3 + 0.5 * np.exp(-((yy - 0.5) ** 2 + (xx - 0.5) ** 2) / 0.08)).astype(np.float32)

    def make(n):
        return np.clip(base[None] + rng.normal(0, 0.004, (n, 24, 24)), 0, 1).astype(np.float32)

    train, hold = make(40), make(30)
    idx = ReferenceIndex.build(train, holdout_images=hold, embedder_config=EmbedderConfig(steps=3, batch_size=16,
                               width=8, bf16=False), progress=False)
    assert idx.holdout["self_similar_data"] is True
    assert idx.holdout["excluded_duplicates"] == [] and idx.holdout["n_null"] == 30
    assert idx.leak_threshold > 0.995
    copy = train[:1].copy()
    assert audit_images(idx, copy, self_test=False).images[0].verdict == "reject"
