"""Similarity views of an image: pixel correlation, perceptual hash (DESIGN.md §4).

Every function takes images as ``(N, H, W)`` float arrays in ``[0, 1]`` (the RadSynth pixel
convention) and returns features whose inner products are similarities:

- pixel normalized cross-correlation (NCC): images are resized to at most ``NCC_MAX_SIZE`` pixels,
  centred and scaled to unit norm, so a dot product is the Pearson correlation in ``[-1, 1]``.
  :func:`shifted_ncc_max` takes the maximum over horizontal flips and shifts of up to ``max_shift``
  pixels, comparing the query's shifted window with the reference's central window.
  :func:`refine_ncc` then refines the best alignments to sub-pixel precision by warping the
  reference forward (scale, rotation, translation), as a crop-and-resize or rotation made the copy.
- perceptual hash (pHash): sign of the low-frequency 2D DCT block against its median, 64 bits; the
  similarity ``1 - hamming / 64`` lies in ``[0, 1]``.

The learned contrastive view lives in :mod:`privacy.embedding`.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from scipy.fft import dctn

#: Largest side used by the pixel-correlation view; bigger images are area-downsampled to it.
NCC_MAX_SIZE = 32
#: Side of the coarse, blurred pixel view used to pick candidates for the shifted NCC.
COARSE_SIZE = 16
#: Bits of the perceptual hash (an 8 x 8 DCT block).
HASH_BITS = 64

_EPS = 1e-6
#: Windows whose centred norm is below this (per-pixel std under ~4e-5 of the [0, 1] range on a
#: 24 x 24 window) are flat: their correlation is undefined and counted as 0.
_FLAT_NORM = 1e-3
#: Queries and candidates per grouped correlation of :func:`shifted_ncc_max` (fixed, padded: results do
#: not depend on how many queries or candidates a call has, so split audits equal single ones).
_NCC_QUERY_BLOCK = 16
_NCC_CAND_BLOCK = 64


def _writable(a: np.ndarray) -> np.ndarray:
    """C-contiguous float32 array torch can wrap: ``a`` itself when possible, else a copy (read-only
    arrays, e.g. a frozen index's images, are copied instead of shared)."""
    out = np.ascontiguousarray(a, dtype=np.float32)
    return out if out.flags.writeable else out.copy()


def check_images(images: np.ndarray, name: str = "images") -> np.ndarray:
    """Validate an image stack and return it as C-contiguous float32.

    Args:
        images: ``(N, H, W)`` array, values in ``[0, 1]``.
        name: Argument name used in error messages.

    Returns:
        ``(N, H, W)`` float32 array.

    Raises:
        ValueError: wrong number of dimensions, empty stack, non-finite values or values outside
            ``[0, 1]`` (beyond a small tolerance).
    """
    arr = np.asarray(images)
    if arr.ndim != 3:
        raise ValueError(f"{name} must have shape (N, H, W), got shape {arr.shape}")
    if arr.shape[0] == 0:
        raise ValueError(f"{name} is empty (shape {arr.shape})")
    return check_unit_values(arr, name)


def check_unit_values(arr: np.ndarray, name: str) -> np.ndarray:
    """``arr`` as C-contiguous float32, refused when it holds NaN/infinity or values outside ``[0, 1]``
    (beyond 1e-3); shared by the image and volume checks.

    Raises:
        ValueError: naming ``name`` and the range found.
    """
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    lo, hi = float(arr.min()), float(arr.max())
    if lo < -1e-3 or hi > 1.0 + 1e-3:
        raise ValueError(f"{name} must lie in [0, 1], got values in [{lo:.4g}, {hi:.4g}]")
    return arr


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
    """Resize ``(N, H, W)`` images to ``(N, size, size)`` (area averaging down, bilinear up).

    Args:
        images: ``(N, H, W)`` float array.
        size: Output side in pixels.

    Returns:
        ``(N, size, size)`` float32 array.
    """
    arr = np.asarray(images, dtype=np.float32)
    if arr.shape[1] == size and arr.shape[2] == size:
        return np.ascontiguousarray(arr)
    t = torch.from_numpy(_writable(arr))[:, None]
    if arr.shape[1] >= size and arr.shape[2] >= size:
        out = F.interpolate(t, size=(size, size), mode="area")
    else:
        out = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return out[:, 0].numpy()


def normalize_rows(x: np.ndarray) -> np.ndarray:
    """Centre each row and scale it to unit L2 norm (so dot products are correlations).

    Args:
        x: ``(N, D)`` float array.

    Returns:
        ``(N, D)`` float32 array; a constant row becomes all zeros.
    """
    x = np.asarray(x, dtype=np.float32)
    x = x - x.mean(axis=1, keepdims=True)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(n, _EPS)).astype(np.float32)


def ncc_size(resolution: int) -> int:
    """Side of the pixel-correlation view for images of side ``resolution``."""
    return int(min(resolution, NCC_MAX_SIZE))


def default_max_shift(size: int) -> int:
    """Default largest shift (pixels of the NCC view) searched: about 11% of the side."""
    return max(1, int(round(size * 0.11)))


def ncc_images(images: np.ndarray, smooth_sigma: float = 0.0) -> np.ndarray:
    """The pixel view: images resized to :func:`ncc_size`, optionally Gaussian-smoothed.

    Args:
        images: ``(N, H, W)`` float images.
        smooth_sigma: Gaussian sigma in pixels of the resized view (0: none); smoothing makes the
            correlation robust to pixel noise.

    Returns:
        ``(N, S, S)`` float32.
    """
    v = resize_images(images, ncc_size(images.shape[1]))
    if smooth_sigma > 0:
        v = ndimage.gaussian_filter(v, sigma=(0, smooth_sigma, smooth_sigma), mode="nearest")
    return v.astype(np.float32)


def warp_images(images: np.ndarray, warps: Sequence[tuple[float, float]]) -> np.ndarray:
    """Rotated and zoomed versions of images (about the centre, border pixels extended).

    Args:
        images: ``(N, S, S)`` float images.
        warps: ``(angle_degrees, zoom)`` pairs; ``zoom > 1`` enlarges (as a crop-and-resize does).

    Returns:
        ``(N, len(warps), S, S)`` float32.
    """
    t = torch.from_numpy(_writable(images))[:, None]
    out = []
    for angle, zoom in warps:
        if angle == 0 and zoom == 1:
            out.append(t[:, 0])
            continue
        a = np.deg2rad(angle)
        c, s = np.cos(a) / zoom, np.sin(a) / zoom
        theta = torch.tensor([[c, -s, 0.0], [s, c, 0.0]], dtype=torch.float32).expand(len(t), 2, 3)
        grid = F.affine_grid(theta, list(t.shape), align_corners=False)
        out.append(F.grid_sample(t, grid, mode="bilinear", padding_mode="border", align_corners=False)[:, 0])
    return torch.stack(out, 1).numpy()


def plain_ncc_features(images: np.ndarray) -> np.ndarray:
    """Unshifted, unflipped correlation features of the NCC view (``(N, S*S)``, unit rows)."""
    v = ncc_images(images)
    return normalize_rows(v.reshape(len(v), -1))


def coarse_features(images: np.ndarray, flip: bool = False) -> np.ndarray:
    """Blurred low-resolution correlation features used to pick NCC candidates.

    Args:
        images: ``(N, H, W)`` float array in ``[0, 1]``.
        flip: Mirror the images left-right first.

    Returns:
        ``(N, COARSE_SIZE**2)`` float32 rows of unit norm.
    """
    v = resize_images(images, COARSE_SIZE)
    if flip:
        v = v[:, :, ::-1]
    return normalize_rows(v.reshape(len(v), -1))


def reference_windows(ref_ncc: np.ndarray, max_shift: int) -> np.ndarray:
    """Central windows of references for the shifted NCC.

    Args:
        ref_ncc: ``(N, S, S)`` pixel view of the references.
        max_shift: Largest shift searched, in pixels.

    Returns:
        ``(N, (S-2m)**2)`` float32 unit rows, ``m = max_shift``.
    """
    s = ref_ncc.shape[1]
    m = int(max_shift)
    if s - 2 * m < 4:
        raise ValueError(f"max_shift={max_shift} is too large for a {s}-pixel view")
    w = ref_ncc[:, m : s - m, m : s - m]
    return normalize_rows(w.reshape(len(w), -1))


def query_windows(
    query_ncc: np.ndarray,
    max_shift: int,
    flips: bool = True,
    warps: Sequence[tuple[float, float]] = ((0.0, 1.0),),
) -> np.ndarray:
    """All shifted (and mirrored) windows of queries for the shifted NCC.

    Args:
        query_ncc: ``(Q, S, S)`` pixel view of the queries.
        max_shift: Largest shift searched, in pixels (``(2m+1)**2`` shifts).
        flips: Also include the left-right mirrored query.
        warps: ``(angle_degrees, zoom)`` pairs applied before shifting (see :func:`warp_images`).

    Returns:
        ``(Q, V, (S-2m)**2)`` float32 unit rows,
        ``V = len(warps) * (2 if flips else 1) * (2m+1)**2``.
    """
    return _query_windows_t(query_ncc, max_shift, flips, warps).numpy()


def _query_windows_t(
    query_ncc: np.ndarray,
    max_shift: int,
    flips: bool,
    warps: Sequence[tuple[float, float]],
) -> torch.Tensor:
    """:func:`query_windows` as a torch tensor, built with ``unfold`` (one pass per step, no Python
    loop over shifts); variant order: warp, then mirror, then ``dy``, then ``dx``."""
    s = query_ncc.shape[1]
    m = int(max_shift)
    c = s - 2 * m
    warped = torch.from_numpy(warp_images(query_ncc, warps))  # (Q, W, S, S)
    if flips:
        warped = torch.stack([warped, warped.flip(-1)], dim=2)  # (Q, W, 2, S, S)
    q = warped.shape[0]
    imgs = warped.reshape(-1, 1, s, s)
    win = F.unfold(imgs, kernel_size=c)  # (Q*W*F, c*c, (2m+1)**2), positions row-major (dy, dx)
    win = win.transpose(1, 2).reshape(q, -1, c * c)  # (Q, V, D)
    win = win - win.mean(dim=-1, keepdim=True)
    return win / win.norm(dim=-1, keepdim=True).clamp(min=_EPS)


def shifted_ncc_max(
    query_ncc: np.ndarray,
    ref_windows: np.ndarray,
    candidates: np.ndarray,
    max_shift: int,
    flips: bool = True,
    warps: Sequence[tuple[float, float]] = ((0.0, 1.0),),
    return_argmax: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Max normalized cross-correlation over flips and shifts, for query/candidate pairs.

    Args:
        query_ncc: ``(Q, S, S)`` pixel view of the queries.
        ref_windows: ``(N, D)`` output of :func:`reference_windows`.
        candidates: ``(Q, C)`` int indices into the references (``-1`` = no candidate).
        max_shift: Largest shift searched, in pixels.
        flips: Include mirrored queries.
        warps: ``(angle_degrees, zoom)`` query warps searched too (rotation/crop invariance).
        return_argmax: Also return, per pair, the index of the best query variant (decode it with
            :func:`decode_variant`).

    Returns:
        ``(Q, C)`` float32 similarities in ``[-1, 1]`` (``-inf`` where the candidate is ``-1``);
        with ``return_argmax``, a tuple of those and the ``(Q, C)`` int64 best variant indices. Queries and
        candidates go through fixed-size, padded blocks, so a pair's value does not depend on the rest of
        the call.
    """
    q_count, c_count = candidates.shape
    out = np.full((q_count, c_count), -np.inf, dtype=np.float32)
    arg = np.zeros((q_count, c_count), dtype=np.int64)
    if q_count == 0 or c_count == 0:
        return (out, arg) if return_argmax else out
    s = query_ncc.shape[1]
    m = int(max_shift)
    c = s - 2 * m
    k2 = (2 * m + 1) ** 2
    n_img = len(warps) * (2 if flips else 1)  # query variant images before shifting
    qb, cb = _NCC_QUERY_BLOCK, _NCC_CAND_BLOCK
    refs = torch.from_numpy(_writable(ref_windows))
    for start in range(0, q_count, qb):
        stop = min(start + qb, q_count)
        b = stop - start
        block = np.zeros((qb, s, s), dtype=np.float32)  # padded with flat images (NCC 0, discarded)
        block[:b] = query_ncc[start:stop]
        warped = torch.from_numpy(warp_images(block, warps))  # (qb, W, S, S)
        if flips:
            warped = torch.stack([warped, warped.flip(-1)], dim=2)  # (qb, W, 2, S, S)
        x = warped.reshape(qb, n_img, s, s).transpose(0, 1).contiguous()  # (n_img, qb, S, S)
        xd = x.double()
        box_mean = F.avg_pool2d(xd, c, stride=1)  # (n_img, qb, 2m+1, 2m+1)
        var = (F.avg_pool2d(xd * xd, c, stride=1) - box_mean * box_mean).clamp(min=0.0) * (c * c)
        norm = var.sqrt().float().transpose(0, 1).reshape(qb, n_img * k2, 1)  # variants: warp, mirror, dy, dx
        box_mean = box_mean.float().reshape(n_img, qb, 1, k2)
        cand_rows = np.full((qb, c_count), -1, dtype=np.int64)
        cand_rows[:b] = candidates[start:stop]
        for c0 in range(0, c_count, cb):
            c1 = min(c0 + cb, c_count)
            cand = np.full((qb, cb), -1, dtype=np.int64)
            cand[:, : c1 - c0] = cand_rows[:, c0:c1]
            cand_t = torch.from_numpy(cand)
            kernels = refs[cand_t.clamp(min=0)].reshape(qb * cb, 1, c, c)  # zero-mean, unit-norm windows
            # A reference window r has zero mean and unit norm, so the NCC of a query window w with it
            # is sum(w * r) / ||w - mean(w)||: one grouped correlation gives every shift's numerator (no
            # block of shifted windows is materialised), box sums give the denominators. Every call has
            # the same shapes, so a pair's value does not depend on the other queries or candidates.
            dots = F.conv2d(x, kernels, groups=qb).reshape(n_img, qb, cb, k2)  # sum(w * r) per shift
            r_sum = kernels.reshape(1, qb, cb, 1, c * c).sum(dim=-1)  # (1, qb, cb, 1): zero up to rounding
            dots = (dots - box_mean * r_sum).permute(1, 0, 3, 2).reshape(qb, n_img * k2, cb)
            # a flat window (no contrast: NCC undefined) correlates 0 with everything
            ncc = torch.where(norm >= _FLAT_NORM, dots / norm.clamp(min=_FLAT_NORM), torch.zeros((), dtype=dots.dtype))
            sims, best = ncc.max(dim=1)  # (qb, cb)
            sims = torch.where(cand_t >= 0, sims.clamp(-1.0, 1.0), torch.full_like(sims, -np.inf))
            out[start:stop, c0:c1] = sims[:b, : c1 - c0].numpy()
            arg[start:stop, c0:c1] = best[:b, : c1 - c0].numpy()
    return (out, arg) if return_argmax else out


def decode_variant(
    variant: np.ndarray, max_shift: int, flips: bool, warps: Sequence[tuple[float, float]]
) -> np.ndarray:
    """Query-to-reference alignment of the best variants found by :func:`shifted_ncc_max`.

    Variant ``v`` warped the query by ``(angle a, zoom z)``, possibly mirrored it, and matched its
    window shifted by ``d = (dy, dx)`` to the reference's central window, i.e.
    ``query(p) ~ ref(z R(-a) (p - c) + c - d)`` (for a mirrored variant, against the mirrored
    reference and with ``dx`` negated). This returns that forward alignment in the form used by
    :func:`refine_ncc`.

    Args:
        variant: ``(P,)`` int variant indices.
        max_shift: Shift range used by the search.
        flips: Whether the search included mirrored variants.
        warps: The search's ``(angle_degrees, zoom)`` warps.

    Returns:
        ``(P, 5)`` float64 rows ``(flip, scale, angle_degrees, ty, tx)``; ``flip`` is 0 or 1,
        ``ty, tx`` are in pixels of the NCC view.
    """
    n_shift = 2 * int(max_shift) + 1
    n_flip = 2 if flips else 1
    v = np.asarray(variant, dtype=np.int64)
    dx = v % n_shift - max_shift
    dy = (v // n_shift) % n_shift - max_shift
    flip = (v // (n_shift * n_shift)) % n_flip
    w = v // (n_shift * n_shift * n_flip)
    wa = np.asarray(warps, dtype=np.float64).reshape(-1, 2)
    angle, zoom = wa[w, 0], wa[w, 1]
    dx = np.where(flip == 1, -dx, dx)
    return np.stack([flip.astype(np.float64), zoom, -angle, -dy.astype(np.float64), -dx.astype(np.float64)], 1)


#: Pattern-search rounds of :func:`refine_ncc`: steps of (scale, angle in degrees, shift in pixels).
REFINE_STEPS = ((0.02, 2.0, 0.5), (0.01, 1.0, 0.25), (0.005, 0.5, 0.125))


def _window_grid(size: int, max_shift: int) -> torch.Tensor:
    """``(c*c, 2)`` centred pixel coordinates ``(x, y)`` of the central window (``c = S - 2m``)."""
    m = int(max_shift)
    ctr = (size - 1) / 2.0
    idx = torch.arange(m, size - m, dtype=torch.float32) - ctr
    yy, xx = torch.meshgrid(idx, idx, indexing="ij")
    return torch.stack([xx.reshape(-1), yy.reshape(-1)], 1)


def refine_ncc(
    query_ncc: np.ndarray,
    ref_ncc: np.ndarray,
    query_idx: np.ndarray,
    ref_idx: np.ndarray,
    init: np.ndarray,
    max_shift: int,
    steps: Sequence[tuple[float, float, float]] = REFINE_STEPS,
    chunk: int = 128,
    clip_eps: float = 1e-3,
) -> tuple[np.ndarray, np.ndarray]:
    """Sub-pixel alignment of references onto queries, for a few query/reference pairs.

    The grid search of :func:`shifted_ncc_max` warps the *query* and matches whole-pixel shifts;
    a crop resized back (or a rotation) between grid points then loses correlation twice, to the
    misalignment and to the blur of re-interpolating an interpolated image. Here the *reference*
    (clean) is warped forward instead, ``warped(p) = ref(s R(theta) (p - c) + c + t)`` (bilinear,
    border extended), which is how the copy itself was made, and ``(s, theta, ty, tx)`` is refined
    by a pattern search from ``init``: each round tries every combination of ``-step, 0, +step``
    per parameter (81 alignments) and keeps the best, then the steps shrink (``steps``). The
    correlation is taken over the query's central ``(S - 2m)**2`` window, as in the grid search,
    leaving out the query's clipped pixels (within ``clip_eps`` of 0 or 1): a brightness or contrast
    change that saturates part of a copy destroys those pixels' information, not the rest's. When
    more than half of the window is clipped, every pixel counts.

    Args:
        query_ncc: ``(Q, S, S)`` pixel view of the queries.
        ref_ncc: ``(N, S, S)`` pixel view of the references.
        query_idx: ``(P,)`` query index of each pair.
        ref_idx: ``(P,)`` reference index of each pair.
        init: ``(P, 5)`` starting alignments ``(flip, scale, angle_degrees, ty, tx)``
            (:func:`decode_variant`); ``flip = 1`` mirrors the reference first.
        max_shift: Border excluded from the compared window, in pixels.
        steps: Pattern-search step sizes per round.
        chunk: Pairs processed at once.
        clip_eps: Query pixels at most this far from 0 or 1 count as clipped (negative: none).

    Returns:
        ``(sims, params)``: ``(P,)`` float32 best correlations in ``[-1, 1]`` (never below the
        correlation at ``init``) and ``(P, 5)`` float64 refined alignments.

    Raises:
        ValueError: mismatched pair arrays or an ``init`` that is not ``(P, 5)``.
    """
    qi = np.asarray(query_idx, dtype=np.int64).ravel()
    ri = np.asarray(ref_idx, dtype=np.int64).ravel()
    init = np.asarray(init, dtype=np.float64)
    if len(qi) != len(ri):
        raise ValueError(f"query_idx ({len(qi)}) and ref_idx ({len(ri)}) must have equal lengths")
    if init.shape != (len(qi), 5):
        raise ValueError(f"init must have shape ({len(qi)}, 5), got {init.shape}")
    size = query_ncc.shape[1]
    m = int(max_shift)
    if size - 2 * m < 4:
        raise ValueError(f"max_shift={max_shift} is too large for a {size}-pixel view")
    sims_out = np.full(len(qi), -np.inf, dtype=np.float32)
    params_out = init.copy()
    if len(qi) == 0:
        return sims_out, params_out
    base = _window_grid(size, m)  # (D, 2) centred (x, y)
    half = size / 2.0
    qraw = torch.from_numpy(
        np.ascontiguousarray(query_ncc[:, m : size - m, m : size - m], dtype=np.float32).reshape(len(query_ncc), -1)
    )
    # weights: 1 on unclipped query pixels (all pixels when most are clipped)
    wts = ((qraw > clip_eps) & (qraw < 1.0 - clip_eps)).float()
    wts = torch.where(wts.mean(1, keepdim=True) > 0.5, wts, torch.ones_like(wts))
    qc = wts * (qraw - (wts * qraw).sum(1, keepdim=True) / wts.sum(1, keepdim=True))
    qwin = qc / qc.norm(dim=1, keepdim=True).clamp(min=_EPS)  # weighted-centred unit rows
    deltas = np.array(np.meshgrid(*([[-1.0, 0.0, 1.0]] * 4), indexing="ij")).reshape(4, -1).T  # (81, 4)
    zero = int(np.flatnonzero((deltas == 0).all(1))[0])
    for start in range(0, len(qi), chunk):
        sl = slice(start, min(start + chunk, len(qi)))
        b = sl.stop - sl.start
        refs = torch.from_numpy(np.ascontiguousarray(ref_ncc[ri[sl]], dtype=np.float32))
        flip = torch.from_numpy(init[sl, 0] > 0.5)
        refs = torch.where(flip[:, None, None], refs.flip(-1), refs)[:, None]  # (B, 1, S, S)
        q = qwin[torch.from_numpy(qi[sl])]  # (B, D)
        w = wts[torch.from_numpy(qi[sl])][:, None, :]  # (B, 1, D)
        cur = torch.from_numpy(init[sl, 1:].copy())  # (B, 4) scale, angle, ty, tx
        best = torch.full((b,), -float("inf"), dtype=torch.float64)
        for ds, da, dt in steps:
            trial = cur[:, None, :] + torch.from_numpy(deltas * np.array([ds, da, dt, dt]))[None]  # (B, K, 4)
            k = trial.shape[1]
            s, a = trial[..., 0].float(), torch.deg2rad(trial[..., 1]).float()
            ty, tx = trial[..., 2].float(), trial[..., 3].float()
            cos, sin = s * torch.cos(a), s * torch.sin(a)
            x, y = base[:, 0], base[:, 1]  # (D,)
            # input pixel (centred) = s R (p - c) + t; normalised by S/2 for grid_sample
            gx = (cos[..., None] * x - sin[..., None] * y + tx[..., None]) / half
            gy = (sin[..., None] * x + cos[..., None] * y + ty[..., None]) / half
            grid = torch.stack([gx, gy], -1).reshape(b, k * len(base), 1, 2)
            warped = torch.nn.functional.grid_sample(
                refs, grid, mode="bilinear", padding_mode="border", align_corners=False
            ).reshape(b, k, -1)  # (B, K, D)
            # weighted Pearson correlation (q is weighted-centred, so only the norm of the
            # weighted-centred reference is needed)
            warped = warped - (w * warped).sum(-1, keepdim=True) / w.sum(-1, keepdim=True)
            norm = (w * warped * warped).sum(-1).clamp(min=_EPS * _EPS).sqrt()
            corr = ((warped * q[:, None, :]).sum(-1) / norm).double()  # (B, K)
            val, arg = corr.max(1)
            # keep the current alignment on ties (stable), move only on a strict improvement
            stay = corr[:, zero] >= val
            arg = torch.where(stay, torch.full_like(arg, zero), arg)
            val = torch.where(stay, corr[:, zero], val)
            cur = trial[torch.arange(b), arg]
            best = torch.maximum(best, val)
        sims_out[sl] = best.float().numpy()
        params_out[sl, 1:] = cur.numpy()
    return sims_out, params_out


def phash_bits(images: np.ndarray, flip: bool = False) -> np.ndarray:
    """64-bit perceptual hash (DCT sign against the median) of each image.

    Args:
        images: ``(N, H, W)`` float array in ``[0, 1]``.
        flip: Mirror the images left-right first.

    Returns:
        ``(N, 64)`` uint8 array of bits (0/1).
    """
    v = resize_images(images, 32).astype(np.float64)
    if flip:
        v = v[:, :, ::-1]
    coeffs = dctn(v, axes=(1, 2), norm="ortho")[:, :8, :8].reshape(len(v), -1)
    med = np.median(coeffs[:, 1:], axis=1, keepdims=True)
    return (coeffs > med).astype(np.uint8)


def hash_features(bits: np.ndarray) -> np.ndarray:
    """Map hash bits to ``(N, 64)`` float32 features whose dot product ``d`` gives the similarity
    ``1 - hamming/64 = (d/64 + 1) / 2``; see :func:`hash_similarity_from_dot`."""
    return (bits.astype(np.float32) * 2.0 - 1.0)


def hash_similarity_from_dot(dot: np.ndarray) -> np.ndarray:
    """Convert dot products of :func:`hash_features` rows to similarities in ``[0, 1]``."""
    return ((np.asarray(dot, dtype=np.float32) / HASH_BITS) + 1.0) / 2.0


def estimate_noise_sigma(images: np.ndarray) -> np.ndarray:
    """Standard deviation of additive white noise in each image (Immerkær 1996).

    The image is filtered with the Laplacian-difference kernel ``[[1,-2,1],[-2,4,-2],[1,-2,1]]``,
    which cancels smooth structure, and ``sigma = sqrt(pi/2) * mean|response| / 6``.

    Args:
        images: ``(N, H, W)`` float images (``H, W >= 3``).

    Returns:
        ``(N,)`` float64 noise estimates, in image units.
    """
    x = np.asarray(images, dtype=np.float64)
    k = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], dtype=np.float64)
    resp = np.stack([ndimage.correlate(im, k, mode="nearest")[1:-1, 1:-1] for im in x])
    return np.sqrt(np.pi / 2.0) * np.abs(resp).mean(axis=(1, 2)) / 6.0


def noise_corrected_ncc(ncc: np.ndarray, images: np.ndarray) -> np.ndarray:
    """Correct pixel correlations for the attenuation caused by additive noise in the query.

    With query ``q = x + n`` (noise variance ``sigma^2``), ``corr(q, x) = sqrt(1 - sigma^2 / var(q))``
    at best; dividing by that factor undoes the attenuation (Spearman's correction). Clean images
    have ``sigma`` near 0 and are barely changed.

    Args:
        ncc: ``(N, ...)`` correlations of each query image.
        images: ``(N, H, W)`` the query images.

    Returns:
        ``(N, ...)`` corrected correlations, capped at 1.
    """
    sigma = estimate_noise_sigma(images)
    var = np.asarray(images, dtype=np.float64).reshape(len(images), -1).var(axis=1)
    factor = np.sqrt(np.clip(1.0 - sigma**2 / np.maximum(var, 1e-12), 0.05, 1.0))
    shape = (len(images),) + (1,) * (np.ndim(ncc) - 1)
    return np.minimum(1.0, np.asarray(ncc, dtype=np.float64) / factor.reshape(shape))


def pair_mix_correlation(
    query_feats: np.ndarray,
    ref_feats: np.ndarray,
    first: np.ndarray,
    second: np.ndarray,
) -> np.ndarray:
    """Multiple correlation of each query with the best pair of training images.

    A blend ``a * x_i + b * x_j`` of two training images is a linear combination of them, so its
    multiple correlation with ``{x_i, x_j}`` is 1, while a new image is explained only partly.

    Args:
        query_feats: ``(Q, D)`` centred unit rows (:func:`plain_ncc_features`).
        ref_feats: ``(N, D)`` centred unit rows.
        first: ``(Q, A)`` candidate indices of the main component.
        second: ``(Q, B)`` candidate indices of the second component (searched with residuals).

    Returns:
        ``(Q,)`` float32: max over pairs of ``sqrt(R^2)`` of the least-squares fit of the query on the
        pair (an unshifted pixel correlation when the pair is degenerate).
    """
    q = query_feats[:, None, None, :]
    xi = ref_feats[first][:, :, None, :]  # (Q, A, 1, D)
    xj = ref_feats[second][:, None, :, :]  # (Q, 1, B, D)
    a = (q * xi).sum(-1)
    b = (q * xj).sum(-1)
    g = (xi * xj).sum(-1)  # Gram off-diagonal (diagonals are 1)
    det = 1.0 - g**2
    ok = det > 1e-4
    r2 = np.where(ok, (a**2 + b**2 - 2 * a * b * g) / np.where(ok, det, 1.0), a**2)
    r2 = np.clip(r2, 0.0, 1.0)
    return np.sqrt(r2.reshape(len(q), -1).max(axis=1)).astype(np.float32)


def residual_features(query_feats: np.ndarray, ref_feats: np.ndarray, first: np.ndarray) -> np.ndarray:
    """Unit residual of each query after removing its projection on its nearest reference.

    Args:
        query_feats: ``(Q, D)`` centred unit rows.
        ref_feats: ``(N, D)`` centred unit rows.
        first: ``(Q,)`` index of each query's nearest reference.

    Returns:
        ``(Q, D)`` float32 unit rows (zero where the query equals its reference).
    """
    x = ref_feats[first]
    r = query_feats - (query_feats * x).sum(1, keepdims=True) * x
    n = np.linalg.norm(r, axis=1, keepdims=True)
    return (r / np.maximum(n, _EPS)).astype(np.float32)
