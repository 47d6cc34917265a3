"""Benchmark: files per second exporting generated 64 px images to DICOM and to NIfTI.

Usage::

    python scripts/bench_export.py                    # 1,000 images, 64 px, DX + CT DICOM, NIfTI
    python scripts/bench_export.py --n 200 --size 128 --json bench.json

Images are smooth random fields in [0, 1] (what a generator hands the exporters); metadata lines look
like generation output. Timing covers encoding, header building and the atomic write of every file,
not image generation. The ``folder`` rows time ``export_imagefolder`` (``radsynth export``) on a
folder of the same images as 8-bit PNGs: the up-front check of every row, the per-image record,
and a second run of the same command on the finished output (the resume check alone). Output goes
to a temporary folder that is removed afterwards.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


from PIL import Image  # noqa: E402

from exporters import DicomExporter, NiftiExporter, export_imagefolder  # noqa: E402


def _images(n: int, size: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    low = rng.random((n, size // 8, size // 8))
    up = np.repeat(np.repeat(low, 8, axis=1), 8, axis=2)[:, :size, :size]
    kernel = np.ones(5) / 5
    for axis in (1, 2):
        up = np.apply_along_axis(lambda v: np.convolve(v, kernel, mode="same"), axis, up)
    up = (up - up.min()) / (up.max() - up.min())
    return up.astype(np.float32)


def _meta(i: int) -> dict:
    return {
        "file_name": f"images/{i:06d}.png",
        "text": "PA chest radiograph, no acute cardiopulmonary process",
        "seed": 1234 + i,
        "model": "3f2a9c1d0b7e",
        "sampler": "dpmsolver++",
        "steps": 20,
        "guidance_scale": 2.0,
        "attributes": {"sex": "FM"[i % 2], "age": 20 + i % 60, "view": "PA"},
        "privacy_verdict": "keep",
    }


def _run(name: str, exporter, images: np.ndarray, intensity: dict | None) -> dict:
    t0 = time.perf_counter()
    files = 0
    for i, image in enumerate(images):
        meta = _meta(i)
        if intensity is not None:
            meta["intensity"] = intensity
        files += len(exporter.add(image, meta))
    seconds = time.perf_counter() - t0
    return {"export": name, "images": len(images), "files": files, "seconds": round(seconds, 3),
            "files_per_s": round(files / seconds, 1), "images_per_s": round(len(images) / seconds, 1)}


def _run_folder(images: np.ndarray, tmp: Path) -> list[dict]:
    """Time ``export_imagefolder`` to DICOM + NIfTI, then the same command again (nothing to do)."""
    src = tmp / "pngs"
    src.mkdir()
    lines = []
    for i, image in enumerate(images):
        Image.fromarray(np.round(image * 255).astype(np.uint8)).save(src / f"{i:06d}.png")
        lines.append(json.dumps({**_meta(i), "file_name": f"{i:06d}.png"}))
    (src / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    results = []
    for name in ("folder dicom+nifti", "folder again (resume check)"):
        t0 = time.perf_counter()
        summary = export_imagefolder(src, tmp / "folder_out", ["dicom", "nifti"], software_version="bench")
        seconds = time.perf_counter() - t0
        files = sum(summary.files.values())
        results.append({"export": name, "images": summary.images, "files": files, "seconds": round(seconds, 3),
                        "files_per_s": round(files / seconds, 1), "images_per_s": round(summary.images / seconds, 1)})
    return results


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; prints one JSON line per export kind."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1000, help="images per export kind (default 1000)")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this file")
    args = parser.parse_args(argv)
    if args.n < 1 or args.size < 8:
        parser.error(f"--n={args.n} must be >= 1 and --size={args.size} >= 8")
    images = _images(args.n, args.size)
    ct = {"kind": "ct_window", "low": -160.0, "high": 240.0, "unit": "HU", "bits_stored": 12, "modality": "CT"}
    results = []
    with tempfile.TemporaryDirectory(prefix="radsynth-bench-") as tmp:
        out = Path(tmp)
        results.append(_run("dicom DX", DicomExporter(out / "dx", "DX", software_version="bench"), images, None))
        results.append(_run("dicom CT", DicomExporter(out / "ct", "CT", software_version="bench"), images, ct))
        results.append(_run("nifti .nii.gz (+json)", NiftiExporter(out / "nii", "DX", software_version="bench"), images, None))
        results.append(
            _run("nifti .nii (+json)", NiftiExporter(out / "niiu", "DX", software_version="bench", compress=False), images, None)
        )
        results.extend(_run_folder(images, out))
    for r in results:
        print(json.dumps(r))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
