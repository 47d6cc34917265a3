"""Random augmentation that radiology allows (issue 9): small shifts, zooms, rotations, intensity.

No left-right flip by default: a flipped chest radiograph puts the heart on the wrong side, which a
text-conditioned model must not learn. Parameters are a frozen dataclass that round-trips through
JSON (:meth:`Augment.to_dict` / :meth:`Augment.from_dict`), so ``radsynth.json`` can record them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

import numpy as np

__all__ = ["Augment"]


@dataclass(frozen=True)
class Augment:
    """Random geometric and intensity augmentation of a ``(H, W)`` float32 image in ``[0, 1]``.

    Each call draws, in this order and always all of them: shift x, shift y (uniform in
    ``±max_shift`` of the side), zoom (log-uniform in ``[1/(1+max_zoom), 1+max_zoom]``), rotation
    (uniform ``±max_rotation`` degrees), brightness (uniform ``±brightness``), contrast (log-uniform
    factor in ``[1/(1+contrast), 1+contrast]``), gamma (log-uniform in ``[1/(1+gamma), 1+gamma]``) and a
    flip coin. The geometric part is one bilinear affine resampling about the image centre (pixels
    from outside the image are 0, black); then ``x <- clip(((x - 0.5) * c + 0.5 + b), 0, 1) ** g``.

    Attributes:
        max_shift: Largest shift as a fraction of the side, in ``[0, 0.25]``.
        max_zoom: Largest relative zoom, in ``[0, 0.5]``.
        max_rotation: Largest rotation in degrees, in ``[0, 30]``.
        brightness: Largest additive brightness change, in ``[0, 0.5]``.
        contrast: Largest relative contrast change, in ``[0, 1]``.
        gamma: Largest relative gamma change, in ``[0, 1]``.
        hflip: Flip left-right with probability 1/2 (off by default: it moves the heart).
    """

    max_shift: float = 0.04
    max_zoom: float = 0.05
    max_rotation: float = 3.0
    brightness: float = 0.03
    contrast: float = 0.05
    gamma: float = 0.05
    hflip: bool = False

    _LIMITS = {"max_shift": 0.25, "max_zoom": 0.5, "max_rotation": 30.0, "brightness": 0.5,
               "contrast": 1.0, "gamma": 1.0}

    def __post_init__(self) -> None:
        for name, hi in self._LIMITS.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or not 0.0 <= value <= hi:
                raise ValueError(f"{name} must be a finite number in [0, {hi:g}], got {value!r}")
        if not isinstance(self.hflip, bool):
            raise ValueError(f"hflip must be True or False, got {self.hflip!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable parameters (recorded in ``radsynth.json``)."""
        return {k: v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Augment":
        """Inverse of :meth:`to_dict`.

        Raises:
            ValueError: an unknown key (with the closest known one) or a value out of range.
        """
        import difflib

        known = [f.name for f in fields(cls)]
        for k in d:
            if k not in known:
                close = difflib.get_close_matches(str(k), known, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ValueError(f"unknown augmentation parameter {k!r}{hint} (known: {known})")
        return cls(**dict(d))

    @property
    def is_identity(self) -> bool:
        """True when every range is 0 and flipping is off."""
        return not self.hflip and all(getattr(self, n) == 0 for n in self._LIMITS)

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Augment one image.

        Args:
            image: ``(H, W)`` float in ``[0, 1]``.
            rng: The generator the draws come from (e.g. ``np.random.default_rng([seed, epoch, i])``).

        Returns:
            ``(H, W)`` float32 in ``[0, 1]``.

        Raises:
            ValueError: ``image`` is not 2D.
        """
        x = np.asarray(image, dtype=np.float32)
        if x.ndim != 2:
            raise ValueError(f"image must have shape (H, W), got {x.shape}")
        u = rng.uniform(-1.0, 1.0, size=7)
        flip = bool(rng.random() < 0.5)
        h, w = x.shape
        tx, ty = u[0] * self.max_shift * w, u[1] * self.max_shift * h
        zoom = math.exp(u[2] * math.log1p(self.max_zoom))
        theta = math.radians(u[3] * self.max_rotation)
        if tx or ty or zoom != 1.0 or theta:
            x = _affine(x, zoom, theta, tx, ty)
        if self.hflip and flip:
            x = np.ascontiguousarray(x[:, ::-1])
        b = u[4] * self.brightness
        c = math.exp(u[5] * math.log1p(self.contrast))
        g = math.exp(u[6] * math.log1p(self.gamma))
        if b or c != 1.0:
            x = (x - 0.5) * c + 0.5 + b
        x = np.clip(x, 0.0, 1.0)
        if g != 1.0:
            x = np.power(x, g)
        return x.astype(np.float32)


def _affine(x: np.ndarray, zoom: float, theta: float, tx: float, ty: float) -> np.ndarray:
    """Zoom by ``zoom`` and rotate by ``theta`` about the centre, then shift by ``(tx, ty)`` pixels."""
    from PIL import Image

    h, w = x.shape
    cx, cy = w / 2.0, h / 2.0
    cos, sin = math.cos(theta) / zoom, math.sin(theta) / zoom
    # PIL asks for the inverse map: output (u, v) -> input (a u + b v + c, d u + e v + f).
    a, b, d, e = cos, sin, -sin, cos
    c = cx - a * (cx + tx) - b * (cy + ty)
    f = cy - d * (cx + tx) - e * (cy + ty)
    out = Image.fromarray(x, mode="F").transform((w, h), Image.Transform.AFFINE, (a, b, c, d, e, f),
                                                 resample=Image.Resampling.BILINEAR, fillcolor=0.0)
    return np.asarray(out, dtype=np.float32)
