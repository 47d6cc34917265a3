"""Where a counterfactual change should act, so that image similarity can be measured outside it.

A region is a ``bool (H, W)`` mask, True where the image *may* change. For a change of one attribute
from value ``a`` to value ``b`` the region is the union of the regions of ``a`` and ``b``; a value
without a region (e.g. "no acute findings") adds nothing. Regions come from the spec's ``regions`` key:

- a :class:`Zone` name per value: a fixed part of a frontal radiograph in display coordinates
  (patient right on the image left, so ``left_hemithorax`` is the image's right half);
- a mask PNG per value (white = may change), resized to the image with nearest-neighbour sampling;
- ``phantom``: per change, where procedural phantoms of the two prompts differ (same seeds), over
  :data:`PHANTOM_SEEDS` seeds, dilated by :data:`PHANTOM_DILATE` of the image side.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from PIL import Image
from scipy import ndimage

from generator._utils import did_you_mean
from generator.phantoms import render_phantom
from generator.stress.phantom_source import prompt_attributes

__all__ = ["Zone", "check_region_entry", "RegionMaps", "PHANTOM_SEEDS", "PHANTOM_DILATE"]

#: Phantom seeds whose differences make a ``regions: phantom`` mask.
PHANTOM_SEEDS = 8
#: Dilation of a phantom difference mask, as a fraction of the image side.
PHANTOM_DILATE = 0.04
#: A phantom pixel counts as changed when it moves by more than this (image range [0, 1]).
PHANTOM_CHANGE = 0.03


class Zone(str, Enum):
    """Named parts of a frontal chest radiograph (patient sides; display has patient right on the left)."""

    LEFT_HEMITHORAX = "left_hemithorax"
    RIGHT_HEMITHORAX = "right_hemithorax"
    LEFT_LOWER_ZONE = "left_lower_zone"
    RIGHT_LOWER_ZONE = "right_lower_zone"
    LEFT_UPPER_ZONE = "left_upper_zone"
    RIGHT_UPPER_ZONE = "right_upper_zone"
    LOWER_ZONES = "lower_zones"
    UPPER_ZONES = "upper_zones"
    WHOLE_IMAGE = "whole_image"

    def mask(self, size: int) -> np.ndarray:
        """``bool (size, size)``, True inside the zone."""
        rows, cols = np.mgrid[0:size, 0:size]
        half = size / 2.0
        patient_left = cols + 0.5 >= half  # image right half
        lower = rows + 0.5 >= half
        table = {
            Zone.LEFT_HEMITHORAX: patient_left,
            Zone.RIGHT_HEMITHORAX: ~patient_left,
            Zone.LEFT_LOWER_ZONE: patient_left & lower,
            Zone.RIGHT_LOWER_ZONE: ~patient_left & lower,
            Zone.LEFT_UPPER_ZONE: patient_left & ~lower,
            Zone.RIGHT_UPPER_ZONE: ~patient_left & ~lower,
            Zone.LOWER_ZONES: lower,
            Zone.UPPER_ZONES: ~lower,
            Zone.WHOLE_IMAGE: np.ones((size, size), dtype=bool),
        }
        return np.asarray(table[self], dtype=bool)


def _read_mask(path: Path, key: str) -> np.ndarray:
    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("L"), dtype=np.float32) / 255.0
    except OSError as exc:
        raise ValueError(f"{key}: {path} is not a readable image ({exc})") from None
    return arr >= 0.5


def check_region_entry(entry: Any, key: str, spec_file: Path | None) -> str:
    """Validate one ``regions`` entry: a :class:`Zone` name or a mask image file.

    Args:
        entry: The value in the spec.
        key: Its spec key (``"regions.finding.moderate left pleural effusion"``), for messages.
        spec_file: The spec file; relative mask paths are relative to its folder.

    Returns:
        The zone name, or the mask file's path.

    Raises:
        ValueError: neither a zone nor an existing readable image (naming ``key``).
    """
    if not isinstance(entry, str) or not entry.strip():
        raise ValueError(f"{key} must be a zone name or a mask file, got {entry!r}")
    zones = [z.value for z in Zone]
    if entry in zones:
        return entry
    path = Path(entry)
    if not path.is_absolute() and spec_file is not None:
        path = Path(spec_file).parent / path
    if not path.is_file():
        raise ValueError(
            f"{key} is neither a zone ({', '.join(zones)}) nor an existing mask file: {entry!r}"
            f"{did_you_mean(entry, zones)}"
        )
    _read_mask(path, key)
    return str(path)


class RegionMaps:
    """The "may change" mask of every change of a varied attribute, at one image size.

    Args:
        regions: The spec's ``regions`` (``None``, ``"phantom"`` or attribute -> value -> zone/file).
        size: Image side in pixels.
    """

    def __init__(self, regions: str | Mapping[str, Mapping[str, str]] | None, size: int) -> None:
        self.regions = regions
        self.size = int(size)
        self._cache: dict[tuple[str, ...], np.ndarray | None] = {}

    def _value_mask(self, attribute: str, value: Any) -> np.ndarray | None:
        if not isinstance(self.regions, Mapping):
            return None
        entry = self.regions.get(attribute, {}).get(str(value))
        if entry is None:
            return None
        if entry in {z.value for z in Zone}:
            return Zone(entry).mask(self.size)
        mask = _read_mask(Path(entry), f"regions.{attribute}.{value}")
        if mask.shape != (self.size, self.size):
            img = Image.fromarray(mask.astype(np.uint8) * 255).resize((self.size, self.size), Image.Resampling.NEAREST)
            mask = np.asarray(img) >= 128
        return mask

    def _phantom_mask(self, prompt_a: str, prompt_b: str) -> np.ndarray | None:
        try:
            a, b = prompt_attributes(prompt_a), prompt_attributes(prompt_b)
        except ValueError:
            return None
        size = max(self.size, 32)
        changed = np.zeros((size, size), dtype=bool)
        for seed in range(PHANTOM_SEEDS):
            ia = render_phantom(a, size=size, seed=seed).image
            ib = render_phantom(b, size=size, seed=seed).image
            changed |= np.abs(ia - ib) > PHANTOM_CHANGE
        iterations = max(1, int(round(PHANTOM_DILATE * size)))
        changed = ndimage.binary_dilation(changed, iterations=iterations)
        if size != self.size:
            img = Image.fromarray(changed.astype(np.uint8) * 255).resize((self.size, self.size), Image.Resampling.NEAREST)
            changed = np.asarray(img) >= 128
        return changed

    def mask(self, attribute: str, from_value: Any, to_value: Any, prompt_from: str, prompt_to: str) -> np.ndarray | None:
        """Where the change ``attribute: from_value -> to_value`` may act, or ``None`` when unknown.

        Args:
            attribute: The varied attribute.
            from_value: Its value before.
            to_value: Its value after.
            prompt_from: Prompt of the image before (used by ``regions: phantom``).
            prompt_to: Prompt of the image after.

        Returns:
            ``bool (size, size)`` (True = may change), or ``None`` when the spec gives no region.
        """
        if self.regions is None:
            return None
        key = (attribute, str(from_value), str(to_value), prompt_from, prompt_to)
        if key not in self._cache:
            if self.regions == "phantom":
                self._cache[key] = self._phantom_mask(prompt_from, prompt_to)
            else:
                parts = [m for m in (self._value_mask(attribute, from_value), self._value_mask(attribute, to_value))
                         if m is not None]
                self._cache[key] = np.logical_or.reduce(parts) if parts else None
        return self._cache[key]
