"""Invented patients for synthetic studies (DESIGN.md §5).

A :class:`SyntheticPatient` is a pure function of a key (see
:meth:`exporters.provenance.Provenance.identity_key`) and the prompt's ``sex``/``age`` attributes: the
name is made of random syllables, the id is ``RS`` plus random characters, the study date falls
between 2000 and 2019 and the birth date is chosen so that the patient's age on the study date equals
the prompt's age. No value ever comes from training data: this module never sees any.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import secrets
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["SyntheticPatient"]

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kl", "st", "tr")
_VOWELS = ("a", "e", "i", "o", "u", "ae", "ei", "ou")
_ID_ALPHABET = "0123456789ABCDEFGHJKLMNPQRSTUVWXYZ"
_EPOCH = _dt.date(2000, 1, 1)


def _rng(key: str | None) -> np.random.Generator:
    if key is None:
        return np.random.default_rng(secrets.randbits(128))
    return np.random.default_rng(int.from_bytes(hashlib.sha256(f"patient:{key}".encode()).digest()[:16], "big"))


def _word(rng: np.random.Generator, syllables: int) -> str:
    word = "".join(_ONSETS[rng.integers(len(_ONSETS))] + _VOWELS[rng.integers(len(_VOWELS))] for _ in range(syllables))
    return word.capitalize()


def _years_before(day: _dt.date, years: int) -> _dt.date:
    try:
        return day.replace(year=day.year - years)
    except ValueError:  # 29 February
        return day.replace(year=day.year - years, day=28)


@dataclass(frozen=True)
class SyntheticPatient:
    """An invented patient and the date of its synthetic study.

    Attributes:
        name: DICOM person name ``Family^Given`` (random syllables).
        patient_id: ``RS`` followed by 10 random characters.
        sex: ``"F"``, ``"M"``, ``"O"`` or ``""`` (unknown: DICOM Type 2 empty).
        age: Age in whole years on ``study_date``, or ``None`` when the prompt gave none.
        birth_date: Birth date consistent with ``age``, or ``None`` when ``age`` is unknown.
        study_date: Date of the synthetic study.
        study_time: Time of the synthetic study (whole seconds).
        accession_number: Invented accession number (``A`` plus 9 digits).
    """

    name: str
    patient_id: str
    sex: str
    age: int | None
    birth_date: _dt.date | None
    study_date: _dt.date
    study_time: _dt.time
    accession_number: str

    @classmethod
    def invent(cls, key: str | None, sex: Any = None, age: Any = None) -> "SyntheticPatient":
        """Invent a patient; the same ``key``, ``sex`` and ``age`` always give the same patient.

        Args:
            key: Deterministic key (``None``: random patient).
            sex: The prompt's sex: ``"F"``/``"M"``/``"O"`` (also ``female``/``male``, any case) or
                ``None``/``""`` for unknown.
            age: The prompt's age in years (int or numeric string, 0 to 130) or ``None``.

        Raises:
            ValueError: ``sex`` or ``age`` has an unusable value.
        """
        sex_code = "" if sex is None else str(sex).strip().upper()
        sex_code = {"FEMALE": "F", "MALE": "M", "OTHER": "O", "UNKNOWN": ""}.get(sex_code, sex_code)
        if sex_code not in ("", "F", "M", "O"):
            raise ValueError(f"sex={sex!r}: expected 'F', 'M', 'O' or None")
        age_years: int | None = None
        if age is not None and age != "":
            try:
                age_years = int(float(age))
            except (TypeError, ValueError):
                raise ValueError(f"age={age!r}: expected a number of years") from None
            if not 0 <= age_years <= 130:
                raise ValueError(f"age={age!r}: expected 0 to 130 years")
        rng = _rng(key)
        family = _word(rng, int(rng.integers(2, 4)))
        given = _word(rng, int(rng.integers(2, 4)))
        patient_id = "RS" + "".join(_ID_ALPHABET[i] for i in rng.integers(len(_ID_ALPHABET), size=10))
        study_date = _EPOCH + _dt.timedelta(days=int(rng.integers(0, 20 * 365)))
        study_time = _dt.time(int(rng.integers(7, 19)), int(rng.integers(60)), int(rng.integers(60)))
        birthday_offset = int(rng.integers(0, 365))
        accession = "A" + "".join(str(d) for d in rng.integers(10, size=9))
        birth_date = None
        if age_years is not None:
            # The last birthday was ``birthday_offset`` days (< 1 year) before the study date.
            last_birthday = study_date - _dt.timedelta(days=birthday_offset)
            birth_date = _years_before(last_birthday, age_years)
            if _years_before(study_date, age_years) < birth_date:  # leap-year edge: keep age exact
                birth_date = _years_before(study_date, age_years)
        return cls(f"{family}^{given}", patient_id, sex_code, age_years, birth_date, study_date, study_time, accession)

    @property
    def dicom_age(self) -> str:
        """Patient's Age (AS), e.g. ``"045Y"``, or ``""`` when unknown."""
        return "" if self.age is None else f"{self.age:03d}Y"

    def to_json(self) -> dict[str, Any]:
        """JSON form for sidecars and manifests."""
        return {
            "PatientName": self.name,
            "PatientID": self.patient_id,
            "PatientSex": self.sex,
            "PatientAge": self.age,
            "PatientBirthDate": None if self.birth_date is None else self.birth_date.isoformat(),
            "StudyDate": self.study_date.isoformat(),
        }
