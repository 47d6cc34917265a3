"""From model-range pixels back to stored and physical values (DESIGN.md §3.1, §5).

RadSynth images are ``float32`` arrays in ``[0, 1]`` (0 = black, MONOCHROME2). An intensity mapping
(``{"kind", "low", "high", "unit", "bits_stored", "modality"}``, the dict form of
``generator.ingest.IntensityMapping``) says ``physical = low + x * (high - low)``. :class:`PixelEncoding`
turns that into integers a DICOM or NIfTI file can hold honestly:

- CT (unit ``HU``): stored = round(HU) - intercept with rescale slope 1 and intercept
  ``min(-1024, floor(low))``, unsigned, Bits Stored the smallest of 12..16 that holds the range.
- Other modalities: the mapping's ``low``/``high`` are grey levels; stored = round(physical),
  unsigned, Bits Stored the larger of the mapping's ``bits_stored`` and what ``high`` needs.

The window (centre, width) spans ``[low, high]`` in rescaled units, so viewers show the image as the
model produced it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

__all__ = ["PixelEncoding", "normalize_mapping", "default_mapping"]

_KEYS = ("kind", "low", "high", "unit", "bits_stored", "modality")


def default_mapping(modality: str, bits_stored: int = 12) -> dict[str, Any]:
    """The mapping assumed when an image comes without one.

    CT: soft-tissue window 40/400 HU (``[-160, 240]``); other modalities: the full unsigned range of
    ``bits_stored`` bits.
    """
    if modality == "CT":
        return {"kind": "ct_window", "low": -160.0, "high": 240.0, "unit": "HU", "bits_stored": 12, "modality": "CT"}
    top = float(2**bits_stored - 1)
    return {
        "kind": f"default{bits_stored}", "low": 0.0, "high": top, "unit": "", "bits_stored": bits_stored,
        "modality": modality,
    }


def normalize_mapping(mapping: Any) -> dict[str, Any]:
    """A plain, validated mapping dict from a dict or a duck-typed object.

    Accepts a mapping with the keys above, an object with ``to_dict()`` (such as
    ``generator.ingest.IntensityMapping``) or an object with ``low``/``high`` attributes.

    Raises:
        ValueError: missing ``low``/``high``, non-finite values, ``high <= low``, or
            ``bits_stored`` outside 1..16.
    """
    if hasattr(mapping, "to_dict"):
        mapping = mapping.to_dict()
    elif not isinstance(mapping, Mapping):
        mapping = {k: getattr(mapping, k) for k in _KEYS if hasattr(mapping, k)}
    if "low" not in mapping or "high" not in mapping:
        raise ValueError(f"intensity mapping {dict(mapping)!r} needs 'low' and 'high'")
    try:
        low, high = float(mapping["low"]), float(mapping["high"])
        bits = int(mapping.get("bits_stored", 8))
    except (TypeError, ValueError):
        raise ValueError(f"intensity mapping {dict(mapping)!r}: low/high/bits_stored must be numbers") from None
    if not (math.isfinite(low) and math.isfinite(high)) or high <= low:
        raise ValueError(f"intensity mapping low={mapping['low']!r}, high={mapping['high']!r}: need finite low < high")
    if not 1 <= bits <= 16:
        raise ValueError(f"intensity mapping bits_stored={mapping.get('bits_stored')!r}: expected 1..16")
    return {
        "kind": str(mapping.get("kind", "")),
        "low": low,
        "high": high,
        "unit": str(mapping.get("unit", "") or ""),
        "bits_stored": bits,
        "modality": str(mapping.get("modality", "") or ""),
    }


@dataclass(frozen=True)
class PixelEncoding:
    """How model-range pixels become stored integers (valid once constructed).

    Attributes:
        mapping: The normalized intensity mapping.
        hounsfield: Whether values are CT Hounsfield units (rescale to HU).
        bits_stored: Bits Stored (stored values lie in ``[0, 2**bits_stored - 1]``).
        bits_allocated: 8 or 16.
        slope: Rescale slope (physical = stored * slope + intercept).
        intercept: Rescale intercept.
        window_center: Window centre in rescaled units.
        window_width: Window width in rescaled units.
    """

    mapping: dict[str, Any]
    hounsfield: bool
    bits_stored: int
    bits_allocated: int
    slope: float
    intercept: float
    window_center: float
    window_width: float

    @classmethod
    def create(cls, mapping: Any, modality: str, *, bits_allocated: int = 16) -> "PixelEncoding":
        """Choose the encoding of ``mapping`` for a DICOM/NIfTI of ``modality``.

        Args:
            mapping: Intensity mapping (dict or object, see :func:`normalize_mapping`) or ``None``
                for :func:`default_mapping`.
            modality: ``"DX"``, ``"CR"``, ``"CT"``, ``"MR"`` or ``"OT"``.
            bits_allocated: 16, or 8 (Secondary Capture of 8-bit pictures).

        Raises:
            ValueError: the mapping does not fit (negative grey levels, more than 16 bits, a CT
                range wider than 16 bits, a non-HU mapping for CT, or more than 8 bits in an 8-bit
                allocation).
        """
        if bits_allocated not in (8, 16):
            raise ValueError(f"bits_allocated={bits_allocated!r}: expected 8 or 16")
        m = normalize_mapping(default_mapping(modality, min(12, bits_allocated)) if mapping is None else mapping)
        low, high = m["low"], m["high"]
        hounsfield = modality == "CT" or m["unit"].upper() == "HU"
        if hounsfield:
            if modality != "CT":
                raise ValueError(f"intensity mapping in HU cannot be exported as modality={modality!r}; use CT")
            if m["unit"].upper() != "HU":
                raise ValueError(
                    f"modality='CT' needs an intensity mapping in HU (unit 'HU'), got {m!r}; "
                    "drop the mapping to use the default 40/400 HU window, or export as DX/MR"
                )
            intercept = float(min(-1024, math.floor(low)))
            top = math.ceil(high) - intercept
            bits = max(12, int(top).bit_length())
        else:
            if low < 0:
                raise ValueError(f"intensity mapping low={low!r}: grey levels of {modality} must be >= 0")
            intercept = 0.0
            bits = max(m["bits_stored"], int(round(high)).bit_length())
        if bits > bits_allocated:
            raise ValueError(
                f"intensity mapping {m!r} needs {bits} bits, more than bits_allocated={bits_allocated}"
            )
        return cls(m, hounsfield, bits, bits_allocated, 1.0, intercept, (low + high) / 2.0, high - low)

    @property
    def max_stored(self) -> int:
        """Largest value Bits Stored allows."""
        return 2**self.bits_stored - 1

    @property
    def dtype(self) -> np.dtype:
        """Unsigned dtype of the stored values."""
        return np.dtype(np.uint8 if self.bits_allocated == 8 else np.uint16)

    def to_physical(self, image: np.ndarray) -> np.ndarray:
        """Model-range ``[0, 1]`` values (any shape) to physical values (float64).

        Raises:
            ValueError: ``image`` has NaN/inf values or values outside ``[0, 1]`` by more than 1e-3.
        """
        x = np.asarray(image, dtype=np.float64)
        if not np.isfinite(x).all():
            raise ValueError("image has NaN or infinite values; expected float values in [0, 1]")
        if x.size and (x.min() < -1e-3 or x.max() > 1 + 1e-3):
            raise ValueError(f"image values span [{x.min():.4g}, {x.max():.4g}]; expected [0, 1]")
        return self.mapping["low"] + np.clip(x, 0.0, 1.0) * (self.mapping["high"] - self.mapping["low"])

    def encode(self, image: np.ndarray) -> np.ndarray:
        """Model-range image(s) to stored integers (``dtype``), within ``[0, max_stored]``."""
        stored = np.rint(self.to_physical(image)) - self.intercept
        return np.clip(stored, 0, self.max_stored).astype(self.dtype)

    def decode(self, stored: np.ndarray) -> np.ndarray:
        """Stored integers back to physical values (float64)."""
        return np.asarray(stored, dtype=np.float64) * self.slope + self.intercept

    def physical_integers(self, image: np.ndarray) -> np.ndarray:
        """Model-range image(s) to rounded physical values as the smallest fitting integer dtype
        (``int16`` HU for CT, ``uint8``/``uint16`` grey levels otherwise): what NIfTI stores."""
        values = self.decode(self.encode(image))
        dtype = np.int16 if self.hounsfield else (np.uint8 if self.bits_stored <= 8 else np.uint16)
        if self.hounsfield and (values.min(initial=0) < -32768 or values.max(initial=0) > 32767):
            dtype = np.int32
        return values.astype(dtype)
