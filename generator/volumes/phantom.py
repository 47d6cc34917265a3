"""A procedural 3D CT phantom in Hounsfield units, for tests and the demo (``radsynth phantoms --dims 3``).

The phantom is a chest-upper-abdomen CT: body outline (skin, subcutaneous fat, muscle), two lungs
above a domed diaphragm, the heart, the liver below the right dome, the aorta, the spine, and optional
findings: a solid lung nodule in a named lobe and a hypodense liver lesion, each with a diameter in mm.
Body size, fat, lung volume and bone density vary with sex and age; positions jitter per seed. The
report text is built by :func:`conditioning.prompts.build_prompt` (``"chest CT, 12 mm nodule in the
right upper lobe, 64 year old woman"``). Everything is deterministic per seed.

Geometry: the standard layout of :mod:`generator.volumes.records` (``d`` inferior -> superior, ``h``
anterior -> posterior, ``w`` patient right -> left), centred at the world origin, a 400 x 400 mm axial
field of view and 320 mm cranio-caudal by default.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import nibabel as nib
import numpy as np

from conditioning.prompts import build_prompt, normalize_findings, normalize_sex
from generator.manifest import MANIFEST, atomic_write_bytes, atomic_write_text
from generator.volumes.geometry import centred_affine, parse_shape
from generator.volumes.records import DEFAULT_CT_WINDOW, Volume, ct_mapping

__all__ = [
    "DEFAULT_FIELD_OF_VIEW_MM",
    "LUNG_LOBES",
    "PHANTOM_FINDINGS",
    "phantom_attributes",
    "render_ct_phantom",
    "write_phantom_volumes",
    "nifti_bytes",
]

#: ``(cranio-caudal, antero-posterior, lateral)`` extent in mm of the default phantom grid.
DEFAULT_FIELD_OF_VIEW_MM: tuple[float, float, float] = (320.0, 400.0, 400.0)
LUNG_LOBES = ("right upper lobe", "right lower lobe", "left upper lobe", "left lower lobe")
#: Finding names the phantom draws (canonical names of ``conditioning.prompts`` where they exist).
PHANTOM_FINDINGS = ("nodule", "liver lesion")

_AIR, _FAT, _MUSCLE, _LUNG, _BLOOD, _LIVER = -1000.0, -100.0, 30.0, -850.0, 40.0, 65.0


def phantom_attributes(seed: int, *, findings: Sequence[str] | None = None) -> dict[str, Any]:
    """Random attributes for one phantom: ``modality``, ``sex``, ``age``, ``findings``, ``label``.

    Args:
        seed: Seed of the draw (any non-negative integer).
        findings: Finding names to include (subset of :data:`PHANTOM_FINDINGS`); ``None`` draws
            none, a nodule, a liver lesion or both with equal probability.

    Raises:
        ValueError: a negative seed or an unknown finding name.
    """
    if int(seed) < 0:
        raise ValueError(f"seed must be >= 0, got {seed!r}")
    rng = np.random.default_rng([int(seed), 3])
    names = list(findings) if findings is not None else [
        [], ["nodule"], ["liver lesion"], ["nodule", "liver lesion"]][int(rng.integers(4))]
    out: list[dict[str, Any]] = []
    for name in names:
        if name not in PHANTOM_FINDINGS:
            raise ValueError(f"findings must be among {PHANTOM_FINDINGS}, got {name!r}")
        if name == "nodule":
            out.append({"name": "nodule", "location": LUNG_LOBES[int(rng.integers(4))],
                        "size_mm": int(rng.integers(8, 31))})
        else:
            out.append({"name": "liver lesion", "size_mm": int(rng.integers(15, 46))})
    label = "+".join(f["name"] for f in out) or "normal"
    return {"modality": "CT", "sex": "F" if rng.random() < 0.5 else "M", "age": int(rng.integers(20, 86)),
            "findings": out, "label": label}


def _ellipsoid(x, y, z, c, r) -> np.ndarray:
    return ((x - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((z - c[2]) / r[2]) ** 2


def render_ct_phantom(
    attributes: Mapping[str, Any],
    *,
    shape: int | Sequence[int] = 32,
    spacing: Sequence[float] | None = None,
    seed: int = 0,
    noise_hu: float = 12.0,
    file_name: str = "",
) -> Volume:
    """Render one phantom CT volume.

    Args:
        attributes: ``sex`` (F/M), ``age`` (years), ``findings`` (as :func:`phantom_attributes`:
            ``nodule`` with ``location`` in :data:`LUNG_LOBES` and ``size_mm``; ``liver lesion``
            with ``size_mm``); other keys are carried into ``Volume.attributes``.
        shape: ``(D, H, W)`` or one side.
        spacing: ``(slice, row, column)`` mm; default spreads :data:`DEFAULT_FIELD_OF_VIEW_MM` over ``shape``.
        seed: Anatomy jitter and noise seed.
        noise_hu: Standard deviation of the added Gaussian noise, HU.
        file_name: Stored in the Volume.

    Returns:
        A CT :class:`Volume` in HU (-1000 air .. ~+1000 cortical bone), text from ``build_prompt``.

    Raises:
        ValueError: bad shape, spacing, sex, age, lobe or finding size.
    """
    sh = parse_shape(shape)
    if sh is None:
        raise ValueError("shape must not be None")
    if spacing is None:
        sp = tuple(f / n for f, n in zip(DEFAULT_FIELD_OF_VIEW_MM, sh))
    else:
        sp = tuple(float(s) for s in spacing)
        if len(sp) != 3 or min(sp) <= 0:
            raise ValueError(f"spacing must be 3 positive mm, got {spacing!r}")
    sex = normalize_sex(attributes.get("sex")) or "F"
    try:
        age = float(attributes.get("age", 50))
    except (TypeError, ValueError):
        raise ValueError(f"age must be a number of years, got {attributes.get('age')!r}") from None
    if not 0 <= age <= 120:
        raise ValueError(f"age must be in [0, 120], got {age}")
    findings = normalize_findings(attributes.get("findings"))
    rng = np.random.default_rng([int(seed), 11])

    # world coordinates (mm) of voxel centres: z superior, y posterior, x patient left
    z = (np.arange(sh[0]) - (sh[0] - 1) / 2) * sp[0]
    y = (np.arange(sh[1]) - (sh[1] - 1) / 2) * sp[1]
    x = (np.arange(sh[2]) - (sh[2] - 1) / 2) * sp[2]
    Z, Y, X = np.meshgrid(z, y, x, indexing="ij")

    growth = min(1.0, 0.45 + age / 30.0)
    size = growth * (1.06 if sex == "M" else 0.95) * (1 + 0.04 * rng.standard_normal())
    fat = (14.0 if sex == "F" else 9.0) + 0.12 * max(0.0, age - 25) + 2.0 * rng.standard_normal()
    a, b = 165.0 * size, 115.0 * size  # half width (lateral), half depth (AP)
    hu = np.full(sh, _AIR, dtype=np.float64)
    body = (X / a) ** 2 + (Y / b) ** 2 <= 1.0
    hu[body] = _FAT
    inner = (X / (a - fat)) ** 2 + (Y / (b - fat)) ** 2 <= 1.0
    hu[inner] = _MUSCLE

    dome_r = 25.0 * size + rng.normal(0, 3)  # right hemidiaphragm higher (liver)
    dome_l = 5.0 * size + rng.normal(0, 3)
    lung_scale = 1.0 - 0.002 * max(0.0, age - 40)
    lungs: dict[str, np.ndarray] = {}
    for side, sign, dome in (("right", -1.0, dome_r), ("left", 1.0, dome_l)):
        c = (sign * 0.47 * a, 0.05 * b, dome + 75.0 * size)
        r = (0.36 * a * lung_scale, 0.72 * b * lung_scale, 105.0 * size * lung_scale)
        lung = (_ellipsoid(X, Y, Z, c, r) <= 1.0) & (Z > dome - 30.0 * ((X - c[0]) / r[0]) ** 2) & inner
        lungs[side] = lung
        hu[lung] = _LUNG
    heart_c = (0.18 * a + rng.normal(0, 3), -0.25 * b, dome_l + 45.0 * size)
    heart_e = _ellipsoid(X, Y, Z, heart_c, (0.30 * a, 0.40 * b, 50.0 * size))
    hu[(heart_e <= 1.35) & inner] = _FAT  # pericardial / mediastinal fat
    hu[(heart_e <= 1.0) & inner] = _BLOOD
    liver_c = (-0.35 * a + rng.normal(0, 3), -0.05 * b, dome_r - 60.0 * size)
    liver_r = (0.55 * a, 0.70 * b, 75.0 * size)
    liver = (_ellipsoid(X, Y, Z, liver_c, liver_r) <= 1.0) & inner & ~lungs["right"]
    hu[liver] = _LIVER
    spine_c = (0.0, 0.62 * b, 0.0)
    body_r = 18.0 * size
    aorta = ((X - 0.1 * a) ** 2 + (Y - 0.42 * b) ** 2 <= (10.0 * size) ** 2) & inner
    hu[aorta] = _BLOOD + 5.0
    vert = (X - spine_c[0]) ** 2 + (Y - spine_c[1]) ** 2
    density = 260.0 - 2.2 * max(0.0, age - 30) + rng.normal(0, 10)
    hu[(vert <= body_r ** 2)] = max(density, 80.0)
    hu[(vert <= body_r ** 2) & (vert >= (body_r - 3.0) ** 2)] = 700.0  # cortical rim
    disc = (np.mod(Z + rng.uniform(0, 30), 30.0) < 5.0) & (vert <= body_r ** 2)
    hu[disc] = 80.0

    for f in findings:
        size_mm = f.get("size_mm", f.get("size"))
        try:
            diam = float(size_mm)
        except (TypeError, ValueError):
            raise ValueError(f"finding {f['name']!r} needs a numeric size_mm, got {size_mm!r}") from None
        if not 2.0 <= diam <= 100.0:
            raise ValueError(f"finding {f['name']!r}: size_mm must be in [2, 100], got {diam}")
        if f["name"] == "nodule":
            lobe = str(f.get("location", "right upper lobe"))
            if lobe not in LUNG_LOBES:
                raise ValueError(f"nodule location must be one of {LUNG_LOBES}, got {lobe!r}")
            mask = lungs["right" if lobe.startswith("right") else "left"]
            zc = np.median(Z[mask]) if mask.any() else 0.0
            part = mask & ((Z > zc) if "upper" in lobe else (Z <= zc))
            if not part.any():
                part = mask if mask.any() else inner
            idx = np.flatnonzero(part)
            centre = idx[int(rng.integers(len(idx)))]
            cz, cy, cx = Z.flat[centre], Y.flat[centre], X.flat[centre]
            nod = (X - cx) ** 2 + (Y - cy) ** 2 + (Z - cz) ** 2 <= (diam / 2) ** 2
            hu[nod & inner] = 30.0
        elif f["name"] == "liver lesion":
            idx = np.flatnonzero(liver) if liver.any() else np.flatnonzero(inner)
            centre = idx[int(rng.integers(len(idx)))]
            cz, cy, cx = Z.flat[centre], Y.flat[centre], X.flat[centre]
            les = (X - cx) ** 2 + (Y - cy) ** 2 + (Z - cz) ** 2 <= (diam / 2) ** 2
            hu[les & inner] = 10.0
        else:
            raise ValueError(f"the CT phantom draws only {PHANTOM_FINDINGS}, got finding {f['name']!r}")

    hu += noise_hu * rng.standard_normal(sh) * body
    hu = np.clip(hu, -1024.0, 3071.0).astype(np.float32)
    affine = centred_affine(sh, sp)
    attrs = {k: v for k, v in attributes.items() if k != "patient_id"}
    attrs.update({"modality": "CT", "sex": sex, "age": int(round(age)), "findings": findings})
    text = build_prompt(attrs)
    pid = attributes.get("patient_id")
    return Volume(array=hu, affine=affine, spacing=sp, intensity=ct_mapping(DEFAULT_CT_WINDOW),  # type: ignore[arg-type]
                  file_name=file_name, text=text, attributes=attrs, patient_id=None if pid is None else str(pid))


def nifti_bytes(volume: Volume, descrip: str = "SYNTHETIC phantom (RadSynth)") -> bytes:
    """The volume as gzip NIfTI-1 bytes: int16 HU, RAS affine as qform = sform (code 1), mm units."""
    data = np.clip(np.round(volume.array), -32768, 32767).astype(np.int16)
    # the NIfTI array axes are the volume's (d, h, w); the affine says where they point
    img = nib.Nifti1Image(data, volume.affine)
    img.set_qform(volume.affine, code=1)
    img.set_sform(volume.affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    img.header.set_slope_inter(1.0, 0.0)
    img.header["descrip"] = descrip.encode("ascii")[:79]
    import gzip

    return gzip.compress(img.to_bytes(), mtime=0)


def write_phantom_volumes(
    out_dir: str | os.PathLike[str],
    num_volumes: int,
    *,
    shape: int | Sequence[int] = 32,
    seed: int = 0,
    findings: Sequence[str] | None = None,
) -> Path:
    """Write ``num_volumes`` phantoms as an imagefolder: ``phantom_0000.nii.gz`` ... plus ``metadata.jsonl``
    (``file_name``, ``text``, ``patient_id``, ``modality``, ``sex``, ``age``, ``findings``, ``label``,
    ``seed``, ``spacing_mm``), which :func:`generator.volumes.ingest.load_volumes` reads back.

    Volume ``i`` uses seed ``seed * 100003 + i`` for its attributes and anatomy, so any one volume can
    be re-rendered. Files are written atomically; identical inputs give identical bytes.

    Raises:
        ValueError: ``num_volumes`` < 1, ``seed`` < 0, or a bad shape/finding.
    """
    if int(num_volumes) < 1:
        raise ValueError(f"num_volumes must be >= 1, got {num_volumes!r}")
    if int(seed) < 0:
        raise ValueError(f"seed must be >= 0, got {seed!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(int(num_volumes)):
        s = int(seed) * 100003 + i
        attrs = phantom_attributes(s, findings=findings)
        attrs["patient_id"] = f"PH3D{s:08d}"
        name = f"phantom_{i:04d}.nii.gz"
        vol = render_ct_phantom(attrs, shape=shape, seed=s, file_name=name)
        atomic_write_bytes(out / name, nifti_bytes(vol))
        lines.append({"file_name": name, "text": vol.text, "patient_id": attrs["patient_id"], "modality": "CT",
                      "sex": vol.attributes["sex"], "age": vol.attributes["age"],
                      "findings": vol.attributes["findings"], "label": attrs["label"], "seed": s,
                      "spacing_mm": list(vol.spacing)})
    atomic_write_text(out / MANIFEST, "".join(json.dumps(ln, sort_keys=True) + "\n" for ln in lines))
    return out
