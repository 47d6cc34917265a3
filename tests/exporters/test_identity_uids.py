"""Invented patients, deterministic UIDs, intensity encodings and provenance parsing."""

from __future__ import annotations

import datetime as dt
import re

import numpy as np
import pytest

from exporters.identity import SyntheticPatient
from exporters.intensity import PixelEncoding, normalize_mapping
from exporters.provenance import Provenance
from exporters.uids import derive_uid

UID_2_25 = re.compile(r"^2\.25\.(0|[1-9][0-9]*)$")


def test_uids_deterministic_2_25_form():
    a, b = derive_uid("key", "DX/study"), derive_uid("key", "DX/study")
    assert a == b and UID_2_25.match(a) and len(a) <= 64 and a.is_valid
    assert derive_uid("key", "DX/series") != a and derive_uid("other", "DX/study") != a
    r1, r2 = derive_uid(None, "DX/study"), derive_uid(None, "DX/study")
    assert r1 != r2 and UID_2_25.match(r1)
    with pytest.raises(ValueError, match="role"):
        derive_uid("key", "")


@pytest.mark.parametrize("age", [0, 1, 45, 99, 130])
def test_patient_age_matches_birth_date(age):
    for key in ("a", "b", "c", "d"):
        p = SyntheticPatient.invent(key, "M", age)
        born, seen = p.birth_date, p.study_date
        years = seen.year - born.year - ((seen.month, seen.day) < (born.month, born.day))
        assert years == age and p.dicom_age == f"{age:03d}Y"


def test_patient_deterministic_and_plausible():
    p, q = SyntheticPatient.invent("k1", "female", "61"), SyntheticPatient.invent("k1", "F", 61)
    assert p == q and p.sex == "F"
    r = SyntheticPatient.invent("k2", "F", 61)
    assert (r.name, r.patient_id) != (p.name, p.patient_id)
    assert re.fullmatch(r"[A-Z][a-z]+\^[A-Z][a-z]+", p.name) and re.fullmatch(r"RS[0-9A-Z]{10}", p.patient_id)
    assert dt.date(2000, 1, 1) <= p.study_date < dt.date(2020, 1, 1)
    unknown = SyntheticPatient.invent("k1")
    assert unknown.sex == "" and unknown.birth_date is None and unknown.dicom_age == ""
    assert SyntheticPatient.invent(None) != SyntheticPatient.invent(None)


@pytest.mark.parametrize("sex,age,match", [("X", 3, "sex"), ("F", -1, "age"), ("F", "old", "age")])
def test_patient_rejects_bad_attributes(sex, age, match):
    with pytest.raises(ValueError, match=match):
        SyntheticPatient.invent("k", sex, age)


def test_ct_encoding_hounsfield_and_bits():
    enc = PixelEncoding.create({"low": -1000, "high": 2000, "unit": "HU", "kind": "ct_window"}, "CT")
    assert enc.intercept == -1024 and enc.bits_stored == 12
    x = np.linspace(0, 1, 11)
    stored = enc.encode(x)
    assert stored.max() <= enc.max_stored
    np.testing.assert_allclose(enc.decode(stored), np.rint(-1000 + 3000 * x))
    wide = PixelEncoding.create({"low": -3000, "high": 30000, "unit": "HU"}, "CT")
    assert wide.intercept == -3000 and wide.bits_stored == 16
    with pytest.raises(ValueError, match="bits"):
        PixelEncoding.create({"low": -3000, "high": 70000, "unit": "HU"}, "CT")


def test_grey_level_encoding_and_duck_typing():
    class Mapping:
        kind, low, high, unit, bits_stored, modality = "png16", 0.0, 65535.0, "", 16, "DX"

        def to_physical(self, x):
            return self.low + x * (self.high - self.low)

    enc = PixelEncoding.create(Mapping(), "DX")
    assert enc.bits_stored == 16 and enc.encode(np.ones(2)).tolist() == [65535, 65535]
    with pytest.raises(ValueError, match=">= 0"):
        PixelEncoding.create({"low": -5, "high": 10}, "DX")
    with pytest.raises(ValueError, match="HU"):
        PixelEncoding.create({"low": -100, "high": 100, "unit": "HU"}, "MR")
    with pytest.raises(ValueError, match="low"):
        normalize_mapping({"low": 1.0})


def test_provenance_whitelist_and_stem():
    prov = Provenance.from_metadata(
        {"file_name": "a/b/0001.nii.gz", "text": "t", "seed": "12", "sex": "F", "patient_id": "REAL-ID",
         "nearest_train_ids": ["x"], "privacy_verdict": "keep", "attributes": {"age": 30}}
    )
    assert prov.seed == 12 and prov.attributes == {"sex": "F", "age": 30}
    assert prov.privacy == {"privacy_verdict": "keep"} and prov.stem == "a_b_0001"
    assert "REAL-ID" not in str(prov.to_json()) and "nearest_train_ids" not in str(prov.to_json())
    assert prov.identity_key() == Provenance.from_metadata({"file_name": "a/b/0001.nii.gz", "text": "t", "seed": 12}).identity_key()
    assert Provenance.from_metadata({"file_name": "x.png"}).identity_key() is None
