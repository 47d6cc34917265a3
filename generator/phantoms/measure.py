"""Classical measurements on a frontal chest radiograph: does the image show what its prompt asked for?

Used to show that text controls the image (issue 6): run :func:`measure` on generated samples and
:func:`matches_prompt` against the prompt's attributes, then report per finding the share of images
that show it. It works on any ``float (H, W)`` image in ``[0, 1]`` (MONOCHROME2, patient right on the
image left), phantoms or model samples, at 64 or 128 px (any size >= 32), and uses only smoothing,
thresholds, connected components, row/column profiles and a Hessian blob filter, so it tolerates the
noise and small geometric errors of a generated sample.

Steps of :func:`measure`:

1. Smooth, find the lungs: Otsu threshold inside the body, dark components not touching the image
   border, grouped by side of the body's midline (a pneumothorax's pleural line may split one lung),
   closed and hole-filled.
2. Thorax width: the widest lateral extents of the two lungs from the midline (inner rib margins,
   sub-pixel half-level crossings); when one hemithorax is much narrower (large effusion), twice the
   wider one. Heart width (MRD + MLD): per side, the widest medial lung border from the hilum down to
   the cardiophrenic angle (found scanning up from the base, where the border stops climbing the
   hemidiaphragm and becomes near-vertical). CTR = heart / thorax.
3. Pleural effusion: the costophrenic angle of each lung (lowest lung row in the lateral 30% of the
   hemithorax); a side is called when its angle sits clearly higher than the other side's (blunted
   angle, meniscus, whited-out base). Bilateral symmetric effusions are not detected.
4. Nodule: the strongest bright blob (both Hessian eigenvalues negative, scale-normalised, sigma 1-2.8
   px at 64 px) inside the lung fields (each closed with a disk, so an edge nodule counts), divided
   by the lung/soft-tissue contrast. Its size: the sigma of the strongest scale-normalised response
   at that blob on a dense sigma set (0.75-3.5 px at 64 px, step 0.125, parabolic peak), turned into a
   diameter (see :data:`NODULE_DIAMETER_PER_SIGMA`).
5. Pneumothorax: the darkest decile of the lateral lung zones of one side clearly darker than the
   other side's (the pleural space is air without lung markings).
6. Consolidation: one lung's aerated area clearly smaller than the other's (after allowing for the
   heart on the left); an effusion or a large heart can trigger it too.

Thresholds were set on rendered phantoms (:mod:`generator.phantoms`); the agreement numbers are in the
tests and the README.

Sizes and sides against a prompt (issue 12), on top of :func:`matches_prompt`:
:func:`side_swapped` (the finding drawn on the other side), :func:`nodule_diameter_mm` /
:func:`nodule_size_error_mm` (pixels to mm through the measured thorax width and
:data:`THORAX_WIDTH_MM`), :func:`effusion_grade` / :func:`effusion_grade_mismatch` (small / moderate /
large from the costophrenic-angle rise). How well they separate sizes on phantoms (60 per size, random
sex and age, seeds disjoint from the calibration): at 64 px nodules of 14 / 20 / 30 mm measure
14.0 +- 2.2 / 20.1 +- 1.7 / 28.7 +- 3.0 mm (mean +- SD; mean absolute error 1.9 / 1.4 / 2.6 mm); cut
half-way, 12% of the 14 mm nodules read as 20 mm and 2% the other way, 7% of the 30 mm ones read as
20 mm and none the other way, so 14 and 20 mm are told apart on most images but not all. At 128 px:
13.6 +- 1.4 / 19.4 +- 1.6 / 28.7 +- 2.4 mm. Below about 12 mm (2 px at 64 px) the size is not resolved
(the smallest sigma searched sets a floor). The px-to-mm ruler assumes an adult thorax
(:data:`THORAX_WIDTH_MM`); a child's or an unusually wide chest biases the mm by its width ratio.
Effusion grades were right on all 360 phantoms (small / moderate / large, 64 and 128 px; scores
1.2-1.9 / 3.5-4.2 / 6.4-7.4).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
from scipy import ndimage

from conditioning.prompts import normalize_findings

#: Decision thresholds (set on phantoms; see module docstring).
CTR_THRESHOLD = 0.5
EFFUSION_CP_RISE = 0.07  # costophrenic angle rise vs the other side, fraction of lung height
NODULE_THRESHOLD = 0.12
PNEUMOTHORAX_THRESHOLD = 0.12
CONSOLIDATION_AREA_RATIO = 0.85
#: Effusion grade from ``effusion_score`` (multiples of :data:`EFFUSION_CP_RISE`): ``small`` below the
#: first bound, ``moderate`` up to the second, ``large`` above. Midway between the score ranges of the
#: phantoms' grades at 64 and 128 px (small 1.2-1.9, moderate 3.5-4.2, large 6.4-7.4).
EFFUSION_GRADE_BOUNDS = (2.7, 5.3)
#: Nodule diameter from the blob scale ``sigma`` (px) of the strongest response:
#: ``d = NODULE_DIAMETER_PER_SIGMA * sigma + NODULE_DIAMETER_OFFSET_PX * H / 64``. A flat disk without
#: blur would give ``d = 2 * sqrt(2) * sigma``; the phantoms' nodules are spheres (brighter in the
#: middle) seen through the detector blur, and a least-squares fit on phantoms (14-34 mm, 64 and 128
#: px, ground-truth diameters) gives these values.
NODULE_DIAMETER_PER_SIGMA = 3.59
NODULE_DIAMETER_OFFSET_PX = -0.65
#: Inner thorax width in mm used to turn pixels into mm (the measurement sees no scale): adult
#: phantoms are drawn ~300 mm wide (men) and ~270 mm (women) in :mod:`generator.phantoms.render`.
THORAX_WIDTH_MM = 285.0
#: Blob scales searched for the nodule's size, in px at 64 px (times ``H / 64``).
_NODULE_SIGMAS = np.arange(0.75, 3.5 + 1e-9, 0.125)

_MIN_SIZE = 32


@dataclass
class Measurement:
    """What :func:`measure` found on one image.

    Sides are the patient's (``"right"`` = image left). Pixel coordinates are ``(row, col)``.

    Attributes:
        valid: Both lungs were found; otherwise all findings are ``False`` and ``ctr`` is ``nan``.
        ctr: Cardiothoracic ratio (``nan`` when not measurable).
        heart_width_px: Widest heart diameter in pixels.
        thorax_width_px: Widest inner thoracic diameter in pixels.
        cardiomegaly: ``ctr > 0.5``.
        effusion: Per side, whether a pleural effusion is shown.
        effusion_score: Per side, how far its costophrenic angle sits above the other side's, as a
            multiple of the threshold (>= 1 means called; a fraction 0.07 of the lung height).
        nodule: A focal round opacity was found in a lung field.
        nodule_score: Blob strength relative to lung contrast.
        nodule_center_px: ``(row, col)`` of the strongest blob, or ``None``.
        nodule_side: Patient side of that blob, or ``None``.
        nodule_sigma_px: Gaussian scale in pixels at which that blob responds most (``nan`` without
            a nodule).
        nodule_diameter_px: Diameter estimated from it (``nan`` without a nodule); see
            :data:`NODULE_DIAMETER_PER_SIGMA`, and :func:`nodule_diameter_mm` for mm.
        pneumothorax: Per side, whether a pneumothorax is shown.
        pneumothorax_score: Per side, how much darker its lateral lung zones' darkest decile is than the
            other side's, relative to lung/soft-tissue contrast.
        consolidation: Per side, whether a lobar opacity is shown.
        lung_area_ratio: Per side, aerated lung area over the other side's.
        lung_mask: ``bool (H, W)`` of the lungs found (holes filled).
    """

    valid: bool
    ctr: float = float("nan")
    heart_width_px: float = float("nan")
    thorax_width_px: float = float("nan")
    cardiomegaly: bool = False
    effusion: dict[str, bool] = field(default_factory=lambda: {"right": False, "left": False})
    effusion_score: dict[str, float] = field(default_factory=lambda: {"right": 0.0, "left": 0.0})
    nodule: bool = False
    nodule_score: float = 0.0
    nodule_center_px: tuple[float, float] | None = None
    nodule_side: str | None = None
    nodule_sigma_px: float = float("nan")
    nodule_diameter_px: float = float("nan")
    pneumothorax: dict[str, bool] = field(default_factory=lambda: {"right": False, "left": False})
    pneumothorax_score: dict[str, float] = field(default_factory=lambda: {"right": 0.0, "left": 0.0})
    consolidation: dict[str, bool] = field(default_factory=lambda: {"right": False, "left": False})
    lung_area_ratio: dict[str, float] = field(default_factory=lambda: {"right": 1.0, "left": 1.0})
    lung_mask: np.ndarray | None = field(default=None, repr=False)

    def findings_shown(self) -> list[str]:
        """Canonical names of the findings shown (``[]`` for a normal-looking image)."""
        out = []
        if self.cardiomegaly:
            out.append("cardiomegaly")
        if any(self.effusion.values()):
            out.append("pleural effusion")
        if self.nodule:
            out.append("nodule")
        if any(self.pneumothorax.values()):
            out.append("pneumothorax")
        if any(self.consolidation.values()):
            out.append("consolidation")
        return out


def _otsu(values: np.ndarray) -> float:
    hist, edges = np.histogram(values, bins=128, range=(0.0, 1.0))
    p = hist.astype(np.float64) / max(hist.sum(), 1)
    w0 = np.cumsum(p)
    mu = np.cumsum(p * (edges[:-1] + edges[1:]) / 2)
    w1 = 1.0 - w0
    between = (mu[-1] * w0 - mu) ** 2 / np.maximum(w0 * w1, 1e-12)
    return float(edges[int(np.argmax(between)) + 1])


def _check_image(image: Any) -> np.ndarray:
    arr = np.asarray(image, dtype=np.float32)
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim == 3 and arr.shape[-1] in (1, 3):
        arr = arr.mean(axis=-1)
    if arr.ndim != 2:
        raise ValueError(f"image must be 2D (H, W), got shape {np.shape(image)}")
    if min(arr.shape) < _MIN_SIZE:
        raise ValueError(f"image must be at least {_MIN_SIZE} px on each side, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError("image contains NaN or infinite values")
    return np.clip(arr, 0.0, 1.0)


def _blob_response(img: np.ndarray, sigma: float) -> np.ndarray:
    """Scale-normalised bright-blob strength: ``-sigma^2 * lambda_max`` where both eigenvalues < 0."""
    hxx = ndimage.gaussian_filter(img, sigma, order=(0, 2))
    hyy = ndimage.gaussian_filter(img, sigma, order=(2, 0))
    hxy = ndimage.gaussian_filter(img, sigma, order=(1, 1))
    tr = hxx + hyy
    disc = np.sqrt(((hxx - hyy) / 2) ** 2 + hxy**2)
    lam_max = tr / 2 + disc
    return np.clip(-lam_max, 0.0, None) * sigma**2


def _blob_scale(img: np.ndarray, row: int, col: int, scale: float) -> float:
    """Gaussian scale (px) at which the blob at ``(row, col)`` responds most.

    :func:`_blob_response` on a crop around the blob (wide enough that the filters see what they see on
    the whole image: the values equal the whole-image ones), its maximum over the 3 x 3 pixels at the blob,
    for sigmas :data:`_NODULE_SIGMAS` ``* scale``; the best one is refined with a parabola through it and
    its neighbours.

    Args:
        img: ``float (H, W)`` image.
        row, col: Pixel of the blob.
        scale: ``H / 64``.

    Returns:
        Sigma in pixels, within the searched range.
    """
    sigmas = _NODULE_SIGMAS * scale
    reach = int(4.0 * sigmas[-1] + 0.5) + 2  # the widest filter's radius, plus the 3 x 3 neighbourhood
    r0, c0 = max(0, row - reach), max(0, col - reach)
    crop = img[r0 : row + reach + 1, c0 : col + reach + 1].astype(np.float64)
    r, c = row - r0, col - c0
    resp = np.array([float(_blob_response(crop, float(sig))[max(0, r - 1) : r + 2, max(0, c - 1) : c + 2].max())
                     for sig in sigmas])
    k = int(np.argmax(resp))
    best = float(sigmas[k])
    if 0 < k < len(sigmas) - 1:
        a, b, d = resp[k - 1], resp[k], resp[k + 1]
        den = a - 2 * b + d
        if den < 0:
            best += float(np.clip(0.5 * (a - d) / den, -0.5, 0.5)) * float(sigmas[1] - sigmas[0])
    return best


def _lateral_run(row: np.ndarray, lateral_end: str) -> float | None:
    """Medial end of the run of lung pixels that starts at the lung's lateral-most pixel."""
    idx = np.flatnonzero(row)
    if not len(idx):
        return None
    if lateral_end == "low":
        breaks = np.flatnonzero(np.diff(idx) > 1)
        return float(idx[breaks[0]] if len(breaks) else idx[-1])
    breaks = np.flatnonzero(np.diff(idx) > 1)
    return float(idx[breaks[-1] + 1] if len(breaks) else idx[0])


def _edge(profile: np.ndarray, last: float, step: float) -> float:
    """Sub-pixel border position along a row: where ``profile`` crosses half way from the lung value
    at ``last`` (the last lung pixel) to the tissue value beyond it, walking ``step`` (+1 or -1).

    Returns the column of the border (a half-integer for a sharp edge between two pixels).
    """
    c = int(last)
    w = len(profile)
    lung_v = float(profile[c])
    ahead = [profile[c + k * int(step)] for k in range(1, 4) if 0 <= c + k * int(step) < w]
    if not ahead:
        return c + 0.5 * step
    tissue_v = float(max(ahead))
    half = 0.5 * (lung_v + tissue_v)
    prev_v = lung_v
    for k, v in enumerate(ahead, start=1):
        if v >= half:
            frac = (half - prev_v) / max(v - prev_v, 1e-6)
            return c + (k - 1 + frac) * step
        prev_v = v
    return c + 0.5 * step


def measure(image: np.ndarray) -> Measurement:
    """Measure CTR, effusion sides, nodule, pneumothorax and consolidation on a frontal radiograph.

    Args:
        image: ``float (H, W)`` in ``[0, 1]``, MONOCHROME2 (bright = dense), patient right on the image
            left; ``(1, H, W)`` and ``(H, W, 1|3)`` are accepted too. ``H, W >= 32``.

    Returns:
        A :class:`Measurement`; ``valid`` is ``False`` when two lungs could not be found.

    Raises:
        ValueError: wrong shape, too small, or non-finite values.
    """
    img = _check_image(image)
    h, w = img.shape
    scale = h / 64.0
    s = ndimage.gaussian_filter(img, 0.7 * scale)

    # 1. body and lungs
    body = s > 0.5 * _otsu(s.ravel())
    body = ndimage.binary_fill_holes(body)
    if body.sum() < 0.2 * h * w:
        return Measurement(valid=False)
    rows_b = np.flatnonzero(body.any(axis=1))
    body_vals = s[body & (np.arange(h)[:, None] < rows_b[0] + 0.85 * (rows_b[-1] - rows_b[0]))]
    t = _otsu(body_vals)
    # dark inside the body, away from the skin edge (thin soft tissue there is dark too)
    outside = ndimage.binary_dilation(~body, iterations=max(1, int(round(3 * scale))))
    dark = (s < t) & body & ~outside
    dark = ndimage.binary_opening(dark, iterations=1)
    labels, n = ndimage.label(dark)
    if n == 0:
        return Measurement(valid=False)
    border = set(np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])).tolist())
    cols = np.flatnonzero(body[int(rows_b[0] + 0.5 * (rows_b[-1] - rows_b[0]))])
    mid = 0.5 * (cols[0] + cols[-1]) if len(cols) else w / 2
    areas = ndimage.sum(np.ones_like(s), labels, index=np.arange(1, n + 1))
    centers = ndimage.center_of_mass(np.ones_like(s), labels, index=np.arange(1, n + 1))
    # each lung: the dark components on its side (a pneumothorax's pleural line splits one in two)
    members: dict[str, list[int]] = {"right": [], "left": []}
    for k in range(1, n + 1):
        if k in border or areas[k - 1] < 0.004 * h * w:
            continue
        members["right" if centers[k - 1][1] < mid else "left"].append(k)
    lung = {}
    for side, ks in members.items():
        if not ks or max(areas[k - 1] for k in ks) < 0.01 * h * w:
            return Measurement(valid=False)
        m = np.isin(labels, ks)
        m = ndimage.binary_closing(m, iterations=max(1, int(round(scale))))
        lung[side] = ndimage.binary_fill_holes(m)
    lung_mask = lung["right"] | lung["left"]
    lrows = np.flatnonzero(lung_mask.any(axis=1))
    top, bottom = int(lrows[0]), int(lrows[-1])
    lung_h = max(bottom - top, 1)
    soft = float(np.median(s[body & ~lung_mask & (np.arange(h)[:, None] > bottom)])) if bottom < h - 2 else t + 0.2
    lung_level = float(np.median(s[lung_mask]))
    contrast = max(soft - lung_level, 0.1)

    # 2. thorax width and heart width
    colidx = np.arange(w)
    lat_edge: dict[str, float] = {}
    for side, m in lung.items():
        sgn = -1.0 if side == "right" else 1.0
        best_e = 0.0
        for r in np.flatnonzero(m.any(axis=1)):
            cols_r = np.flatnonzero(m[r])
            c = cols_r.min() if side == "right" else cols_r.max()
            best_e = max(best_e, sgn * (_edge(s[r], float(c), sgn) - mid))
        lat_edge[side] = best_e
    hr, hl = lat_edge["right"], lat_edge["left"]
    thorax = hr + hl
    if abs(hr - hl) > 0.15 * thorax:
        thorax = 2 * max(hr, hl)
    # heart borders: medial lung edges from the hila down to the cardiophrenic angles, where the
    # edge jumps laterally (below it only the costophrenic recess is aerated)
    # heart borders (MRD + MLD): per side, the medial edge of the lung's lateral run from the hila
    # down to the cardiophrenic angle. Scanning up from the lung base, the edge first climbs the
    # hemidiaphragm (moves medially fast) and then follows the near-vertical heart border.
    closed = {
        side: ndimage.binary_closing(m, structure=np.ones((1, max(3, int(round(3 * scale))))))
        for side, m in lung.items()
    }
    steep = 1.0  # border slope (columns per row) below which it counts as the heart border
    extent: dict[str, float] = {}
    for side, m in closed.items():
        rows = [r for r in range(top + int(0.4 * lung_h), h) if m[r].any()]
        if len(rows) < 4:
            return Measurement(valid=False, lung_mask=lung_mask)
        end = "low" if side == "right" else "high"
        sgn = -1.0 if side == "right" else 1.0
        e = np.array([sgn * (_edge(s[r], _lateral_run(m[r], lateral_end=end), -sgn) - mid) for r in rows])
        k = max(1, int(round(scale)))
        e = ndimage.median_filter(e, size=4 * k + 1, mode="nearest")
        stop = len(e) - 1
        for i in range(len(e) - 1, 3 * k - 1, -1):
            if all(abs(e[i - j * k] - e[i - (j + 1) * k]) <= steep * k for j in range(3)):
                stop = i
                break
        extent[side] = float(e[: stop + 1].max())
    heart = max(extent["right"] + extent["left"], 0.0)
    ctr = heart / thorax

    # 3. pleural effusion: a costophrenic angle clearly higher than the other side's (blunted angle,
    # fluid climbing the lateral wall). Compared side to side, so inspiration depth cancels out.
    cp: dict[str, float] = {}
    for side, m in lung.items():
        lateral = (colidx < mid - 0.7 * hr) if side == "right" else (colidx > mid + 0.7 * hl)
        rows_cp = np.flatnonzero((m & lateral[None, :]).any(axis=1))
        cp[side] = float(rows_cp.max()) if len(rows_cp) else float(top)
    eff_score = {
        side: float((cp[other] - cp[side]) / lung_h / EFFUSION_CP_RISE)
        for side, other in (("right", "left"), ("left", "right"))
    }
    effusion = {side: eff_score[side] >= 1.0 for side in eff_score}

    # 4. nodule: strongest bright blob inside the eroded lungs
    # close each lung with a disk first, so that a nodule at the lung edge (a bay, not a hole) counts
    rad = max(2, int(round(3 * scale)))
    disk = np.hypot(*np.mgrid[-rad : rad + 1, -rad : rad + 1]) <= rad
    field_mask = np.zeros_like(lung_mask)
    for m in lung.values():
        padded = np.pad(m, rad + 1)
        closed_m = ndimage.binary_closing(padded, structure=disk)[rad + 1 : -rad - 1, rad + 1 : -rad - 1]
        field_mask |= ndimage.binary_fill_holes(closed_m)
    inner = ndimage.binary_erosion(field_mask, iterations=max(1, int(round(1.5 * scale))))
    resp = np.zeros_like(img)
    for sig in (1.0, 1.5, 2.1, 2.8):
        resp = np.maximum(resp, _blob_response(img, sig * scale))
    resp = np.where(inner, resp, 0.0)
    k = int(np.argmax(resp))
    nod_score = float(resp.flat[k] / contrast)
    nodule = nod_score >= NODULE_THRESHOLD
    nrow, ncol = divmod(k, w)
    nod_sigma = nod_diam = float("nan")
    if nodule:
        nod_sigma = _blob_scale(img, nrow, ncol, scale)
        nod_diam = max(NODULE_DIAMETER_PER_SIGMA * nod_sigma + NODULE_DIAMETER_OFFSET_PX * scale, 0.0)

    # 5. pneumothorax: darker peripheral band than the same band on the other side
    # the pleural space is the darkest air in the chest: compare the darkest decile of each lung
    # lateral half of each hemithorax above the bases: away from the heart, where both lungs compare
    upper = (np.arange(h)[:, None] < top + 0.75 * lung_h) & (np.abs(colidx - mid) > 0.5 * (hr + hl) / 2)[None, :]
    dark_level = {side: float(np.percentile(s[m & upper], 10)) if (m & upper).any() else lung_level
                  for side, m in lung.items()}
    ptx_score = {
        side: float((dark_level[other] - dark_level[side]) / contrast)
        for side, other in (("right", "left"), ("left", "right"))
    }
    pneumothorax = {side: ptx_score[side] >= PNEUMOTHORAX_THRESHOLD for side in ptx_score}

    # 6. consolidation: one lung's aerated area much smaller than the other's (not an effusion)
    area = {side: float(m.sum()) for side, m in lung.items()}
    # the heart takes room from the left lung: compare with the expected left/right area ratio,
    # ~0.85 for a normal heart and less for a large one
    left_right = float(np.clip(0.85 - 0.8 * (ctr - 0.42), 0.6, 0.9))
    expect = {"right": 1.0 / left_right, "left": left_right}
    ratio = {
        side: area[side] / max(area[other], 1.0) / expect[side]
        for side, other in (("right", "left"), ("left", "right"))
    }
    consolidation = {side: bool(ratio[side] < CONSOLIDATION_AREA_RATIO) for side in ratio}

    return Measurement(
        valid=True,
        ctr=float(ctr),
        heart_width_px=heart,
        thorax_width_px=float(thorax),
        cardiomegaly=bool(ctr > CTR_THRESHOLD),
        effusion=effusion,
        effusion_score=eff_score,
        nodule=bool(nodule),
        nodule_score=nod_score,
        nodule_center_px=(float(nrow), float(ncol)) if nodule else None,
        nodule_side=("right" if ncol < mid else "left") if nodule else None,
        nodule_sigma_px=nod_sigma,
        nodule_diameter_px=nod_diam,
        pneumothorax=pneumothorax,
        pneumothorax_score=ptx_score,
        consolidation=consolidation,
        lung_area_ratio=ratio,
        lung_mask=lung_mask,
    )


def _side_of(location: Any) -> str | None:
    if location is None:
        return None
    loc = str(location).strip().lower()
    if loc.startswith("right"):
        return "right"
    if loc.startswith("left"):
        return "left"
    return None


def matches_prompt(measurement: Measurement, attributes: Mapping[str, Any]) -> dict[str, bool]:
    """Per requested finding, whether the measured image shows it.

    Keys are canonical finding names (``"cardiomegaly"``, ``"pleural effusion"``, ``"nodule"``,
    ``"pneumothorax"``, ``"consolidation"``); a normal request (no findings) gives
    ``{"normal": <no finding shown>}``. Where the finding names a side or lobe, the measured side must
    agree (a nodule requested in the right upper lobe must be found in the right lung). Findings the
    measurement cannot see (e.g. ``"pneumonia"``) are left out. An invalid measurement (lungs not
    found) matches nothing. Known blind spot: a moderate or large left effusion hides the left heart
    border (silhouette sign), so cardiomegaly requested together with it is usually not confirmed.

    Args:
        measurement: From :func:`measure`.
        attributes: The prompt's attributes (``findings`` as in :func:`conditioning.prompts.build_prompt`).

    Returns:
        ``{finding name: shown}``.
    """
    m = measurement
    findings = normalize_findings(attributes.get("findings"))
    if not findings:
        return {"normal": bool(m.valid and not m.findings_shown())}
    out: dict[str, bool] = {}
    for f in findings:
        name = f["name"]
        side = _side_of(f.get("location"))
        if name == "cardiomegaly":
            ok = m.cardiomegaly
        elif name == "pleural effusion":
            ok = m.effusion[side] if side else any(m.effusion.values())
        elif name == "nodule":
            ok = m.nodule and (side is None or m.nodule_side == side)
        elif name == "pneumothorax":
            ok = m.pneumothorax[side] if side else any(m.pneumothorax.values())
        elif name == "consolidation":
            ok = m.consolidation[side] if side else any(m.consolidation.values())
        else:
            continue
        out[name] = bool(m.valid and ok)
    return out


def _sided_findings(attributes: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(canonical name, patient side)`` of the requested findings that name a side or a lobe and that
    the measurement can localise."""
    out = []
    for f in normalize_findings(attributes.get("findings")):
        side = _side_of(f.get("location"))
        if side and f["name"] in ("pleural effusion", "nodule", "pneumothorax", "consolidation"):
            out.append((f["name"], side))
    return out


def side_swapped(measurement: Measurement, attributes: Mapping[str, Any]) -> bool | None:
    """Whether a finding asked on one side was measured on the *other* side only.

    For each requested finding with a side (``location`` ``"left"``/``"right"`` or a lobe): a nodule
    counts as swapped when the nodule found lies on the other side (:attr:`Measurement.nodule_side`);
    an effusion, pneumothorax or consolidation when the measurement calls it on the other side and not
    on the asked one. An image that shows the finding on both sides, or on neither, is not swapped
    (that is a miss, counted by :func:`matches_prompt`). An invalid measurement swaps nothing.

    Args:
        measurement: From :func:`measure`.
        attributes: The prompt's attributes (``findings`` as in :func:`conditioning.prompts.build_prompt`).

    Returns:
        ``True`` if any sided finding was swapped, ``False`` if none was, ``None`` when the prompt asks
        for no finding with a side (normal, cardiomegaly, an effusion without side, ...).
    """
    sided = _sided_findings(attributes)
    if not sided:
        return None
    m = measurement
    if not m.valid:
        return False
    for name, side in sided:
        other = "left" if side == "right" else "right"
        if name == "nodule":
            swapped = m.nodule and m.nodule_side == other
        else:
            shown = {"pleural effusion": m.effusion, "pneumothorax": m.pneumothorax,
                     "consolidation": m.consolidation}[name]
            swapped = shown[other] and not shown[side]
        if swapped:
            return True
    return False


def nodule_diameter_mm(measurement: Measurement, thorax_width_mm: float = THORAX_WIDTH_MM) -> float:
    """Diameter of the nodule found, in mm: :attr:`Measurement.nodule_diameter_px` scaled by
    ``thorax_width_mm / thorax_width_px`` (the image carries no pixel spacing, so the thorax is the
    ruler; :data:`THORAX_WIDTH_MM` is the phantoms' adult mean).

    Returns:
        The diameter, or ``nan`` when no nodule was found or the measurement is invalid.

    Raises:
        ValueError: ``thorax_width_mm`` not positive.
    """
    if not thorax_width_mm > 0:
        raise ValueError(f"thorax_width_mm must be > 0, got {thorax_width_mm!r}")
    m = measurement
    if not (m.valid and m.nodule and np.isfinite(m.nodule_diameter_px) and m.thorax_width_px > 0):
        return float("nan")
    return float(m.nodule_diameter_px * thorax_width_mm / m.thorax_width_px)


def effusion_grade(measurement: Measurement, side: str) -> str | None:
    """Grade (``"small"``, ``"moderate"``, ``"large"``) of the effusion measured on the patient's
    ``side``, from its costophrenic-angle rise (:attr:`Measurement.effusion_score`, bounds
    :data:`EFFUSION_GRADE_BOUNDS`); ``None`` when no effusion is called on that side.

    Raises:
        ValueError: ``side`` not ``"left"`` or ``"right"``.
    """
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    m = measurement
    if not (m.valid and m.effusion[side]):
        return None
    score = m.effusion_score[side]
    lo, hi = EFFUSION_GRADE_BOUNDS
    return "small" if score < lo else "moderate" if score < hi else "large"


def nodule_size_error_mm(
    measurement: Measurement, attributes: Mapping[str, Any], thorax_width_mm: float = THORAX_WIDTH_MM
) -> float | None:
    """Absolute error in mm of the measured nodule diameter against the requested ``size_mm``.

    Defined only where it means something: the prompt asks for a nodule with a ``size_mm`` and the
    image shows it (on the asked side, as :func:`matches_prompt` decides); otherwise ``None``, so that a
    mean over images is the size error *of the nodules shown*, apart from the detection rate.

    Raises:
        ValueError: ``size_mm`` not a number, or ``thorax_width_mm`` not positive.
    """
    nodules = [f for f in normalize_findings(attributes.get("findings")) if f["name"] == "nodule"]
    if not nodules or nodules[0].get("size_mm") is None:
        return None
    try:
        asked = float(nodules[0]["size_mm"])
    except (TypeError, ValueError):
        raise ValueError(f"nodule size_mm must be a number of mm, got {nodules[0]['size_mm']!r}") from None
    if not matches_prompt(measurement, {"findings": [nodules[0]]}).get("nodule", False):
        return None
    return abs(nodule_diameter_mm(measurement, thorax_width_mm) - asked)


def effusion_grade_mismatch(measurement: Measurement, attributes: Mapping[str, Any]) -> bool | None:
    """Whether the measured grade of a requested, sided effusion differs from the requested ``size``.

    ``None`` unless the prompt asks for a pleural effusion with a side and a ``size`` and the image
    shows it on that side (as for :func:`nodule_size_error_mm`, misses are not size errors).
    """
    for f in normalize_findings(attributes.get("findings")):
        side = _side_of(f.get("location"))
        if f["name"] != "pleural effusion" or side is None or f.get("size") is None:
            continue
        grade = effusion_grade(measurement, side)
        if grade is None:
            return None
        return grade != str(f["size"]).strip().lower()
    return None


def prompt_shown(measurement: Measurement, attributes: Mapping[str, Any]) -> bool:
    """Whether the image shows every finding its prompt asked for (side included; a normal prompt:
    no finding), by :func:`matches_prompt`; a prompt with no measurable finding is not shown."""
    ok = matches_prompt(measurement, attributes)
    return bool(ok) and all(ok.values())


def text_control_summary(lines: Sequence[Mapping[str, Any]], images: Sequence[np.ndarray]) -> dict[str, dict[str, int]]:
    """Per prompt text: how many images show what their prompt asked for (side included).

    Args:
        lines: Manifest lines of the images (``text`` and ``attributes``, as ``generate`` writes them).
        images: The images, ``(H, W)`` float in ``[0, 1]``, in the order of ``lines``.

    Returns:
        ``{text: {"n": images, "shown": images where every requested finding was measured,
        "swapped": images where a finding asked on one side was measured on the other side only}}``
        (``swapped`` only for prompts whose findings name a side or lobe; see :func:`side_swapped`).
    """
    if len(lines) != len(images):
        raise ValueError(f"lines and images must pair up, got {len(lines)} lines and {len(images)} images")
    out: dict[str, dict[str, int]] = {}
    for ln, img in zip(lines, images):
        m, attributes = measure(img), ln.get("attributes") or {}
        rec = out.setdefault(str(ln["text"]), {"n": 0, "shown": 0})
        rec["n"] += 1
        rec["shown"] += int(prompt_shown(m, attributes))
        swapped = side_swapped(m, attributes)
        if swapped is not None:
            rec["swapped"] = rec.get("swapped", 0) + int(swapped)
    return out
