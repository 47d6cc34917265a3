"""What an exported file says about where its pixels came from.

:class:`Provenance` is built from one line of a generation ``metadata.jsonl`` (DESIGN.md §3.3). Only a
whitelist of fields is kept: the prompt, seed, model hash, sampler settings, the prompt's structured
attributes, the intensity mapping and the privacy verdict fields. Anything else on the line (for
example nearest-neighbour training file names, which may themselves identify real patients) is
dropped and never reaches an exported header or sidecar.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any, Mapping

__all__ = ["Provenance", "ATTRIBUTE_KEYS", "PRIVACY_KEYS"]

#: Prompt attributes carried into exports (DESIGN.md §3.1 minus ``patient_id``, which is never copied).
ATTRIBUTE_KEYS = ("sex", "age", "view", "modality", "findings", "label")
#: Privacy gate fields carried into exports (scalars only; no neighbour identifiers).
PRIVACY_KEYS = ("nearest_train_similarity", "privacy_threshold", "privacy_verdict")
_KNOWN_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".nii", ".gz", ".npz", ".npy", ".dcm"}


def _scalar(value: Any) -> Any:
    """JSON scalar or list of scalars; anything else becomes its string form."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (list, tuple)):
        return [_scalar(v) for v in value]
    if hasattr(value, "item"):  # numpy scalar
        return _scalar(value.item())
    return str(value)


@dataclass(frozen=True)
class Provenance:
    """Provenance of one synthetic image, taken from its metadata line.

    Attributes:
        file_name: The image's path in its imagefolder (POSIX separators), used to name exports.
        text: The prompt.
        seed: Per-image generator seed, or ``None`` when unknown (then UIDs and identity are random).
        model: Model hash (any string; ``""`` when unknown).
        sampler: Sampler name (``""`` when unknown).
        steps: Sampling steps, or ``None``.
        guidance_scale: Classifier-free guidance scale, or ``None``.
        attributes: Whitelisted prompt attributes (:data:`ATTRIBUTE_KEYS`).
        intensity: The intensity mapping dict, or ``None``.
        privacy: Whitelisted privacy fields (:data:`PRIVACY_KEYS`).
    """

    file_name: str
    text: str = ""
    seed: int | None = None
    model: str = ""
    sampler: str = ""
    steps: int | None = None
    guidance_scale: float | None = None
    attributes: dict[str, Any] = field(default_factory=dict)
    intensity: dict[str, Any] | None = None
    privacy: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any]) -> "Provenance":
        """Build from a metadata line (a mapping); unknown keys are ignored.

        Attributes may be given nested (``{"attributes": {"sex": "F"}}``) or flat (``{"sex": "F"}``,
        the imagefolder column form); nested wins.

        Raises:
            ValueError: ``metadata`` is not a mapping, lacks ``file_name``, or has a non-integer
                ``seed`` or non-numeric ``steps``/``guidance_scale``.
        """
        if not isinstance(metadata, Mapping):
            raise ValueError(f"metadata must be a mapping, got {type(metadata).__name__}")
        file_name = metadata.get("file_name")
        if not file_name or not isinstance(file_name, str):
            raise ValueError(f"metadata['file_name'] must be a non-empty string, got {file_name!r}")
        seed = metadata.get("seed")
        if seed is not None:
            if isinstance(seed, bool) or not isinstance(seed, (int, str)) or not str(seed).lstrip("-").isdigit():
                raise ValueError(f"metadata['seed'] must be an integer, got {seed!r}")
            seed = int(seed)
        steps = metadata.get("steps")
        guidance = metadata.get("guidance_scale")
        try:
            steps = None if steps is None else int(steps)
            guidance = None if guidance is None else float(guidance)
        except (TypeError, ValueError):
            raise ValueError(
                f"metadata steps={metadata.get('steps')!r} / guidance_scale={metadata.get('guidance_scale')!r} "
                "must be numbers"
            ) from None
        attrs: dict[str, Any] = {}
        nested = metadata.get("attributes") or {}
        if not isinstance(nested, Mapping):
            raise ValueError(f"metadata['attributes'] must be a mapping, got {nested!r}")
        for key in ATTRIBUTE_KEYS:
            value = nested.get(key, metadata.get(key))
            if value is not None and value != "":
                attrs[key] = _scalar(value)
        intensity = metadata.get("intensity")
        if intensity is not None:
            if hasattr(intensity, "to_dict"):
                intensity = intensity.to_dict()
            if not isinstance(intensity, Mapping):
                raise ValueError(f"metadata['intensity'] must be a mapping, got {intensity!r}")
            intensity = {k: _scalar(v) for k, v in intensity.items()}
        privacy = {k: _scalar(metadata[k]) for k in PRIVACY_KEYS if metadata.get(k) is not None}
        return cls(
            file_name=str(PurePosixPath(file_name.replace("\\", "/"))),
            text=str(metadata.get("text") or ""),
            seed=seed,
            model=str(metadata.get("model") or ""),
            sampler=str(metadata.get("sampler") or ""),
            steps=steps,
            guidance_scale=guidance,
            attributes=attrs,
            intensity=intensity,
            privacy=privacy,
        )

    @property
    def stem(self) -> str:
        """``file_name`` without image suffixes, folders joined by ``_`` (a safe file stem)."""
        path = PurePosixPath(self.file_name)
        name = path.name
        while PurePosixPath(name).suffix.lower() in _KNOWN_SUFFIXES:
            name = name[: -len(PurePosixPath(name).suffix)]
        parts = [p for p in path.parent.parts if p not in ("", ".", "..", "/")] + [name or "image"]
        stem = "_".join(parts)
        return "".join(c if c.isalnum() or c in "-_." else "_" for c in stem)

    def identity_key(self, salt: str = "") -> str | None:
        """Deterministic key for UIDs and the invented patient, or ``None`` without a seed.

        The key hashes the seed with the model hash, the prompt and the file name, so two runs that
        reuse a seed with another model or prompt do not collide, while re-exporting the same
        generated image (same metadata line) always gives the same UIDs and patient.

        Args:
            salt: Distinguishes independent namespaces (the exporters pass the software name).
        """
        if self.seed is None:
            return None
        blob = json.dumps([salt, self.model, self.seed, self.text, self.file_name], ensure_ascii=False)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def summary(self, software: str) -> str:
        """One human-readable line: software, model hash, seed, sampler and the prompt."""
        bits = [f"SYNTHETIC image generated by {software}"]
        if self.model:
            bits.append(f"model {self.model}")
        if self.seed is not None:
            bits.append(f"seed {self.seed}")
        if self.sampler:
            sampler = self.sampler
            if self.steps is not None:
                sampler += f" {self.steps} steps"
            if self.guidance_scale is not None:
                sampler += f" guidance {self.guidance_scale:g}"
            bits.append(f"sampler {sampler}")
        return "; ".join(bits) + (f"; prompt: {self.text}" if self.text else "")

    def to_json(self) -> dict[str, Any]:
        """JSON-serialisable dict with BIDS-style keys (for sidecars, manifests, private tags)."""
        out: dict[str, Any] = {
            "SourceFile": self.file_name,
            "Prompt": self.text,
            "Seed": self.seed,
            "Model": self.model,
            "Sampler": self.sampler,
            "Steps": self.steps,
            "GuidanceScale": self.guidance_scale,
            "Attributes": dict(self.attributes),
        }
        if self.intensity is not None:
            out["IntensityMapping"] = dict(self.intensity)
        if self.privacy:
            out["Privacy"] = dict(self.privacy)
        return out
