"""Procedural phantoms as a counterfactual image source: ground truth for a classifier, no generator error.

:class:`PhantomSource` renders :func:`generator.phantoms.render_phantom` for the attributes a stress-test
prompt names (``radsynth stress-test --model phantoms``). With the same seed and one attribute changed,
the phantom keeps its random draws where the attribute does not enter them, so a set of phantoms is an
exact counterfactual for findings (same anatomy, the finding added) and a close one for sex and age (the
anatomy is redrawn for the other sex). It is also how ``regions: phantom`` learns where a change acts.

:func:`prompt_attributes` reads the attributes back from a prompt in the wording of
:func:`conditioning.prompts.build_prompt` ("frontal chest radiograph, moderate left pleural effusion,
60 year old woman"); a part it cannot read is an error naming it.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import numpy as np

from conditioning.prompts import NO_FINDING_TEXTS, canonical_finding, normalize_sex
from generator.phantoms import LOBES, PHANTOM_FINDINGS, render_phantom

__all__ = ["PhantomSource", "prompt_attributes"]

_VIEW_WORDS = ("radiograph", "x-ray", "xray", "film")
_SIZES = ("small", "moderate", "large")
_SIDES = ("left", "right")
_AGE_SEX = re.compile(r"^(\d{1,3})[ -]year[ -]old(?: (\w+))?$")
_MM = re.compile(r"(\d+(?:\.\d+)?)\s*mm\b")
_LOBE = re.compile(r"\bin the ((?:right|left) (?:upper|middle|lower) lobe)\b")


def _finding(text: str, prompt: str) -> dict[str, Any]:
    finding: dict[str, Any] = {}
    rest = text
    m = _LOBE.search(rest)
    if m:
        finding["location"] = m.group(1)
        rest = rest[: m.start()] + rest[m.end():]
    m = _MM.search(rest)
    if m:
        finding["size_mm"] = float(m.group(1))
        rest = rest[: m.start()] + rest[m.end():]
    words = []
    for w in rest.split():
        if w in _SIZES:
            finding["size"] = w
        elif w in _SIDES and "location" not in finding:
            finding["location"] = w
        else:
            words.append(w)
    name = canonical_finding(" ".join(words))
    if name not in PHANTOM_FINDINGS:
        raise ValueError(
            f"the phantom source cannot draw {text!r} in the prompt {prompt!r}: it draws "
            f"{', '.join(PHANTOM_FINDINGS)} (with side/size/lobe words) or 'no acute findings'"
        )
    finding["name"] = name
    if name in ("nodule", "consolidation") and finding.get("location") in _SIDES:
        side = finding["location"]
        finding["location"] = next(lobe for lobe in LOBES if lobe.startswith(side) and "upper" in lobe)
    return finding


def prompt_attributes(prompt: str) -> dict[str, Any]:
    """Phantom attributes (``sex``, ``age``, ``findings``) named by a prompt.

    Args:
        prompt: Comma-separated parts: a view ("frontal chest radiograph"), findings ("moderate left
            pleural effusion", several joined by "and"), "no acute findings", "60 year old woman".

    Returns:
        ``{"modality": "DX", "view": "PA", "sex": "F"|"M"|None, "age": int|None, "findings": [...]}``.

    Raises:
        ValueError: a part names something the phantom cannot draw (naming the part and the prompt).
    """
    attrs: dict[str, Any] = {"modality": "DX", "view": "PA", "sex": None, "age": None, "findings": []}
    for raw in prompt.replace(";", ",").split(","):
        part = " ".join(raw.strip().lower().split())
        if not part or part in NO_FINDING_TEXTS:
            continue
        if "lateral" in part:
            raise ValueError(f"the phantom source draws frontal views only, got {part!r} in {prompt!r}")
        if any(w in part for w in _VIEW_WORDS) and canonical_finding(part) not in PHANTOM_FINDINGS:
            continue
        m = _AGE_SEX.match(part)
        if m:
            attrs["age"] = int(m.group(1))
            if m.group(2) and m.group(2) != "patient":
                attrs["sex"] = normalize_sex(m.group(2))
            continue
        try:
            sex = normalize_sex(part)
        except ValueError:
            sex = None
        if sex is not None:
            attrs["sex"] = sex
            continue
        for piece in re.split(r"\band\b|\bwith\b", part):
            if piece.strip():
                attrs["findings"].append(_finding(piece.strip(), prompt))
    return attrs


class PhantomSource:
    """Counterfactual images from :func:`generator.phantoms.render_phantom`.

    Args:
        resolution: Image side in pixels (>= 32).

    Raises:
        ValueError: ``resolution`` below 32.
    """

    name = "phantom"

    def __init__(self, resolution: int = 64) -> None:
        if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 32:
            raise ValueError(f"phantom resolution must be an integer >= 32, got {resolution!r}")
        self.resolution = resolution

    def check_prompts(self, prompts: Sequence[str]) -> None:
        """Raise ``ValueError`` (naming the part) for a prompt the phantom cannot draw."""
        for p in prompts:
            attrs = prompt_attributes(p)
            render_phantom(attrs, size=32, seed=0)

    def manifest_fields(self) -> dict[str, Any]:
        """What the manifest records about the source (the fields ``generate`` writes)."""
        return {"model": "phantom", "model_path": "generator.phantoms.render_phantom", "sampler": "render",
                "steps": 0, "guidance_scale": 0.0, "negative_prompt": None,
                "intensity": {"kind": "png8", "low": 0.0, "high": 255.0, "unit": "", "bits_stored": 8,
                              "modality": "DX"}}

    def from_noise(self, prompts: Sequence[str], seeds: Sequence[int]) -> np.ndarray:
        """Render one phantom per prompt: ``(B, H, W)`` float32 in ``[0, 1]``."""
        return np.stack([
            render_phantom(prompt_attributes(p), size=self.resolution, seed=int(s)).image
            for p, s in zip(prompts, seeds)
        ]).astype(np.float32)

    def edit(self, images: np.ndarray, prompts: Sequence[str], seeds: Sequence[int], *, strength: float,
             keep_masks: np.ndarray | None = None) -> np.ndarray:
        """Phantoms cannot edit real images.

        Raises:
            ValueError: always (``--images`` needs a diffusion model).
        """
        raise ValueError("--images needs a diffusion model (--model MODEL_DIR), not --model phantoms")
