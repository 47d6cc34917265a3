"""Voxel-grid operations on :class:`~generator.volumes.records.Volume`: the standard layout, resampling
to a target spacing, and centred crop/pad to a training shape. Every operation updates the affine so
that each voxel keeps its world position (RAS+ mm).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation, ornt_transform
from scipy import ndimage

from generator.volumes.records import Volume

__all__ = ["LAYOUT_ORNT", "centred_affine", "to_layout", "parse_spacing", "parse_shape", "resample", "crop_or_pad"]

#: nibabel orientation of the standard layout: d -> +S (world axis 2), h -> -A (posterior),
#: w -> -R (patient left). See :mod:`generator.volumes.records`.
LAYOUT_ORNT = np.array([[2.0, 1.0], [1.0, -1.0], [0.0, -1.0]])


def centred_affine(shape: Sequence[int], spacing: Sequence[float]) -> np.ndarray:
    """RAS+ affine of a ``(D, H, W)`` grid in the standard layout, spacing ``(slice, row, column)`` mm,
    whose centre lies at the world origin (d -> +S, h -> posterior, w -> patient left)."""
    sp = [float(s) for s in spacing]
    affine = np.array([[0, 0, -sp[2], 0], [0, -sp[1], 0, 0], [sp[0], 0, 0, 0], [0, 0, 0, 1]], dtype=np.float64)
    affine[:3, 3] = -affine[:3, :3] @ ((np.asarray(shape, dtype=np.float64) - 1) / 2)
    return affine


def to_layout(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Permute/flip a 3D array (any axis order, RAS affine) into the standard ``(D, H, W)`` layout.

    Only axis permutations and flips are applied (no interpolation); an oblique rotation stays in
    the returned affine.

    Args:
        array: 3D array whose index axes the RAS+ ``affine`` (4x4, mm) maps to the world.

    Returns:
        ``(array, affine)`` in the standard layout.
    """
    start = io_orientation(affine)
    transform = ornt_transform(start, LAYOUT_ORNT)
    out = apply_orientation(array, transform)
    new_affine = affine @ inv_ornt_aff(transform, array.shape)
    return np.ascontiguousarray(out), new_affine


def parse_spacing(value: float | str | Sequence[float] | None) -> tuple[float, float, float] | None:
    """``--spacing``: one number (isotropic), three ``(slice, row, column)`` mm, or ``"1.5,1,1"``.

    Raises:
        ValueError: not 1 or 3 positive finite numbers (naming ``spacing`` and the value).
    """
    if value is None:
        return None
    raw = value
    if isinstance(value, str):
        parts = [p for p in value.replace("x", ",").split(",") if p.strip()]
    elif isinstance(value, (int, float)):
        parts = [value]
    else:
        parts = list(value)
    try:
        nums = [float(p) for p in parts]
    except (TypeError, ValueError):
        raise ValueError(f"spacing must be 1 or 3 numbers in mm, got {raw!r}") from None
    if len(nums) == 1:
        nums = nums * 3
    if len(nums) != 3 or not all(np.isfinite(n) and n > 0 for n in nums):
        raise ValueError(f"spacing must be 1 or 3 positive numbers in mm, got {raw!r}")
    return (nums[0], nums[1], nums[2])


def parse_shape(value: int | Sequence[int] | None) -> tuple[int, int, int] | None:
    """Training shape: one side (cube) or ``(D, H, W)``.

    Raises:
        ValueError: not 1 or 3 positive integers.
    """
    if value is None:
        return None
    parts = [value] if isinstance(value, (int, np.integer)) else list(value)
    if len(parts) == 1:
        parts = parts * 3
    if len(parts) != 3 or not all(isinstance(p, (int, np.integer)) and p >= 1 for p in parts):
        raise ValueError(f"shape must be 1 or 3 positive integers (D, H, W), got {value!r}")
    return (int(parts[0]), int(parts[1]), int(parts[2]))


def resample(volume: Volume, spacing: Sequence[float], *, order: int = 1) -> Volume:
    """Resample to ``spacing`` (``(slice, row, column)`` mm) over the same field of view.

    The new grid covers the same extent (outer voxel faces) as the old; new voxel ``i`` lies at
    old index ``(i + 0.5) * new / old - 0.5`` along each axis, and the affine says so. Linear
    interpolation (``order=1``) by default; edges repeat the nearest voxel.

    Args:
        volume: The volume in the standard layout.
        spacing: Target spacing, 3 positive mm.
        order: Spline order of ``scipy.ndimage.affine_transform`` (0 nearest, 1 linear, 3 cubic).

    Returns:
        A new :class:`Volume`; unchanged copy if the spacing already matches within 1e-6 mm.
    """
    target = parse_spacing(spacing)
    if target is None:
        raise ValueError("spacing must be 1 or 3 positive numbers in mm, got None")
    old = np.asarray(volume.spacing)
    new = np.asarray(target)
    if np.allclose(old, new, atol=1e-6):
        return volume.with_array(volume.array.copy(), volume.affine.copy(), volume.spacing)
    ratio = new / old
    shape = tuple(max(1, int(round(s / r))) for s, r in zip(volume.shape, ratio))
    offset = 0.5 * ratio - 0.5
    out = ndimage.affine_transform(volume.array, ratio, offset=offset, output_shape=shape, order=order,
                                   mode="nearest", prefilter=order > 1).astype(np.float32)
    step = np.eye(4)
    step[:3, :3] = np.diag(ratio)
    step[:3, 3] = offset
    return volume.with_array(out, volume.affine @ step, target)


def crop_or_pad(volume: Volume, shape: Sequence[int], *, fill: float | None = None) -> Volume:
    """Centre-crop or pad to ``shape`` ``(D, H, W)``; the affine moves so voxels keep their place.

    Args:
        volume: The volume.
        shape: Target ``(D, H, W)``.
        fill: Value of padded voxels, physical units (default: the mapping's ``low``, e.g. -1024 HU
            for CT, so padding reads as air / background).
    """
    target = parse_shape(tuple(shape))
    if target is None:  # pragma: no cover - parse_shape returns None only for None
        raise ValueError("shape must be (D, H, W), got None")
    fill_value = volume.intensity.low if fill is None else float(fill)
    out = np.full(target, fill_value, dtype=np.float32)
    src_sl, dst_sl, start = [], [], []
    for n_old, n_new in zip(volume.shape, target):
        before = (n_new - n_old) // 2  # > 0 pad, < 0 crop
        if before >= 0:
            src_sl.append(slice(0, n_old))
            dst_sl.append(slice(before, before + n_old))
        else:
            src_sl.append(slice(-before, -before + n_new))
            dst_sl.append(slice(0, n_new))
        start.append(-before)
    out[tuple(dst_sl)] = volume.array[tuple(src_sl)]
    shift = np.eye(4)
    shift[:3, 3] = start  # new index i sits at old index i + start
    return volume.with_array(out, volume.affine @ shift, volume.spacing)
