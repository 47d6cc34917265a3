import json

import numpy as np
import pytest

from privacy.audit import audit_images
from privacy.audit import Verdict
from privacy.gate import PrivacyGate
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
    # an exact copy is more extreme than every held-out image: the smallest conformal p-value
    assert res.images[0].p_value == pytest.approx(1 / (index.calibration.n + 1))
    assert all(v.score > v.threshold for v in res.images[:4])


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
        holdout_ids=[f"h{i}" for i in range(22)], holdout_patient_ids=hold_pids, alpha=0.05, review_alpha=0.1,
        embedder_config=EmbedderConfig(steps=5, batch_size=16, width=8, bf16=False), progress=False,
    )
    assert idx.holdout["excluded_same_patient"] == ["h20"]
    assert idx.holdout["excluded_duplicates"] == ["h21"]
    assert idx.holdout["exact_duplicates"] == ["h21"]
    assert idx.calibration.n == 20
    # 20 null images resolve alpha 0.05 (19 needed) but fewer than the 38 recommended: recorded
    assert any("recommended" in w for w in idx.holdout["warnings"])
    assert any("exact duplicates" in w for w in idx.holdout["warnings"])

    split = ReferenceIndex.build(
        train_images, patient_ids=patient_ids, holdout_fraction=0.25, alpha=0.1, review_alpha=0.2,
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


def test_gate_checks(index, train_images, novel_images):
    gate = PrivacyGate(index)
    assert gate.resolution == 24
    with pytest.raises(ValueError, match=r"32x32.*24x24"):
        gate.check(np.zeros((1, 32, 32), np.float32))
    with pytest.raises(ValueError, match="alpha"):
        PrivacyGate(index, alpha=1.5)
    verdicts = gate.check(np.concatenate([train_images[[0, 1]], novel_images[:3]]))
    assert [gate.should_resample(v) for v in verdicts[:2]] == [True, True]
    assert sum(gate.should_resample(v) for v in verdicts[2:]) <= 1
    assert all(v.verdict in Verdict for v in verdicts)


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
    with pytest.warns(UserWarning, match="self-similar"):
        idx = ReferenceIndex.build(train, holdout_images=hold, alpha=0.05, review_alpha=0.1,
                                   embedder_config=EmbedderConfig(steps=3, batch_size=16, width=8, bf16=False),
                                   progress=False)
    assert idx.holdout["self_similar_data"] is True
    assert idx.holdout["excluded_duplicates"] == [] and idx.holdout["n_null"] == 30
    assert idx.leak_threshold > 0.995
    copy = train[:1].copy()
    assert audit_images(idx, copy, self_test=False).images[0].verdict == "reject"


def test_each_view_similarity_sits_beside_its_own_threshold(index, train_images, novel_images):
    res = audit_images(index, np.concatenate([train_images[[5]], novel_images[:6]]), self_test=False)
    copy, kept = res.images[0], [v for v in res.images[1:] if v.verdict is Verdict.KEEP]
    assert kept, "the fixture should keep most novel images"
    thr = index.thresholds()
    for v in res.images:
        assert set(v.view_thresholds) == set(v.similarity) == {"ncc", "phash", "embedding", "mix"}
        assert v.view_thresholds == pytest.approx(thr)
        # the views' rule and the statistic's rule agree
        above = any(v.similarity[w] > v.view_thresholds[w] for w in v.view_thresholds)
        assert above == (v.score > v.threshold)
        f = v.manifest_fields()
        assert f["privacy_view"] == v.deciding_view
        assert f["nearest_train_similarity"] == pytest.approx(v.similarity[v.deciding_view], abs=1e-6)
        assert f["privacy_threshold"] == pytest.approx(v.view_thresholds[v.deciding_view], abs=1e-6)
        for w in v.view_thresholds:
            assert f[f"privacy_similarity_{w}"] == pytest.approx(v.similarity[w], abs=1e-6)
            assert f[f"privacy_threshold_{w}"] == pytest.approx(v.view_thresholds[w], abs=1e-6)
    assert copy.verdict is Verdict.REJECT and copy.verdict == "reject"
    assert copy.similarity[copy.deciding_view] > copy.view_thresholds[copy.deciding_view]
    for v in kept:
        # a kept image: every view at or below its threshold, thresholds are real similarities (not 0)
        assert all(v.similarity[w] <= v.view_thresholds[w] for w in v.view_thresholds)
        f = v.manifest_fields()
        assert f["privacy_threshold"] > 0.3 and f["nearest_train_similarity"] <= f["privacy_threshold"]
        # the deciding view is the one closest to its threshold relative to its null spread
        cal = index.calibration
        rel = {w: (v.similarity[w] - cal.center[w]) / (v.view_thresholds[w] - cal.center[w]) for w in v.view_thresholds}
        assert v.deciding_view == max(rel, key=rel.get)
    html = render_html(res, index, np.concatenate([train_images[[5]], novel_images[:6]]))
    assert f"{copy.similarity['embedding']:.4f}" in html and f"{copy.view_thresholds['embedding']:.4f}" in html


def test_index_is_frozen_and_complete(index):
    import dataclasses

    with pytest.raises(dataclasses.FrozenInstanceError):
        index.alpha = 0.5
    with pytest.raises(ValueError):
        index.images[0, 0, 0] = 1.0  # read-only arrays
    with pytest.raises(TypeError):
        index.holdout["n_null"] = 3
    assert index.calibration.n == index.holdout["n_null"] == 40
    assert index.data_fingerprint.startswith("sha256:") and index.embedder_fingerprint.startswith("sha256:")
    with pytest.raises(ValueError, match="review_alpha"):
        dataclasses.replace(index, review_alpha=0.001)


def _tiny():
    from privacy.embedding import EmbedderConfig

    return EmbedderConfig(steps=3, batch_size=16, width=8, bf16=False)


def test_holdout_equal_to_training_is_refused(train_images):
    with pytest.raises(ValueError, match=r"--holdout train/: 40 of 40 held-out images are exact duplicates"):
        ReferenceIndex.build(train_images, holdout_images=train_images.copy(), alpha=0.05, review_alpha=0.1,
                             embedder_config=_tiny(), progress=False, holdout_name="--holdout train/")
    # 8-bit requantized copies are still exact duplicates
    quant = np.round(train_images * 255) / 255
    with pytest.raises(ValueError, match="exact duplicates"):
        ReferenceIndex.build(train_images, holdout_images=quant, alpha=0.05, review_alpha=0.1,
                             embedder_config=_tiny(), progress=False)


def test_too_few_holdout_images_are_refused(train_images, holdout_images):
    with pytest.raises(ValueError, match=r"holdout_images: 40 held-out images cannot resolve alpha=0.01: at least 99"):
        ReferenceIndex.build(train_images, holdout_images=holdout_images, alpha=0.01,
                             embedder_config=_tiny(), progress=False)
    # enough given, but too few left once duplicates are excluded
    hold = np.concatenate([holdout_images[:18], train_images[:1]])
    with pytest.raises(ValueError, match=r"holdout_images: only 18 of 19 held-out images remain") as exc:
        ReferenceIndex.build(train_images, holdout_images=hold, alpha=0.05, review_alpha=0.1,
                             embedder_config=_tiny(), progress=False, max_duplicate_share=0.1)
    assert "1 duplicate a training image" in str(exc.value) and "needs at least 19" in str(exc.value)


def test_borderline_holdout_warns_and_is_recorded(train_images, holdout_images):
    with pytest.warns(UserWarning, match="recommended"):
        idx = ReferenceIndex.build(train_images, holdout_images=holdout_images[:25], alpha=0.05, review_alpha=0.1,
                                   embedder_config=_tiny(), progress=False)
    assert any("recommended" in w for w in idx.holdout["warnings"])


def test_rebuild_reuses_the_embedder_when_the_fingerprint_matches(index, train_images, holdout_images, patient_ids,
                                                                  tmp_path):
    from tests.privacy.conftest import TINY_EMBEDDER

    previous = ReferenceIndex.load(index.save(tmp_path / "idx"))
    kw = dict(ids=list(index.ids), patient_ids=patient_ids, holdout_images=holdout_images, alpha=0.05,
              review_alpha=0.1, progress=False)
    again = ReferenceIndex.build(train_images, embedder_config=TINY_EMBEDDER, previous=previous, **kw)
    assert again.info["embedder"] == "reused from previous index"
    assert again.embedder_fingerprint == index.embedder_fingerprint
    np.testing.assert_allclose(again.embedding, index.embedding, atol=1e-5)
    np.testing.assert_allclose(again.calibration.statistic_null, index.calibration.statistic_null, atol=1e-4)
    # other data or another embedder config: trained afresh
    other = ReferenceIndex.build(train_images, embedder_config=_tiny(), previous=previous, **kw)
    assert other.info["embedder"] == "trained" and other.embedder_fingerprint != index.embedder_fingerprint


@pytest.mark.parametrize("name", ["index.json", "references.safetensors", "embedder.safetensors", "embedding.npy"])
@pytest.mark.parametrize("how", ["empty", "truncated"])
def test_damaged_index_files_raise_value_error_naming_the_file(index, tmp_path, name, how):
    out = index.save(tmp_path / "idx")
    path = out / name
    data = path.read_bytes()
    path.write_bytes(b"" if how == "empty" else data[: len(data) // 2])
    with pytest.raises(ValueError, match=name.replace(".", r"\.")) as exc:
        ReferenceIndex.load(out)
    assert ("empty" in str(exc.value)) if how == "empty" else ("truncated" in str(exc.value) or "corrupt" in str(exc.value))


def test_written_files_follow_the_umask(index, tmp_path):
    import os

    from privacy.report import atomic_write_text

    old = os.umask(0o022)
    try:
        p = atomic_write_text(tmp_path / "a.json", "{}")
        assert (p.stat().st_mode & 0o777) == 0o644
        out = index.save(tmp_path / "idx")
        assert (out.stat().st_mode & 0o777) == 0o755
        for f in out.iterdir():
            assert (f.stat().st_mode & 0o777) == 0o644, f.name
        os.umask(0o077)
        p = atomic_write_text(tmp_path / "b.json", "{}")
        assert (p.stat().st_mode & 0o777) == 0o600
    finally:
        os.umask(old)
