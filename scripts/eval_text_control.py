"""Does the text control the image? Measured on samples of a phantom-trained model (issues 6 and 12).

For each finding prompt, N images are generated and a classical measurement
(``generator.phantoms.measure``: cardiothoracic ratio, costophrenic angles, blob filter, ...) decides
whether each image shows what the prompt asked for, *on the asked side*. Columns of the table:

- samples showing it: share of the model's samples where every requested finding is measured
  (:func:`~generator.phantoms.measure.matches_prompt`, side included);
- phantoms: the same measurement on rendered phantoms with the same attributes (what it finds on the
  training distribution: the measurement's own ceiling);
- VAE round trip: the same phantoms encoded and decoded by the model's VAE alone (the ceiling of a
  perfect denoiser with that VAE: a small nodule the VAE blurs away no prompt can bring back);
- normal-prompt base rate: the same decision on the model's samples for the *normal* prompt (same
  people, same seeds): how often the finding appears when it was not asked for;
- side swapped (samples): share of samples whose finding is measured on the other side only
  (:func:`~generator.phantoms.measure.side_swapped`; prompts with a side or lobe);
- size error (samples / VAE round trip / phantoms): for nodule prompts with a size, the mean absolute error in mm of
  the measured diameter against the asked ``size_mm`` (px to mm through the measured thorax width and
  ``THORAX_WIDTH_MM``); for effusion prompts with a grade, the share whose measured grade
  (small / moderate / large from the costophrenic-angle rise) differs from the asked one. Both only
  over images that show the finding on the asked side (misses are counted in the first column); the
  phantom value is the measurement's own error.

The nodule size rows (right upper lobe at 14, 20 and 30 mm) also print how the measured diameters of the
phantoms spread, so the reader sees whether the measurement separates the sizes at this resolution (at
64 px a 14 mm nodule is ~2.4 px across; on phantoms 14 and 20 mm overlap in a few images, 20 and 30 mm
hardly: see ``generator/phantoms/measure.py``).

Paraphrases (text written differently from the training prompts, e.g. "enlarged heart", "collapsed left
lung") are measured against the finding they name; one without a size has no size error.

    python scripts/eval_text_control.py                     # bundled demo model, 48 images per prompt
    python scripts/eval_text_control.py --model /tmp/m --num-images 8 --guidance-scale 3 --json out.json

``--model`` takes any RadSynth model folder (``radsynth train`` output) at >= 32 px whose prompts follow
:func:`conditioning.prompts.build_prompt`; the default is the bundled demo model (64 px phantoms).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

from conditioning.prompts import build_prompt  # noqa: E402
from generator.demo import bundled_model_path, demo_settings  # noqa: E402
from generator.manifest import atomic_write_text  # noqa: E402
from generator.models.samplers import DEFAULT_SAMPLER, DEFAULT_STEPS, Sampler, make_sampler  # noqa: E402
from generator.phantoms import render_phantom  # noqa: E402
from generator.phantoms.measure import (  # noqa: E402
    THORAX_WIDTH_MM,
    Measurement,
    effusion_grade_mismatch,
    measure,
    nodule_diameter_mm,
    nodule_size_error_mm,
    prompt_shown,
    side_swapped,
)

NODULE_MM = 20
CONDITIONS: dict[str, list[dict[str, Any]]] = {
    "normal": [],
    "cardiomegaly": [{"name": "cardiomegaly"}],
    "left pleural effusion": [{"name": "pleural effusion", "location": "left", "size": "moderate"}],
    "right pleural effusion": [{"name": "pleural effusion", "location": "right", "size": "moderate"}],
    "left pneumothorax": [{"name": "pneumothorax", "location": "left", "size": "large"}],
    "right pneumothorax": [{"name": "pneumothorax", "location": "right", "size": "large"}],
    "nodule, right upper lobe": [{"name": "nodule", "location": "right upper lobe", "size_mm": NODULE_MM}],
    "nodule, left lower lobe": [{"name": "nodule", "location": "left lower lobe", "size_mm": NODULE_MM}],
    "nodule, right lower lobe": [{"name": "nodule", "location": "right lower lobe", "size_mm": NODULE_MM}],
    "nodule, left upper lobe": [{"name": "nodule", "location": "left upper lobe", "size_mm": NODULE_MM}],
    "nodule, right upper lobe, 14 mm": [{"name": "nodule", "location": "right upper lobe", "size_mm": 14}],
    "nodule, right upper lobe, 30 mm": [{"name": "nodule", "location": "right upper lobe", "size_mm": 30}],
    "consolidation, left lower lobe": [{"name": "consolidation", "location": "left lower lobe"}],
    "consolidation, right lower lobe": [{"name": "consolidation", "location": "right lower lobe"}],
    "consolidation, right upper lobe": [{"name": "consolidation", "location": "right upper lobe"}],
}
#: Rows whose measured nodule diameters on phantoms show whether 14 / 20 / 30 mm are told apart.
SIZE_ROWS: dict[int, str] = {
    14: "nodule, right upper lobe, 14 mm",
    20: "nodule, right upper lobe",
    30: "nodule, right upper lobe, 30 mm",
}
#: Paraphrases: (label, findings the text names, as measured, prompt template with {who}). Findings
#: carry a size only where the text states one (a nodule or effusion without ``size_mm``/``size`` has
#: no size error; :func:`matches_prompt` needs only the name and side; phantoms draw the default size,
#: 20 mm / moderate).
PARAPHRASES: list[tuple[str, list[dict[str, Any]], str]] = [
    ("paraphrase: enlarged heart", [{"name": "cardiomegaly"}], "PA chest x-ray, enlarged heart, {who}"),
    ("paraphrase: left pleural fluid", [{"name": "pleural effusion", "location": "left", "size": "moderate"}],
     "chest radiograph, {who}, moderate left pleural fluid"),
    ("paraphrase: right pleural fluid", [{"name": "pleural effusion", "location": "right"}],
     "PA chest x-ray, right pleural fluid, {who}"),
    ("paraphrase: collapsed left lung", [{"name": "pneumothorax", "location": "left"}],
     "chest radiograph, {who}, collapsed left lung"),
    ("paraphrase: lung nodule in the left lower lobe", [{"name": "nodule", "location": "left lower lobe"}],
     "PA chest x-ray, lung nodule in the left lower lobe, {who}"),
    ("paraphrase: airspace opacity in the right lower lobe",
     [{"name": "consolidation", "location": "right lower lobe"}],
     "chest radiograph, {who}, airspace opacity in the right lower lobe"),
]

#: ``sample(texts, attributes, base_seed) -> float (N, H, W) in [0, 1]``: one image per text, seeds
#: ``base_seed + i``. The model sees only the texts; ``attributes`` (what each text was written from)
#: lets a test stand in for the model.
SampleFn = Callable[[list[str], list[dict[str, Any]], int], np.ndarray]
#: ``round_trip(images) -> images``: float ``(N, H, W)`` in [0, 1] through the model's VAE (encode, decode)
#: and back, same shape and range.
RoundTripFn = Callable[[np.ndarray], np.ndarray]


def _people(n: int, rng: np.random.Generator) -> list[dict[str, Any]]:
    return [{"sex": str(rng.choice(["F", "M"])), "age": int(rng.integers(30, 85))} for _ in range(n)]


def _who(person: dict[str, Any]) -> str:
    return f"{person['age']} year old {'woman' if person['sex'] == 'F' else 'man'}"


def _mean(values: Sequence[float | bool | None]) -> float | None:
    """Mean of the values that are not ``None`` (``None`` if there are none)."""
    vals = [float(v) for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def _size_kind(findings: list[dict[str, Any]]) -> str | None:
    for f in findings:
        if f["name"] == "nodule" and f.get("size_mm") is not None:
            return "nodule_mae_mm"
        if f["name"] == "pleural effusion" and f.get("size") is not None and f.get("location"):
            return "effusion_grade_mismatch"
    return None


def _size_errors(kind: str | None, ms: Sequence[Measurement], attrs: Sequence[dict[str, Any]]) -> list:
    if kind == "nodule_mae_mm":
        return [nodule_size_error_mm(m, a) for m, a in zip(ms, attrs)]
    if kind == "effusion_grade_mismatch":
        return [effusion_grade_mismatch(m, a) for m, a in zip(ms, attrs)]
    return []


def evaluate(
    sample: SampleFn, resolution: int, num_images: int, seed: int = 1000,
    round_trip: RoundTripFn | None = None,
) -> dict[str, Any]:
    """Sample every prompt of :data:`CONDITIONS` and :data:`PARAPHRASES` and measure the images.

    Args:
        sample: The model (see :data:`SampleFn`).
        resolution: Image size in px (phantoms are rendered at it; >= 32 for the measurement).
        num_images: Images per prompt (the same ``num_images`` people, random sex and age, for every
            prompt, so that each row pairs up with the normal prompt's samples).
        seed: Base seed of the people and of the sampling seeds.
        round_trip: The model's autoencoder alone (see :data:`RoundTripFn`); when given, every row
            also measures the phantoms after it: what a perfect denoiser could reach with that VAE.

    Returns:
        ``{"rows": [...], "phantom_nodule_mm": {size_mm: [measured diameters]}}``; each row has
        ``prompt``, ``example_text``, ``model``, ``phantoms``, ``normal_prompt_base_rate``,
        ``side_swapped`` (share of samples, ``None`` for prompts without a side), ``size_error_kind``
        (``"nodule_mae_mm"``, ``"effusion_grade_mismatch"`` or ``None``), ``size_error_samples``,
        ``size_error_phantoms`` (``None`` where not defined or no image showed the finding),
        ``size_error_n`` (images those two means are over: samples, phantoms) and ``n``; with
        ``round_trip``, also ``vae_round_trip`` (share of round-tripped phantoms showing it) and
        ``size_error_vae_round_trip`` (``None`` without it).

    Raises:
        ValueError: ``num_images`` < 1 or ``resolution`` < 32.
    """
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images!r}")
    if resolution < 32:
        raise ValueError(f"resolution must be >= 32 px for the measurement, got {resolution!r}")
    rng = np.random.default_rng(seed)
    people = _people(num_images, rng)
    specs: list[tuple[str, list[dict[str, Any]], list[str] | None, int]] = []
    for k, (name, findings) in enumerate(CONDITIONS.items()):
        specs.append((name, findings, None, seed + 10_000 * k))
    for k, (label, findings, template) in enumerate(PARAPHRASES):
        specs.append((label, findings, [template.format(who=_who(pp)) for pp in people], seed + 500_000 + 10_000 * k))

    normal_ms: list[Measurement] = []
    rows: list[dict[str, Any]] = []
    phantom_mm: dict[int, list[float]] = {}
    for name, findings, texts, base_seed in specs:
        attrs = [{"view": "PA", **pp, "findings": findings} for pp in people]
        texts = texts if texts is not None else [build_prompt(a) for a in attrs]
        ms = [measure(im) for im in sample(texts, attrs, base_seed)]
        phantoms = np.stack([render_phantom(a, size=resolution, seed=50_000 + i).image for i, a in enumerate(attrs)])
        ph_ms = [measure(im) for im in phantoms]
        rt_ms = [measure(im) for im in round_trip(phantoms)] if round_trip is not None else None
        if name == "normal":
            normal_ms = ms
        kind = _size_kind(findings)
        swapped = [side_swapped(m, a) for m, a in zip(ms, attrs)]
        err_samples, err_phantoms = _size_errors(kind, ms, attrs), _size_errors(kind, ph_ms, attrs)
        rows.append({
            "prompt": name,
            "example_text": texts[0],
            "n": num_images,
            "model": float(np.mean([prompt_shown(m, a) for m, a in zip(ms, attrs)])),
            "phantoms": float(np.mean([prompt_shown(m, a) for m, a in zip(ph_ms, attrs)])),
            "normal_prompt_base_rate": (None if name == "normal" or not normal_ms
                                        else float(np.mean([prompt_shown(m, a) for m, a in zip(normal_ms, attrs)]))),
            "side_swapped": _mean(swapped),
            "size_error_kind": kind,
            "size_error_samples": _mean(err_samples),
            "size_error_phantoms": _mean(err_phantoms),
            "size_error_n": [sum(e is not None for e in err_samples), sum(e is not None for e in err_phantoms)],
            "vae_round_trip": (None if rt_ms is None
                               else float(np.mean([prompt_shown(m, a) for m, a in zip(rt_ms, attrs)]))),
            "size_error_vae_round_trip": None if rt_ms is None else _mean(_size_errors(kind, rt_ms, attrs)),
        })
        for mm, row_name in SIZE_ROWS.items():
            if name == row_name:
                phantom_mm[mm] = [d for d in (nodule_diameter_mm(m) for m in ph_ms) if np.isfinite(d)]
    return {"rows": rows, "phantom_nodule_mm": phantom_mm}


def _fmt(v: float | None, digits: int = 2) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def format_table(result: dict[str, Any]) -> str:
    """The markdown table of :func:`evaluate`'s result, with a note on the size columns."""
    lines = ["| prompt | samples showing it | VAE round trip | phantoms | normal-prompt base rate "
             "| side swapped (samples) | size error (samples / VAE round trip / phantoms) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        kind = r["size_error_kind"]
        errors = (r["size_error_samples"], r.get("size_error_vae_round_trip"), r["size_error_phantoms"])
        if kind == "nodule_mae_mm":
            size = " / ".join(_fmt(e, 1) for e in errors) + " mm"
        elif kind == "effusion_grade_mismatch":
            size = " / ".join(_fmt(e) for e in errors) + " grade"
        else:
            size = "–"
        lines.append(f"| {r['prompt']} | {_fmt(r['model'])} | {_fmt(r.get('vae_round_trip'))} | "
                     f"{_fmt(r['phantoms'])} | {_fmt(r['normal_prompt_base_rate'])} | {_fmt(r['side_swapped'])} "
                     f"| {size} |")
    spread = []
    for mm, vals in sorted(result.get("phantom_nodule_mm", {}).items()):
        if vals:
            spread.append(f"{mm} mm: {np.mean(vals):.1f} ± {np.std(vals):.1f} "
                          f"({np.min(vals):.0f}–{np.max(vals):.0f})")
    lines += [
        "",
        "Size error: nodule rows, mean absolute error in mm of the measured diameter (blob scale; px to mm with "
        f"the measured thorax width taken as {THORAX_WIDTH_MM:.0f} mm); effusion rows, share whose measured grade "
        "(small/moderate/large) differs from the asked one. Both over the images that show the finding on the "
        "asked side; the phantom value is the measurement's own error. VAE round trip: the same phantoms "
        "encoded and decoded by the model's VAE alone (what a perfect denoiser could reach with it).",
    ]
    if spread:
        lines.append("Measured diameters of the phantom nodules (mean ± SD, range): " + "; ".join(spread)
                     + ". Where two ranges overlap the measurement cannot tell those sizes apart on every image "
                     "(on 60 phantoms per size at 64 px, 12% of 14 mm nodules read nearer 20 mm; see "
                     "generator/phantoms/measure.py).")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None,
                   help="RadSynth model folder (radsynth train output, >= 32 px, prompts as build_prompt writes "
                        "them); default: the bundled demo model (64 px phantoms)")
    p.add_argument("--num-images", type=int, default=48, help="images per prompt (default 48)")
    p.add_argument("--sampler", default=str(DEFAULT_SAMPLER), choices=[str(s) for s in Sampler],
                   help=f"sampler (default {DEFAULT_SAMPLER}, the library default)")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"sampler steps (default {DEFAULT_STEPS})")
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="classifier-free guidance (default: the model's demo.guidance_scale in radsynth.json, "
                        "else 3)")
    p.add_argument("--guidance-rescale", type=float, default=0.0,
                   help="guidance rescale phi in [0, 1] (RadSynthPipeline guidance_rescale; default 0: plain guidance)")
    p.add_argument("--negative", choices=["null", "normal"], default="null",
                   help="negative prompt of guidance: null (default, the empty prompt the model was trained to "
                        "drop to) or normal (the same person's normal study, build_prompt with no findings; the "
                        "empty prompt for prompts without findings)")
    p.add_argument("--seed", type=int, default=1000)
    p.add_argument("--device", default="cpu", help="torch device for sampling (default cpu)")
    p.add_argument("--json", default=None, help="also write the results as JSON to this path")
    args = p.parse_args(argv)
    if args.num_images < 1:
        p.error(f"--num-images must be >= 1, got {args.num_images}")

    import torch

    from generator.models.model_folder import load_pipeline  # torch/diffusers: only when sampling

    pipe, info = load_pipeline(args.model or bundled_model_path(), device=args.device)
    pipe.scheduler = make_sampler(args.sampler, pipe.scheduler)
    if args.guidance_scale is None:
        args.guidance_scale = float(demo_settings(info.path)[1]["guidance_scale"])
    t0 = time.time()

    def sample(texts: list[str], attrs: list[dict[str, Any]], base: int) -> np.ndarray:
        out = []
        negatives = [build_prompt({**a, "findings": []}) if args.negative == "normal" and a.get("findings") else ""
                     for a in attrs]
        for i in range(0, len(texts), 16):
            chunk = texts[i : i + 16]
            out.append(pipe(chunk, seeds=list(range(base + i, base + i + len(chunk))),
                            negative_prompt=negatives[i : i + 16],
                            num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
                            guidance_rescale=args.guidance_rescale).images)
        return np.concatenate(out)

    def round_trip(images: np.ndarray) -> np.ndarray:
        out = []
        with torch.no_grad():
            for i in range(0, len(images), 16):
                x = torch.from_numpy(np.ascontiguousarray(images[i : i + 16], dtype=np.float32))[:, None]
                out.append(pipe.decode_latents(pipe.encode_images(x))[:, 0].float().cpu().numpy())
        return np.concatenate(out)

    result = evaluate(sample, info.resolution, args.num_images, args.seed, round_trip=round_trip)
    print(f"\nmodel {info.path} ({info.model_hash}), {args.num_images} images per prompt, "
          f"{args.sampler} {args.steps} steps, guidance {args.guidance_scale} (rescale {args.guidance_rescale}, negative "
          f"{args.negative}), "
          f"{time.time() - t0:.0f} s\n")
    print(format_table(result))
    if args.json:
        payload = {"args": vars(args), "model_hash": info.model_hash, **result,
                   "phantom_nodule_mm": {str(k): v for k, v in result["phantom_nodule_mm"].items()}}
        atomic_write_text(args.json, json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
