"""Structured attributes read back from prompt text, and their fixed-length vector (issue 12).

A free-text encoder (MiniLM) hears "left" and "right" as near-synonyms: its states for "left pleural
effusion" and "right pleural effusion" differ little. With ``train --attribute-conditioning``
(``TrainConfig.attribute_conditioning``) RadSynth reads the finding, side, lobe and size back out of the
prompt text (:func:`parse_prompt`, the inverse of :func:`conditioning.prompts.build_prompt` that also
understands its paraphrases and a user's own wording) and gives the denoiser those attributes as a
separate, unambiguous vector (:func:`attribute_vector`) beside the text states. The vector is a function
of the text alone, so training and sampling compute it the same way, any prompt works (unknown words
simply leave it empty), and the null prompt ``""`` maps to all zeros. It is off by default: on the demo
model, longer training with the text states alone already put every effusion and pneumothorax on the asked
side, and the vectors added nothing (README, issue 12's ablation).

Vector layout (:data:`ATTRIBUTE_DIM` = 65 float32 values, :data:`ATTRIBUTE_SCHEMA` names it):

- ``[0]`` findings stated: 1 when the text names a finding or says the study is normal, else 0 (the
  other finding entries are then all 0: "not said", which differs from "absent").
- per finding of :data:`VECTOR_FINDINGS`, 10 values: present, right, left, upper, middle, lower
  (lobe), small, moderate, large, size in mm / 30.
- sex female, sex male, age known, age / 100.

Sides are the patient's. Nothing here knows about diffusion (DESIGN.md §2).
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

from conditioning.prompts import FINDING_SYNONYMS, NO_FINDING_TEXTS, normalize_findings, normalize_sex

#: Name and version of the vector layout; a model records it and refuses another.
ATTRIBUTE_SCHEMA = "radsynth-attributes-1"

#: Findings with their own block of the vector, in order.
VECTOR_FINDINGS: tuple[str, ...] = (
    "cardiomegaly", "pleural effusion", "nodule", "pneumothorax", "consolidation", "pneumonia",
)
_PER_FINDING = ("present", "right", "left", "upper", "middle", "lower", "small", "moderate", "large", "size_mm")
#: Length of :func:`attribute_vector`'s output.
ATTRIBUTE_DIM = 1 + len(VECTOR_FINDINGS) * len(_PER_FINDING) + 4
#: Size in mm that maps to 1.0 in the size entry.
SIZE_MM_SCALE = 30.0

_NORMAL_WORDS = tuple(NO_FINDING_TEXTS) + ("normal", "unremarkable", "no finding", "no findings")
_SYNONYMS = sorted(
    ((syn, canon) for canon, syns in FINDING_SYNONYMS.items() for syn in syns),
    key=lambda p: -len(p[0]),
)
_NEGATION = re.compile(r"\b(no|without|negative for|absent|resolved)\b")
_SIZE_WORDS = {"tiny": "small", "small": "small", "trace": "small", "moderate": "moderate",
               "medium": "moderate", "large": "large", "massive": "large", "big": "large"}
_MM = re.compile(r"(\d+(?:\.\d+)?)\s*(mm|cm)\b")
_AGE = re.compile(r"\b(\d{1,3})\s*(?:-\s*)?(?:year|yr)s?(?:\s*-\s*|\s+)old\b|\baged?\s+(\d{1,3})\b")
_SEX = re.compile(r"\b(woman|female|girl|man|male|boy)\b")
_LOBE = re.compile(r"\b(right|left)\s+(upper|middle|lower)\s+lobe\b|\blingula\b")
_SIDE = re.compile(r"\b(right|left|bilateral|both)\b")


def parse_prompt(text: str) -> dict[str, Any]:
    """The attributes a prompt states: findings (name, side, lobe, size), sex and age.

    Clauses are separated by commas, semicolons, "and" or "with"; a clause holds at most one finding,
    and its side, lobe and size words belong to that finding. "no ..." / "without ..." negate it.

    Example:
        >>> parse_prompt("frontal chest radiograph, small left pleural effusion, 70 year old woman")
        {'stated': True, 'findings': [{'name': 'pleural effusion', 'location': 'left', 'size': 'small'}], \
'sex': 'F', 'age': 70}

    Args:
        text: Any prompt (``""`` is the null prompt).

    Returns:
        ``{"stated": bool, "findings": [...], "sex": "F"|"M"|None, "age": int|None}``; ``stated`` is
        whether the text names a finding or calls the study normal. Findings are dicts as
        :func:`conditioning.prompts.normalize_findings` gives them (``location`` a side or a lobe,
        ``size`` a word, ``size_mm`` a number), negated ones left out.

    Raises:
        ValueError: ``text`` is not a string.
    """
    if not isinstance(text, str):
        raise ValueError(f"text must be a string, got {type(text).__name__}")
    low = " " + text.lower().replace("-", " - ") + " "
    clauses = [c.strip() for c in re.split(r"[,;]|\.(?!\d)|\band\b|\bwith\b", low) if c.strip()]
    findings: list[dict[str, Any]] = []
    stated = False
    for clause in clauses:
        name = _finding_in(clause)
        if name is None:
            if any(re.search(rf"\b{re.escape(w)}\b", clause) for w in _NORMAL_WORDS):
                stated = True
            continue
        stated = True
        if _NEGATION.search(clause):
            continue
        findings.append(_finding_details(name, clause))
    sex_m = _SEX.search(low)
    age_m = _AGE.search(low)
    age = None
    if age_m:
        value = int(age_m.group(1) or age_m.group(2))
        age = value if 0 <= value <= 120 else None
    return {
        "stated": stated,
        "findings": findings,
        "sex": normalize_sex(sex_m.group(1)) if sex_m else None,
        "age": age,
    }


def _finding_in(clause: str) -> str | None:
    for syn, canon in _SYNONYMS:
        if re.search(rf"\b{re.escape(syn)}s?\b", clause):
            return canon
    return None


def _finding_details(name: str, clause: str) -> dict[str, Any]:
    out: dict[str, Any] = {"name": name}
    lobe = _LOBE.search(clause)
    if lobe:
        out["location"] = "left upper lobe" if lobe.group(0) == "lingula" else lobe.group(0)
    else:
        sides = set(_SIDE.findall(clause))
        if sides & {"bilateral", "both"} or sides >= {"left", "right"}:
            out["location"] = "bilateral"
        elif sides:
            out["location"] = sides.pop()
    mm = _MM.search(clause)
    if mm:
        out["size_mm"] = float(mm.group(1)) * (10.0 if mm.group(2) == "cm" else 1.0)
    else:
        for word, size in _SIZE_WORDS.items():
            if re.search(rf"\b{word}\b", clause):
                out["size"] = size
                break
    return out


def attribute_vector(attributes: Mapping[str, Any]) -> np.ndarray:
    """The fixed-length vector of a set of attributes (layout in the module docstring).

    Args:
        attributes: :func:`parse_prompt`'s output, or attributes as
            :func:`conditioning.prompts.build_prompt` takes them (``stated`` is then implied by a
            ``findings`` key).

    Returns:
        ``(ATTRIBUTE_DIM,)`` float32, entries in ``[0, 1]`` but for size (mm / 30, up to 2).

    Raises:
        ValueError: an unrecognised sex or a finding without a name.
    """
    vec = np.zeros(ATTRIBUTE_DIM, dtype=np.float32)
    stated = bool(attributes.get("stated", "findings" in attributes))
    if stated:
        vec[0] = 1.0
        for f in normalize_findings(attributes.get("findings")):
            if f["name"] not in VECTOR_FINDINGS:
                continue
            base = 1 + VECTOR_FINDINGS.index(f["name"]) * len(_PER_FINDING)
            slot = {k: base + i for i, k in enumerate(_PER_FINDING)}
            vec[slot["present"]] = 1.0
            loc = str(f.get("location") or "").lower()
            if loc.startswith("right") or loc == "bilateral":
                vec[slot["right"]] = 1.0
            if loc.startswith("left") or loc == "bilateral":
                vec[slot["left"]] = 1.0
            for part in ("upper", "middle", "lower"):
                if f" {part} lobe" in loc:
                    vec[slot[part]] = 1.0
            size = str(f.get("size") or "").lower()
            if size in ("small", "moderate", "large"):
                vec[slot[size]] = 1.0
            if f.get("size_mm") is not None:
                vec[slot["size_mm"]] = float(np.clip(float(f["size_mm"]) / SIZE_MM_SCALE, 0.0, 2.0))
    sex = normalize_sex(attributes.get("sex"))
    tail = 1 + len(VECTOR_FINDINGS) * len(_PER_FINDING)
    if sex is not None:
        vec[tail + (0 if sex == "F" else 1)] = 1.0
    age = attributes.get("age")
    if age is not None and str(age).strip() != "":
        vec[tail + 2] = 1.0
        vec[tail + 3] = float(np.clip(float(age) / 100.0, 0.0, 1.2))
    return vec


def prompt_vectors(prompts: list[str] | tuple[str, ...]) -> np.ndarray:
    """:func:`attribute_vector` of :func:`parse_prompt` for each prompt: ``(len(prompts), ATTRIBUTE_DIM)``
    float32 (the null prompt ``""`` gives a row of zeros).

    Raises:
        ValueError: ``prompts`` is a bare string.
    """
    if isinstance(prompts, str):
        raise ValueError(f"prompts must be a list of strings, got the string {prompts!r}")
    out = np.zeros((len(prompts), ATTRIBUTE_DIM), dtype=np.float32)
    for i, p in enumerate(prompts):
        out[i] = attribute_vector(parse_prompt(p))
    return out
