"""Prompt text from structured attributes (DESIGN.md §2: conditioning knows nothing about diffusion).

Attributes are a plain mapping with any of these keys (the imagefolder columns of DESIGN.md §3.1):

- ``modality``: ``"DX"``/``"CR"`` (radiograph), ``"CT"``, ``"MR"``.
- ``view``: ``"PA"``, ``"AP"``, ``"frontal"``, ``"lateral"``.
- ``sex``: ``"F"`` or ``"M"`` (``"female"``/``"male"``/``"woman"``/``"man"`` accepted).
- ``age``: years (int or numeric string).
- ``findings``: a list of findings; each is a string (``"cardiomegaly"``) or a mapping
  ``{"name": "pleural effusion", "location": "left", "size": "small"}`` /
  ``{"name": "nodule", "location": "right upper lobe", "size_mm": 12}``. An empty list means
  "no acute findings".

:func:`build_prompt` turns them into the canonical text ("frontal chest radiograph, small left
pleural effusion, 70 year old woman"); :func:`paraphrase_prompt` gives reworded variants of the same
content for text augmentation, so a model trained on them also follows a user's own wording.
"""

from __future__ import annotations

import itertools
import random
from typing import Any, Iterable, Mapping, Sequence

#: Canonical finding names and the paraphrases used for augmentation (first entry = canonical).
FINDING_SYNONYMS: dict[str, tuple[str, ...]] = {
    "cardiomegaly": ("cardiomegaly", "enlarged heart", "enlarged cardiac silhouette"),
    "pleural effusion": ("pleural effusion", "effusion", "pleural fluid"),
    "nodule": ("nodule", "pulmonary nodule", "lung nodule"),
    "pneumothorax": ("pneumothorax", "collapsed lung", "pleural air"),
    "consolidation": ("consolidation", "airspace opacity", "lobar consolidation"),
    "pneumonia": ("pneumonia", "pneumonic infiltrate", "infection"),
}

NO_FINDING_TEXTS = ("no acute findings", "normal study", "no abnormality")

_VIEW_TEXT = {
    "PA": ("frontal chest radiograph", "PA chest x-ray", "posteroanterior chest radiograph"),
    "AP": ("frontal chest radiograph", "AP chest x-ray", "anteroposterior chest radiograph"),
    "FRONTAL": ("frontal chest radiograph", "frontal chest x-ray", "chest radiograph"),
    "LATERAL": ("lateral chest radiograph", "lateral chest x-ray", "lateral chest radiograph"),
}
_MODALITY_TEXT = {
    "CT": ("chest CT", "CT of the chest", "axial chest CT"),
    "MR": ("MR image", "MRI", "magnetic resonance image"),
}
_SEX_WORDS = {"F": ("woman", "female", "girl"), "M": ("man", "male", "boy")}
_SEX_ALIASES = {
    "f": "F", "female": "F", "woman": "F", "w": "F", "girl": "F",
    "m": "M", "male": "M", "man": "M", "boy": "M",
}


def normalize_sex(value: Any) -> str | None:
    """``"F"``, ``"M"`` or ``None`` for missing/unknown values.

    Raises:
        ValueError: for a non-empty value that is not a recognised sex.
    """
    if value is None or (isinstance(value, str) and value.strip() in ("", "O", "U", "unknown")):
        return None
    key = str(value).strip().lower()
    if key not in _SEX_ALIASES:
        raise ValueError(f"sex must be 'F' or 'M' (or female/male), got {value!r}")
    return _SEX_ALIASES[key]


def normalize_findings(findings: Any) -> list[dict[str, Any]]:
    """Findings as a list of dicts with at least ``name`` (canonical lower-case name).

    Accepts ``None``, a string (comma/semicolon separated), a mapping, or a list of strings/mappings.
    Synonyms ("enlarged heart") are mapped to canonical names where known; unknown names are kept.

    Raises:
        ValueError: a finding mapping without ``name``.
    """
    if findings is None:
        return []
    if isinstance(findings, str):
        parts = [p.strip() for p in findings.replace(";", ",").split(",")]
        findings = [p for p in parts if p and p.lower() not in NO_FINDING_TEXTS]
    if isinstance(findings, Mapping):
        findings = [findings]
    out: list[dict[str, Any]] = []
    for f in findings:
        if isinstance(f, str):
            f = {"name": f}
        if not isinstance(f, Mapping) or "name" not in f:
            raise ValueError(f"each finding needs a 'name', got {f!r}")
        d = dict(f)
        d["name"] = canonical_finding(str(d["name"]))
        out.append(d)
    return out


def canonical_finding(name: str) -> str:
    """Map a finding name or paraphrase to its canonical name (unknown names returned lower-cased)."""
    key = name.strip().lower()
    for canon, syns in FINDING_SYNONYMS.items():
        if key in syns:
            return canon
    return key


def finding_text(finding: Mapping[str, Any], *, synonym: int = 0) -> str:
    """One finding as a phrase: ``"small left pleural effusion"``, ``"12 mm nodule in the right
    upper lobe"``. ``synonym`` picks the wording from :data:`FINDING_SYNONYMS`."""
    name = canonical_finding(str(finding["name"]))
    words = FINDING_SYNONYMS.get(name, (name,))
    noun = words[synonym % len(words)]
    size = finding.get("size")
    size_mm = finding.get("size_mm")
    location = finding.get("location")
    parts: list[str] = []
    if size_mm is not None:
        parts.append(f"{int(round(float(size_mm)))} mm")
    elif size:
        parts.append(str(size))
    lobe = location is not None and "lobe" in str(location)
    if location and not lobe:
        parts.append(str(location))
    parts.append(noun)
    text = " ".join(parts)
    if lobe:
        text += f" in the {location}"
    return text


def _age_sex_text(age: Any, sex: str | None, variant: int) -> str | None:
    age_i = None
    if age is not None and str(age).strip() != "":
        try:
            age_i = int(float(age))
        except ValueError:
            raise ValueError(f"age must be a number of years, got {age!r}") from None
    if age_i is None and sex is None:
        return None
    sex_word = _SEX_WORDS[sex][0 if age_i is None or age_i >= 18 else 2] if sex else None
    if variant % 2 == 1 and sex:
        sex_word = _SEX_WORDS[sex][1]
    if age_i is None:
        return sex_word
    if sex_word is None:
        return f"{age_i} year old patient"
    return f"{age_i} year old {sex_word}"


def _subject_text(attributes: Mapping[str, Any], variant: int) -> str:
    modality = str(attributes.get("modality") or "DX").upper()
    if modality in _MODALITY_TEXT:
        options = _MODALITY_TEXT[modality]
    else:
        view = str(attributes.get("view") or "FRONTAL").upper()
        options = _VIEW_TEXT.get(view, _VIEW_TEXT["FRONTAL"])
    return options[variant % len(options)]


def build_prompt(attributes: Mapping[str, Any]) -> str:
    """The canonical prompt for a set of attributes.

    Example:
        >>> build_prompt({"view": "PA", "sex": "F", "age": 70,
        ...               "findings": [{"name": "pleural effusion", "location": "left", "size": "small"}]})
        'frontal chest radiograph, small left pleural effusion, 70 year old woman'

    Raises:
        ValueError: an unrecognised sex, a non-numeric age, or a finding without a name.
    """
    return _compose(attributes, variant=0, synonym=0)


def paraphrase_prompt(attributes: Mapping[str, Any], rng: random.Random) -> str:
    """A reworded prompt with the same content as :func:`build_prompt` (synonyms, other phrasing,
    shuffled clause order), drawn with ``rng`` for text augmentation during training."""
    return _compose(attributes, variant=rng.randrange(3), synonym=rng.randrange(3), rng=rng)


def _compose(
    attributes: Mapping[str, Any], *, variant: int, synonym: int, rng: random.Random | None = None
) -> str:
    findings = normalize_findings(attributes.get("findings"))
    sex = normalize_sex(attributes.get("sex"))
    if findings:
        finding_parts = [finding_text(f, synonym=synonym) for f in findings]
    else:
        finding_parts = [NO_FINDING_TEXTS[variant % len(NO_FINDING_TEXTS)]]
    clauses = [_subject_text(attributes, variant), *finding_parts]
    who = _age_sex_text(attributes.get("age"), sex, variant)
    if who:
        clauses.append(who)
    if rng is not None and len(clauses) > 2:
        middle = clauses[1:]
        rng.shuffle(middle)
        clauses = [clauses[0], *middle]
    return ", ".join(clauses)


def attribute_grid(
    factors: Mapping[str, Sequence[Any]], *, per_cell: int = 1, base: Mapping[str, Any] | None = None
) -> list[dict[str, Any]]:
    """Balanced requests: the Cartesian product of ``factors``, ``per_cell`` times each.

    Example: ``attribute_grid({"findings": [[], ["cardiomegaly"]], "sex": ["F", "M"]}, per_cell=20)``
    asks for 20 of each finding, balanced by sex (80 attribute dicts).

    Raises:
        ValueError: ``per_cell`` < 1 or an empty factor.
    """
    if per_cell < 1:
        raise ValueError(f"per_cell must be >= 1, got {per_cell}")
    for key, values in factors.items():
        if len(values) == 0:
            raise ValueError(f"factor {key!r} has no values")
    keys = list(factors)
    out: list[dict[str, Any]] = []
    for combo in itertools.product(*(factors[k] for k in keys)):
        cell = dict(base or {})
        cell.update(zip(keys, combo))
        out.extend(dict(cell) for _ in range(per_cell))
    return out


def prompts_for(attribute_sets: Iterable[Mapping[str, Any]]) -> list[str]:
    """:func:`build_prompt` over many attribute sets."""
    return [build_prompt(a) for a in attribute_sets]
