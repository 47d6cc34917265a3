"""Procedural frontal chest radiograph phantoms with report text (demo and test data, issue 6).

A phantom is drawn from a seed: body outline (soft tissue), two lungs with vascular markings that taper
towards the periphery, heart, mediastinum with trachea and aortic knob, spine, posterior and anterior
ribs, clavicles, humeral heads, diaphragm domes and, for adult women, breast shadows. Proportions depend
on sex and age (thorax width and height, heart size, pediatric proportions and thymus). Findings are the
ones a radiologist names on a frontal film:

- ``cardiomegaly``: cardiothoracic ratio (CTR) 0.56-0.66 (normal hearts are drawn at 0.40-0.48);
- ``pleural effusion`` (``location`` left/right, ``size`` small/moderate/large): dependent fluid that
  blunts the costophrenic angle, rises laterally as a meniscus and hides the hemidiaphragm;
- ``nodule`` (``location`` one of :data:`LOBES`, ``size_mm``): a round soft-tissue opacity, its size
  in real millimetres through :attr:`PhantomImage.pixel_spacing_mm`;
- ``pneumothorax`` (``location`` left/right, ``size``): a visible visceral pleural line, the lung
  collapsed towards the hilum, no lung markings lateral to the line;
- ``consolidation`` (``location`` a lobe): airspace opacity filling the lobe, bounded by fissures, with
  the silhouette sign on the heart border or diaphragm where anatomy says so.

Coordinate frame: images are displayed as a standard PA film, **patient right on the image left**;
"left" in a finding means the patient's left, i.e. the image's right half. Internally geometry lives on
normalised coordinates ``x, y`` in ``[-1, 1]`` (x left to right on the image, y top to bottom), one pixel
being ``2 / size`` in both directions.

Rendering is X-ray like: the structures add attenuation (a line-integral proxy ``A``), the detector
sees ``exp(-A)`` and the image is shown MONOCHROME2, ``1 - exp(-k A)`` normalised, so dense is bright.
Mild blur and noise follow. Everything is vectorised numpy; a 128 px phantom takes a few milliseconds.

Findings are deliberately a little more conspicuous than on real films (nodules 14-30 mm, strong
contrast), so that they stay visible at 64 px, the resolution the bundled demo model is trained at.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
from scipy import ndimage

from conditioning.prompts import normalize_findings, normalize_sex

#: Lobes a nodule or consolidation can be placed in (frontal projection; the lingula is part of the
#: left upper lobe).
LOBES: tuple[str, ...] = (
    "right upper lobe",
    "right middle lobe",
    "right lower lobe",
    "left upper lobe",
    "left lower lobe",
)
#: Findings the phantom can draw (canonical names of :data:`conditioning.prompts.FINDING_SYNONYMS`).
PHANTOM_FINDINGS: tuple[str, ...] = (
    "cardiomegaly",
    "pleural effusion",
    "nodule",
    "pneumothorax",
    "consolidation",
)
SIDES: tuple[str, ...] = ("right", "left")
SIZES: tuple[str, ...] = ("small", "moderate", "large")
#: Nodule size range in mm (exaggerated lower bound so that nodules stay visible at 64 px).
NODULE_SIZE_MM: tuple[int, int] = (14, 30)
#: Cardiothoracic ratio ranges: normal adult, normal child, cardiomegaly.
CTR_NORMAL: tuple[float, float] = (0.38, 0.45)
CTR_NORMAL_CHILD: tuple[float, float] = (0.42, 0.46)
CTR_CARDIOMEGALY: tuple[float, float] = (0.57, 0.67)

_MIN_SIZE = 32


@dataclass
class PhantomImage:
    """A rendered phantom and its ground-truth geometry.

    Pixel coordinates are ``(row, col)`` with row 0 at the top and col 0 at the image's left, which is
    the patient's right (PA display).

    Attributes:
        image: ``float32`` array ``(size, size)`` in ``[0, 1]``, MONOCHROME2 (bright = dense).
        attributes: The attributes it was drawn from (findings normalised).
        pixel_spacing_mm: Physical size of one pixel in mm (square pixels, at the detector).
        thorax_width_px: Widest inner thoracic diameter (rib margin to rib margin) in pixels.
        thorax_height_px: Lung apex to costophrenic angle in pixels.
        heart_width_px: Widest horizontal heart diameter in pixels.
        ctr: Cardiothoracic ratio ``heart_width_px / thorax_width_px``.
        effusion_sides: Patient sides with a pleural effusion (``"left"``/``"right"``).
        pneumothorax_sides: Patient sides with a pneumothorax.
        nodule_center_px: ``(row, col)`` of the nodule centre, or ``None``.
        nodule_radius_px: Nodule radius in pixels (0 without nodule).
        nodule_side: Patient side of the nodule, or ``None``.
        consolidation_lobes: Lobes with consolidation.
        lung_mask: ``bool (size, size)``, aerated lung (after findings) before blur and noise.
        breast_shadow: Density of the breast shadows drawn (0 for men and children).
        seed: The seed it was rendered with.
    """

    image: np.ndarray
    attributes: dict[str, Any]
    pixel_spacing_mm: float
    thorax_width_px: float
    thorax_height_px: float
    heart_width_px: float
    ctr: float
    effusion_sides: tuple[str, ...] = ()
    pneumothorax_sides: tuple[str, ...] = ()
    nodule_center_px: tuple[float, float] | None = None
    nodule_radius_px: float = 0.0
    nodule_side: str | None = None
    consolidation_lobes: tuple[str, ...] = ()
    lung_mask: np.ndarray = field(default=None, repr=False)  # type: ignore[assignment]
    breast_shadow: float = 0.0
    seed: int = 0


# ----------------------------------------------------------------------------------------------
# Attributes
# ----------------------------------------------------------------------------------------------


def _sample_finding(name: str, rng: np.random.Generator) -> dict[str, Any]:
    if name == "cardiomegaly":
        return {"name": "cardiomegaly"}
    if name == "pleural effusion":
        return {
            "name": "pleural effusion",
            "location": str(rng.choice(SIDES)),
            "size": str(rng.choice(SIZES, p=[0.35, 0.4, 0.25])),
        }
    if name == "nodule":
        lo, hi = NODULE_SIZE_MM
        return {
            "name": "nodule",
            "location": str(rng.choice(LOBES)),
            "size_mm": int(rng.integers(lo, hi + 1)),
        }
    if name == "pneumothorax":
        return {
            "name": "pneumothorax",
            "location": str(rng.choice(SIDES)),
            "size": str(rng.choice(SIZES, p=[0.4, 0.4, 0.2])),
        }
    if name == "consolidation":
        return {"name": "consolidation", "location": str(rng.choice(LOBES))}
    raise ValueError(f"finding must be one of {PHANTOM_FINDINGS}, got {name!r}")


def sample_attributes(
    rng: np.random.Generator | int | None = None, *, p_normal: float = 0.3, p_second: float = 0.15
) -> dict[str, Any]:
    """Draw patient attributes and findings for one phantom.

    The mix: ``p_normal`` of studies are normal (``findings == []``); the rest carry one finding drawn
    uniformly from :data:`PHANTOM_FINDINGS`, and with probability ``p_second`` a second finding of
    another kind. About 12% of patients are children (2-17 years), the rest adults (18-90).

    Args:
        rng: A numpy ``Generator`` or an integer seed.
        p_normal: Probability of a normal study, in ``[0, 1]``.
        p_second: Probability that an abnormal study has a second finding, in ``[0, 1]``.

    Returns:
        ``{"modality": "DX", "view": "PA", "sex": "F"|"M", "age": int, "findings": [...]}`` with
        findings in the schema of :func:`conditioning.prompts.build_prompt`.

    Raises:
        ValueError: a probability outside ``[0, 1]``.
    """
    for name, p in (("p_normal", p_normal), ("p_second", p_second)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {p}")
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    sex = str(rng.choice(["F", "M"]))
    if rng.random() < 0.12:
        age = int(rng.integers(2, 18))
    else:
        age = int(np.clip(round(rng.normal(55, 18)), 18, 90))
    findings: list[dict[str, Any]] = []
    if rng.random() >= p_normal:
        names = list(PHANTOM_FINDINGS)
        first = str(rng.choice(names))
        findings.append(_sample_finding(first, rng))
        if rng.random() < p_second:
            second = str(rng.choice([n for n in names if n != first]))
            findings.append(_sample_finding(second, rng))
    return {"modality": "DX", "view": "PA", "sex": sex, "age": age, "findings": findings}


def primary_label(attributes: Mapping[str, Any]) -> str:
    """``"normal"`` or the canonical name of the first finding (the ``label`` column)."""
    findings = normalize_findings(attributes.get("findings"))
    return findings[0]["name"] if findings else "normal"


# ----------------------------------------------------------------------------------------------
# Rendering helpers
# ----------------------------------------------------------------------------------------------


def _smooth_inside(f: np.ndarray, px: float) -> np.ndarray:
    """Anti-aliased indicator of ``f < 0`` (``f`` in normalised distance units, ``px`` one pixel)."""
    return np.clip(0.5 - f / px, 0.0, 1.0)


def _smoothstep(t: np.ndarray) -> np.ndarray:
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _side_sign(side: str, arg: str) -> float:
    """Image x sign of a patient side: right -> -1 (image left), left -> +1 (image right)."""
    s = str(side).strip().lower()
    if s not in SIDES:
        raise ValueError(f"{arg} must be 'left' or 'right', got {side!r}")
    return -1.0 if s == "right" else 1.0


def _segments_field(
    x: np.ndarray, y: np.ndarray, seg: np.ndarray, width: np.ndarray, amp: np.ndarray
) -> np.ndarray:
    """Max over line segments of a Gaussian ridge; ``seg`` is ``(n, 4)`` as ``x0, y0, x1, y1``.

    Width and amplitude taper linearly along each segment: ``width``/``amp`` are ``(n, 2)``
    (start, end).
    """
    x0, y0, x1, y1 = (seg[:, i, None, None] for i in range(4))
    dx, dy = x1 - x0, y1 - y0
    ll = dx * dx + dy * dy + 1e-12
    t = np.clip(((x - x0) * dx + (y - y0) * dy) / ll, 0.0, 1.0)
    d2 = (x - x0 - t * dx) ** 2 + (y - y0 - t * dy) ** 2
    w = width[:, 0, None, None] + t * (width[:, 1, None, None] - width[:, 0, None, None])
    a = amp[:, 0, None, None] + t * (amp[:, 1, None, None] - amp[:, 0, None, None])
    return (a * np.exp(-d2 / (w * w))).max(axis=0)


@dataclass
class _Anatomy:
    """Normalised-coordinate geometry of one patient (internal)."""

    a_t: float  # thorax inner half width
    y_apex: float
    y_cp: float  # costophrenic angle level
    dome: tuple[float, float]  # dome top for (right, left) hemidiaphragm
    x_mid: float  # patient midline (rotation)
    med_w: float  # upper mediastinum half width
    knob: float  # aortic knob size
    thymus: float
    heart_w: float  # full heart width
    heart_cy: float
    heart_hh: float
    shoulder_w: float
    breast: float
    bone: float
    thorax_mm: float


def _anatomy(attributes: Mapping[str, Any], rng: np.random.Generator, ctr: float) -> _Anatomy:
    sex = normalize_sex(attributes.get("sex")) or str(rng.choice(["F", "M"]))
    age_raw = attributes.get("age")
    age = float(age_raw) if age_raw is not None and str(age_raw).strip() != "" else 50.0
    child = age < 18
    if child:
        growth = np.clip((age - 2) / 16, 0, 1)
        a_t = rng.uniform(0.77, 0.81)
        height = (0.98 + 0.22 * growth) * a_t / 0.75 * rng.uniform(0.96, 1.04)
        thorax_mm = 150 + 130 * growth + rng.normal(0, 8)
        shoulder_w = a_t + 0.1
        thymus = 0.08 * max(0.0, 1 - age / 6)
        breast = 0.0
    elif sex == "M":
        a_t = rng.uniform(0.76, 0.81)
        height = rng.uniform(1.22, 1.32)
        thorax_mm = rng.normal(300, 15)
        shoulder_w = min(0.99, a_t + 0.2)
        thymus = 0.0
        breast = 0.0
    else:
        a_t = rng.uniform(0.72, 0.77)
        height = rng.uniform(1.16, 1.26)
        thorax_mm = rng.normal(270, 14)
        shoulder_w = min(0.97, a_t + 0.16)
        thymus = 0.0
        breast = rng.uniform(0.12, 0.22) if age >= 16 else 0.0
    y_apex = -0.74 + rng.uniform(-0.03, 0.03)
    y_cp = y_apex + height
    dome_r = y_cp - rng.uniform(0.12, 0.16) * height / 1.25
    dome_l = dome_r + rng.uniform(0.02, 0.05)
    heart_w = 2 * a_t * ctr
    heart_hh = 0.27 + 0.06 * heart_w
    heart_cy = dome_r - 0.12
    return _Anatomy(
        a_t=a_t,
        y_apex=y_apex,
        y_cp=y_cp,
        dome=(dome_r, dome_l),
        x_mid=rng.uniform(-0.025, 0.025),
        med_w=0.10 + 0.02 * (1 - np.clip(age / 18, 0, 1)),
        knob=0.0 if child else 0.03 + 0.05 * np.clip((age - 30) / 50, 0, 1),
        thymus=thymus,
        heart_w=heart_w,
        heart_cy=heart_cy,
        heart_hh=heart_hh,
        shoulder_w=shoulder_w,
        breast=breast,
        bone=1.0 if age < 65 else 0.8,
        thorax_mm=float(max(thorax_mm, 120.0)),
    )


def _dia_y(x: np.ndarray, an: _Anatomy, sign: float) -> np.ndarray:
    """Height (normalised y) of one hemidiaphragm; the dome peaks at mid-hemithorax."""
    xs = (x - an.x_mid) * sign
    dome = an.dome[0] if sign < 0 else an.dome[1]
    pk = 0.42 * an.a_t
    lat = np.clip((xs - pk) / (an.a_t - pk), 0.0, None)
    medial = np.clip((pk - xs) / pk, 0.0, 1.0)
    return dome + (an.y_cp - dome) * lat**2 + 0.12 * medial**2


def _lung_field(x: np.ndarray, y: np.ndarray, an: _Anatomy, sign: float, px: float) -> np.ndarray:
    """Approximate signed distance (normalised units, negative inside) of one lung.

    ``sign`` is -1 for the right lung (image left), +1 for the left lung.
    """
    xs = (x - an.x_mid) * sign  # > 0 towards this lung's lateral side
    h = an.y_cp - an.y_apex
    # thorax: superellipse, bottom at the costophrenic level, widest there
    ty = np.clip((an.y_cp - y) / h, 0.0, None)
    r = (np.abs(xs) / an.a_t) ** 2.2 + ty**2.4
    g_thorax = (r ** (1 / 2.3) - 1.0) * an.a_t
    # mediastinum: upper part (trachea, great vessels, aortic knob on the left, thymus in children)
    med = an.med_w + an.thymus * np.exp(-(((y - (an.y_apex + 0.45)) / 0.18) ** 2))
    if sign > 0:
        med = med + an.knob * np.exp(-(((y - (an.y_apex + 0.38)) / 0.07) ** 2))
    g_med = med - xs
    # hemidiaphragm: dome peaks at mid-hemithorax, falls to the costophrenic angle laterally
    g_dia = (y - _dia_y(x, an, sign)) * 0.8
    # heart (sheared ellipse, 1/3 right of the midline, 2/3 left, apex down and to the left)
    hx = x - an.x_mid - 0.2 * np.clip(y - an.heart_cy, 0.0, None) - an.heart_w / 6
    hy = (y - an.heart_cy) / an.heart_hh
    ex = hx / (an.heart_w / 2)
    g_heart = (1.0 - np.sqrt(ex**2 + hy**2)) * an.heart_w / 2
    return np.maximum.reduce([g_thorax, g_med, g_dia, g_heart])


def _lobe_masks(x: np.ndarray, y: np.ndarray, an: _Anatomy) -> dict[str, np.ndarray]:
    """Frontal-projection lobe regions (float in [0, 1], not yet restricted to the lungs)."""
    h = an.y_cp - an.y_apex
    y_fiss = an.y_apex + 0.48 * h  # horizontal fissure, about at the right hilum
    xr = -(x - an.x_mid)
    xl = x - an.x_mid
    soft = 0.03
    above = _smoothstep((y_fiss - y) / soft + 0.5)
    below = 1.0 - above
    mid_medial = _smoothstep((0.62 * an.a_t - xr) / 0.12 + 0.5)
    y_low = an.y_apex + 0.86 * h
    lower_r = np.maximum(_smoothstep((y - y_low) / soft + 0.5), 1.0 - mid_medial) * below
    y_lu = an.y_apex + 0.60 * h - 0.25 * np.clip(xl / an.a_t, 0, 1) * h * 0.5
    lul = _smoothstep((y_lu - y) / soft + 0.5)
    return {
        "right upper lobe": above * (xr > 0),
        "right middle lobe": below * mid_medial * (1 - lower_r) * (xr > 0),
        "right lower lobe": lower_r * (xr > 0),
        "left upper lobe": lul * (xl > 0),
        "left lower lobe": (1.0 - lul) * (xl > 0),
    }


def _lobe_side(lobe: str) -> str:
    return "right" if lobe.startswith("right") else "left"


def _check_lobe(value: Any, arg: str) -> str:
    lobe = str(value).strip().lower()
    if lobe not in LOBES:
        raise ValueError(f"{arg} must be one of {LOBES}, got {value!r}")
    return lobe


def _size_fraction(size: Any, arg: str) -> float:
    if size is None:
        return 0.5
    key = str(size).strip().lower()
    table = {"small": 0.0, "moderate": 0.5, "large": 1.0}
    if key not in table:
        raise ValueError(f"{arg} must be one of {SIZES}, got {size!r}")
    return table[key]


# ----------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------


def render_phantom(attributes: Mapping[str, Any], size: int = 64, seed: int = 0) -> PhantomImage:
    """Render one frontal (PA) chest radiograph phantom.

    Args:
        attributes: ``sex``, ``age`` and ``findings`` as in :func:`conditioning.prompts.build_prompt`;
            findings this phantom cannot draw (e.g. ``"pneumonia"``) are rejected. Side locations are
            the patient's (``"left"`` is drawn on the image's right).
        size: Output height and width in pixels, ``>= 32``.
        seed: Seed for the anatomy, finding placement, vascular tree and noise; same inputs give the
            same pixels.

    Returns:
        A :class:`PhantomImage`; ``image`` is ``float32 (size, size)`` in ``[0, 1]``, MONOCHROME2.

    Raises:
        ValueError: ``size`` too small, or a finding with an unknown name, side, size or lobe.
    """
    if int(size) != size or size < _MIN_SIZE:
        raise ValueError(f"size must be an integer >= {_MIN_SIZE}, got {size!r}")
    size = int(size)
    findings = normalize_findings(attributes.get("findings"))
    for f in findings:
        if f["name"] not in PHANTOM_FINDINGS:
            raise ValueError(
                f"findings: the phantom draws {PHANTOM_FINDINGS}, got {f['name']!r}"
            )
    names = [f["name"] for f in findings]
    rng = np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, 0x5EED]))
    age = attributes.get("age")
    child = age is not None and str(age).strip() != "" and float(age) < 18
    if "cardiomegaly" in names:
        ctr = rng.uniform(*CTR_CARDIOMEGALY)
    else:
        ctr = rng.uniform(*(CTR_NORMAL_CHILD if child else CTR_NORMAL))
    an = _anatomy(attributes, rng, ctr)

    px = 2.0 / size
    c = (np.arange(size, dtype=np.float32) + 0.5) * px - 1.0
    y, x = np.meshgrid(c, c, indexing="ij")
    xm = x - an.x_mid

    # 1. body soft tissue (neck, shoulders, trunk), thickness ~ chord through an elliptic section
    sh = _smoothstep((y - (an.y_apex - 0.2)) / 0.3) ** 0.7
    body_w = 0.26 + (an.shoulder_w - 0.26) * sh
    body_w = body_w - 0.06 * _smoothstep((y - an.y_cp) / 0.4)
    chord = np.sqrt(np.clip(1.0 - (xm / body_w) ** 2, 0.0, 1.0))
    A = 1.1 * chord**0.5 * _smooth_inside(np.abs(xm) - body_w, px)

    # 2. lungs: air replaces tissue; thicker air column in the middle of each lung
    f_r = _lung_field(x, y, an, -1.0, px)
    f_l = _lung_field(x, y, an, 1.0, px)
    lungs = {"right": (f_r, -1.0), "left": (f_l, 1.0)}
    air = np.zeros_like(A)
    marking_mask = np.zeros_like(A)
    collapsed_fields: dict[str, np.ndarray] = {}
    hila = {
        "right": (an.x_mid - 0.22, an.y_apex + 0.5 * (an.y_cp - an.y_apex)),
        "left": (an.x_mid + 0.23, an.y_apex + 0.47 * (an.y_cp - an.y_apex)),
    }
    pneumo = {str(f.get("location", "right")).lower(): f for f in findings if f["name"] == "pneumothorax"}
    for f in pneumo.values():
        _side_sign(f.get("location", "right"), "pneumothorax location")
    extra = np.zeros_like(A)
    for side, (f_side, sgn) in lungs.items():
        inside = _smooth_inside(f_side, px)
        depth = np.clip(-f_side / 0.14, 0.0, 1.0) ** 0.5
        lung_air = inside * (0.6 + 0.4 * depth)
        marks = inside
        if side in pneumo:
            frac = _size_fraction(pneumo[side].get("size"), "pneumothorax size")
            scale = 0.80 - 0.22 * frac  # lung shrinks towards the hilum
            hx, hy = hila[side]
            xc = hx + (x - hx) / scale
            yc = hy + (y - hy) / scale
            f_c = _lung_field(xc, yc, an, sgn, px) * scale
            f_c = np.maximum(f_c, f_side)
            coll = _smooth_inside(f_c, px)
            collapsed_fields[side] = f_c
            # pleural space: pure air (darker), collapsed lung slightly denser, visible pleural line
            lung_air = inside * (1.0 - coll) * 1.12 + coll * lung_air * 0.9
            line_w = max(0.55 * px, 0.008)
            extra += 0.22 * np.exp(-((f_c / line_w) ** 2)) * inside
            marks = coll
        air += lung_air
        marking_mask += marks
    lung_inside = _smooth_inside(np.minimum(f_r, f_l), px)

    # 3. findings that replace air: effusion and consolidation
    opacity = np.zeros_like(A)
    effusion_sides: list[str] = []
    for f in findings:
        if f["name"] != "pleural effusion":
            continue
        side = str(f.get("location", "right")).lower()
        sgn = _side_sign(side, "pleural effusion location")
        frac = _size_fraction(f.get("size"), "pleural effusion size")
        h = an.y_cp - an.y_apex
        level = an.y_cp - (0.18 + 0.27 * frac + 0.08 * frac**2) * h
        xs = np.clip(xm * sgn / an.a_t, 0.0, 1.2)
        menis = level + 0.10 * h * (1.0 - xs**2)  # fluid climbs the lateral chest wall
        fluid = _smoothstep((y - menis) / (0.10 * h) + 0.2) * (xm * sgn > 0)
        opacity = np.maximum(opacity, fluid)
        effusion_sides.append(side)
    consolidation_lobes: list[str] = []
    lobes = _lobe_masks(x, y, an) if any(n in ("consolidation", "nodule") for n in names) else {}
    for f in findings:
        if f["name"] != "consolidation":
            continue
        lobe = _check_lobe(f.get("location", "right lower lobe"), "consolidation location")
        lowfreq = ndimage.gaussian_filter(rng.random((size, size)).astype(np.float32), size / 16)
        lowfreq = (lowfreq - lowfreq.min()) / (np.ptp(lowfreq) + 1e-6)
        opacity = np.maximum(opacity, lobes[lobe] * (0.78 + 0.2 * lowfreq))
        consolidation_lobes.append(lobe)
    air = air * (1.0 - opacity)
    A = A - 0.85 * air + 0.06 * opacity * lung_inside

    # 4. heart slightly denser than mediastinal fat; hila
    hx = xm - 0.2 * np.clip(y - an.heart_cy, 0.0, None) - an.heart_w / 6
    heart = np.clip(1.0 - np.sqrt((hx / (an.heart_w / 2)) ** 2 + ((y - an.heart_cy) / an.heart_hh) ** 2), 0, 1)
    A += 0.12 * np.sqrt(heart)

    # 5. vascular markings: branching tree from each hilum, tapering to the periphery
    segs, widths, amps = [], [], []
    for side, sgn in (("right", -1.0), ("left", 1.0)):
        hx0, hy0 = hila[side]
        n_main = 7
        angles = np.linspace(-1.25, 1.35, n_main) + rng.normal(0, 0.08, n_main)
        for ang in angles:
            length = rng.uniform(0.38, 0.5) * (1.0 + 0.25 * np.sin(ang))
            dx, dy = sgn * np.cos(ang), np.sin(ang)
            mx, my = hx0 + dx * length * 0.5, hy0 + dy * length * 0.5
            segs.append((hx0, hy0, mx, my))
            widths.append((0.028, 0.018))
            amps.append((0.16, 0.11))
            for turn in (-0.35, 0.35):
                a2 = ang + turn + rng.normal(0, 0.08)
                l2 = length * rng.uniform(0.45, 0.6)
                segs.append((mx, my, mx + sgn * np.cos(a2) * l2, my + np.sin(a2) * l2))
                widths.append((0.016, 0.007))
                amps.append((0.10, 0.02))
    vessels = _segments_field(
        x, y, np.asarray(segs, np.float32), np.asarray(widths, np.float32), np.asarray(amps, np.float32)
    )
    for side, (hx0, hy0) in hila.items():
        A += 0.16 * np.exp(-(((x - hx0) / 0.08) ** 2 + ((y - hy0) / 0.12) ** 2)) * lung_inside
    A += vessels * np.clip(marking_mask, 0, 1) * (1.0 - opacity)

    # 6. trachea and main bronchi (air in the mediastinum)
    carina_y = an.y_apex + 0.36 * (an.y_cp - an.y_apex)
    trachea = np.exp(-((xm / 0.035) ** 4)) * _smoothstep((carina_y - y) / 0.05)
    bronchi = _segments_field(
        x, y,
        np.asarray([(an.x_mid, carina_y, hila["right"][0] + 0.06, hila["right"][1] - 0.03),
                    (an.x_mid, carina_y, hila["left"][0] - 0.06, hila["left"][1] - 0.05)], np.float32),
        np.full((2, 2), 0.025, np.float32), np.full((2, 2), 1.0, np.float32),
    )
    A -= 0.22 * np.maximum(trachea, bronchi * (1 - lung_inside))

    # 7. bones: spine, ribs, clavicles, humeral heads
    bone = np.zeros_like(A)
    h = an.y_cp - an.y_apex
    rib_gap = h / 9.0
    seg_phase = rng.uniform(0, 1)
    spine = np.exp(-((xm / 0.075) ** 6)) * (0.75 + 0.25 * np.cos(2 * np.pi * (y / (rib_gap * 0.95) + seg_phase)))
    bone += 0.35 * spine
    ax = np.abs(xm) / an.a_t
    steep = 0.6 if child else 1.0
    rib_y0 = an.y_apex - 0.06 + rib_gap * np.arange(10)
    # posterior ribs: leave the spine almost level, arc down towards the lateral chest wall
    post = rib_y0[:, None, None] - 0.05 * np.sin(np.pi * np.clip(ax, 0, 1)) + steep * 0.16 * ax**2.2
    d = np.abs(y - post)
    ribs = np.exp(-((d / 0.026) ** 4)).max(axis=0) * (np.abs(xm) > 0.07) * (ax < 1.07)
    # anterior ribs: from the lateral wall downward and medially to the costal cartilage
    ant = (rib_y0[:, None, None] + 0.1) + steep * 0.28 * (1.0 - ax) - 0.04
    d = np.abs(y - ant)
    ribs_a = np.exp(-((d / 0.022) ** 4)).max(axis=0) * (ax > 0.35) * (ax < 1.05)
    below_dia = _smoothstep((y - an.y_cp + 0.05) / 0.1)
    bone += (0.075 * ribs + 0.045 * ribs_a) * (1 - below_dia)
    t = np.clip((np.abs(xm) - 0.1) / 0.55, 0.0, 1.0)
    clav_y = an.y_apex + 0.1 - 0.12 * t + 0.03 * np.sin(2 * np.pi * t)
    clav = np.exp(-(((y - clav_y) / 0.03) ** 4)) * (np.abs(xm) > 0.08) * (np.abs(xm) < 0.72)
    bone += 0.28 * clav
    A += bone * an.bone

    # 8. breast shadows (adult women): soft tissue over the lower zones, sharp inferior edge
    if an.breast > 0:
        for sgn in (-1.0, 1.0):
            bx, by = an.x_mid + sgn * 0.5 * an.a_t, an.y_cp - 0.42 * h + rng.uniform(-0.03, 0.03)
            r = np.sqrt(((x - bx) / 0.36) ** 2 + ((y - by) / 0.3) ** 2)
            A += an.breast * np.sqrt(np.clip(1 - r**2, 0, 1)) * _smoothstep((y - by + 0.25) / 0.3)

    # 9. nodule: a soft-tissue sphere, size in real mm
    pixel_spacing = an.thorax_mm / (an.a_t * size)
    nodule_center = None
    nodule_radius = 0.0
    nodule_side = None
    for f in findings:
        if f["name"] != "nodule":
            continue
        lobe = _check_lobe(f.get("location", "right upper lobe"), "nodule location")
        try:
            size_mm = float(f.get("size_mm", 20))
        except (TypeError, ValueError):
            raise ValueError(f"nodule size_mm must be a number of mm, got {f.get('size_mm')!r}") from None
        if not 1.0 <= size_mm <= 60.0:
            raise ValueError(f"nodule size_mm must be in [1, 60], got {f.get('size_mm')!r}")
        r_norm = size_mm / 2.0 / pixel_spacing * px
        f_lung = f_r if _lobe_side(lobe) == "right" else f_l
        if _lobe_side(lobe) in collapsed_fields:
            f_lung = collapsed_fields[_lobe_side(lobe)]
        hxy = hila[_lobe_side(lobe)]
        off_hilum = (x - hxy[0]) ** 2 + ((y - hxy[1]) / 1.5) ** 2 > 0.2**2
        cand = (lobes[lobe] > 0.99) & (f_lung < -(r_norm + 0.09)) & (opacity < 0.05) & off_hilum
        if not cand.any():
            cand = (lobes[lobe] > 0.5) & (f_lung < -r_norm)
        if not cand.any():
            cand = f_lung < 0
        idx = np.flatnonzero(cand.ravel())
        k = int(idx[rng.integers(len(idx))])
        cy, cx = float(y.ravel()[k]) + rng.uniform(-0.5, 0.5) * px, float(x.ravel()[k]) + rng.uniform(-0.5, 0.5) * px
        rr = np.sqrt((x - cx) ** 2 + (y - cy) ** 2)
        sphere = np.sqrt(np.clip(1.0 - (rr / r_norm) ** 2, 0.0, 1.0))
        edge = np.clip((r_norm - rr) / px + 0.5, 0.0, 1.0)
        A += (0.30 * edge + 0.25 * sphere) * (0.8 + 0.2 * min(1.0, 20.0 / size_mm))
        nodule_center = ((cy + 1.0) / px - 0.5, (cx + 1.0) / px - 0.5)
        nodule_radius = r_norm / px
        nodule_side = _lobe_side(lobe)

    A += extra

    # 10. X-ray transfer, blur, noise
    k_att = 1.3
    img = (1.0 - np.exp(-k_att * np.clip(A, 0.0, None))) / (1.0 - np.exp(-k_att * 2.2))
    img = ndimage.gaussian_filter(img, sigma=0.45 * size / 64.0)
    noise = rng.normal(0.0, 1.0, (size, size)).astype(np.float32)
    noise = ndimage.gaussian_filter(noise, 0.5) * 0.02 + rng.normal(0.0, 0.008, (size, size))
    img = np.clip(img + noise * (img > 0.02), 0.0, 1.0).astype(np.float32)

    thorax_width_px = an.a_t * size
    # ground-truth heart diameter as a reader measures it: widest right plus widest left extent of
    # the heart shadow from the midline, above the diaphragm (where it borders lung)
    y_dia = np.where(xm < 0, _dia_y(x, an, -1.0), _dia_y(x, an, 1.0))
    visible = (heart > 0) & (y < y_dia)
    if visible.any():
        heart_width_px = float((xm[visible].max() - xm[visible].min()) / px + 1.0)
    else:  # pragma: no cover - the heart always rises above the diaphragm
        heart_width_px = an.heart_w / px
    lung_fields = {side: collapsed_fields.get(side, f_side) for side, (f_side, _) in lungs.items()}
    lung_mask = (np.minimum(lung_fields["right"], lung_fields["left"]) < 0) & (opacity < 0.5)
    attrs = dict(attributes)
    attrs["findings"] = findings
    return PhantomImage(
        image=img,
        attributes=attrs,
        pixel_spacing_mm=float(pixel_spacing),
        thorax_width_px=float(thorax_width_px),
        thorax_height_px=float(h / px),
        heart_width_px=float(heart_width_px),
        ctr=float(heart_width_px / thorax_width_px),
        effusion_sides=tuple(effusion_sides),
        pneumothorax_sides=tuple(pneumo),
        nodule_center_px=nodule_center,
        nodule_radius_px=float(nodule_radius),
        nodule_side=nodule_side,
        consolidation_lobes=tuple(consolidation_lobes),
        lung_mask=lung_mask,
        breast_shadow=float(an.breast),
        seed=int(seed),
    )
