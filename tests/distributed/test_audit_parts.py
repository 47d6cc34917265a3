"""The pieces of a split audit, in one process: lossless verdict records, merging per-process parts,
and a summary that depends on the verdicts only (what ``radsynth audit`` does under torchrun)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from privacy.audit import (
    audit_images,
    audit_verdicts,
    merge_verdict_parts,
    summarize_verdicts,
    verdict_from_record,
    verdict_to_record,
)
from privacy.embedding import EmbedderConfig, torch_threads
from privacy.index import ReferenceIndex

RES = 24


def _blobs(n: int, seed: int) -> np.ndarray:
    """``(n, RES, RES)`` float32 in [0, 1]: a gradient plus random Gaussian blobs."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:RES, 0:RES] / RES
    out = np.empty((n, RES, RES), dtype=np.float32)
    for i in range(n):
        img = 0.2 + 0.1 * yy
        for _ in range(5):
            cy, cx = rng.uniform(0.1, 0.9, 2)
            s = rng.uniform(0.05, 0.2)
            img = img + rng.uniform(0.2, 0.6) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))
        out[i] = np.clip(img / img.max(), 0, 1)
    return out


@pytest.fixture(scope="module")
def setup():
    with torch_threads(1):
        train, hold = _blobs(30, 1), _blobs(30, 2)
        index = ReferenceIndex.build(
            train, ids=[f"t{i}.png" for i in range(30)], patient_ids=[f"p{i // 2}" for i in range(30)],
            holdout_images=hold, alpha=0.05, review_alpha=0.1, progress=False,
            embedder_config=EmbedderConfig(steps=10, batch_size=16, width=8, seed=0, bf16=False),
        )
        # novel images plus two exact copies and a mirrored copy of training images
        queries = np.concatenate([_blobs(6, 3), train[:2], train[4:5, :, ::-1]]).astype(np.float32)
        names = [f"s{i}.png" for i in range(len(queries))]
        whole = audit_images(index, queries, names, self_test=False)
    return index, queries, names, whole


def test_summary_is_a_function_of_the_verdicts(setup):
    index, _, _, whole = setup
    again = summarize_verdicts(index, whole.images, self_test=False)
    assert json.dumps(again.to_dict()) == json.dumps(whole.to_dict())
    assert whole.summary["counts"]["reject"] >= 3  # the planted copies
    with pytest.raises(ValueError, match="no images"):
        summarize_verdicts(index, [])
    given = summarize_verdicts(index, whole.images, self_test={"identity": 1.0})
    assert given.summary["self_test"] == {"identity": 1.0}


def test_records_round_trip_through_json_exactly(setup):
    _, _, _, whole = setup
    for v in whole.images:
        back = verdict_from_record(json.loads(json.dumps(verdict_to_record(v))))
        assert back == v
        assert back.to_dict() == v.to_dict() and back.manifest_fields() == v.manifest_fields()
    record = verdict_to_record(whole.images[0])
    with pytest.raises(ValueError, match="keys"):
        verdict_from_record({k: x for k, x in record.items() if k != "score"})
    with pytest.raises(ValueError, match="not an image verdict"):
        verdict_from_record({**record, "verdict": "maybe"})


@pytest.mark.parametrize("world", [2, 3, 12])
def test_merged_parts_equal_one_call(setup, world):
    """Shares ``i % world`` (more processes than images too): same verdicts in input order, same
    summary up to the float noise of batch-dependent embeddings."""
    index, queries, names, whole = setup
    parts = []
    with torch_threads(1):
        for r in range(world):
            pos = list(range(r, len(queries), world))
            verdicts = audit_verdicts(index, queries[pos], [names[i] for i in pos])
            parts.append((pos, [verdict_from_record(json.loads(json.dumps(verdict_to_record(v)))) for v in verdicts]))
    merged = merge_verdict_parts(index, parts, len(queries), self_test=False)
    assert [v.file_name for v in merged.images] == names
    assert [v.verdict for v in merged.images] == [v.verdict for v in whole.images]
    assert [v.nearest_ids for v in merged.images] == [v.nearest_ids for v in whole.images]
    for a, b in zip(merged.images, whole.images):
        assert a.similarity.keys() == b.similarity.keys()
        assert all(abs(a.similarity[k] - b.similarity[k]) < 1e-5 for k in a.similarity)
    assert merged.summary["counts"] == whole.summary["counts"]
    assert merged.summary["copied_training_ids"] == whole.summary["copied_training_ids"]


def test_merge_rejects_incomplete_or_overlapping_parts(setup):
    index, _, _, whole = setup
    v = whole.images
    with pytest.raises(ValueError, match="no verdict"):
        merge_verdict_parts(index, [([0, 1], v[:2])], 3, self_test=False)
    with pytest.raises(ValueError, match="more than one part"):
        merge_verdict_parts(index, [([0, 1], v[:2]), ([1], v[1:2])], 2, self_test=False)
    with pytest.raises(ValueError, match="outside"):
        merge_verdict_parts(index, [([0, 5], v[:2])], 2, self_test=False)
    with pytest.raises(ValueError, match="positions"):
        merge_verdict_parts(index, [([0], v[:2])], 2, self_test=False)
    assert audit_verdicts(index, np.zeros((0, RES, RES), np.float32), []) == []
