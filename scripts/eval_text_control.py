"""Does the text control the image? Measured on samples of a phantom-trained model (issue 6).

For each finding prompt, N images are generated and a classical measurement
(``generator.phantoms.measure``: cardiothoracic ratio, costophrenic angles, blob filter, ...) decides
whether each image shows what the prompt asked for. Two references are measured the same way, side by
side: rendered phantoms with the same attributes (what the measurement finds on the training
distribution) and the model's samples for the *normal* prompt (how often the finding appears when it
was not asked for). A paraphrase ("enlarged heart" for cardiomegaly) is tested too.

    python scripts/eval_text_control.py                     # bundled demo model, 32 images per prompt
    python scripts/eval_text_control.py --model /tmp/m --num-images 8 --guidance-scale 3
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

from conditioning.prompts import build_prompt  # noqa: E402
from generator.demo import bundled_model_path  # noqa: E402
from generator.models.model_folder import load_pipeline  # noqa: E402
from generator.models.samplers import make_sampler  # noqa: E402
from generator.phantoms import render_phantom  # noqa: E402
from generator.phantoms.measure import matches_prompt, measure  # noqa: E402

CONDITIONS: dict[str, list] = {
    "normal": [],
    "cardiomegaly": [{"name": "cardiomegaly"}],
    "left pleural effusion": [{"name": "pleural effusion", "location": "left", "size": "moderate"}],
    "right pleural effusion": [{"name": "pleural effusion", "location": "right", "size": "moderate"}],
    "nodule, right upper lobe": [{"name": "nodule", "location": "right upper lobe", "size_mm": 20}],
    "nodule, left lower lobe": [{"name": "nodule", "location": "left lower lobe", "size_mm": 20}],
    "right pneumothorax": [{"name": "pneumothorax", "location": "right", "size": "large"}],
    "consolidation, left lower lobe": [{"name": "consolidation", "location": "left lower lobe"}],
}
#: Paraphrases: (label, condition whose attributes are measured, prompt template with {who})
PARAPHRASES = [
    ("paraphrase: enlarged heart", "cardiomegaly", "PA chest x-ray, enlarged heart, {who}"),
    ("paraphrase: left pleural fluid", "left pleural effusion", "chest radiograph, {who}, moderate left pleural fluid"),
]


def _people(n: int, rng: np.random.Generator) -> list[dict]:
    return [{"sex": str(rng.choice(["F", "M"])), "age": int(rng.integers(30, 85))} for _ in range(n)]


def _all_ok(attrs: dict, img: np.ndarray) -> bool:
    ok = matches_prompt(measure(img), attrs)
    return bool(ok) and all(ok.values())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model folder (default: bundled demo model)")
    p.add_argument("--num-images", type=int, default=32, help="images per prompt")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance-scale", type=float, default=3.0)
    p.add_argument("--seed", type=int, default=1000)
    p.add_argument("--json", default=None, help="also write the results as JSON")
    args = p.parse_args(argv)
    pipe, info = load_pipeline(args.model or bundled_model_path(), device="cpu")
    pipe.scheduler = make_sampler("dpm", pipe.scheduler)
    rng = np.random.default_rng(args.seed)
    t0 = time.time()

    def sample(texts: list[str], base: int) -> np.ndarray:
        out = []
        for i in range(0, len(texts), 16):
            chunk = texts[i : i + 16]
            out.append(pipe(chunk, seeds=list(range(base + i, base + i + len(chunk))),
                            num_inference_steps=args.steps, guidance_scale=args.guidance_scale).images)
        return np.concatenate(out)

    people = _people(args.num_images, rng)
    samples: dict[str, tuple[list[dict], np.ndarray]] = {}
    for k, (name, findings) in enumerate(CONDITIONS.items()):
        attrs = [{"view": "PA", **pp, "findings": findings} for pp in people]
        samples[name] = (attrs, sample([build_prompt(a) for a in attrs], args.seed + 10_000 * k))
    normal_imgs = samples["normal"][1]
    rows = []
    for name, (attrs, imgs) in samples.items():
        shown = np.mean([_all_ok(a, im) for a, im in zip(attrs, imgs)])
        phantoms = np.mean([_all_ok(a, render_phantom(a, size=info.resolution, seed=50_000 + i).image)
                            for i, a in enumerate(attrs)])
        base = np.mean([_all_ok(a, im) for a, im in zip(attrs, normal_imgs)]) if name != "normal" else None
        rows.append({"prompt": name, "model": float(shown), "phantoms": float(phantoms),
                     "normal_prompt_base_rate": None if base is None else float(base)})
    for k, (label, cond, template) in enumerate(PARAPHRASES):
        attrs = [{"view": "PA", **pp, "findings": CONDITIONS[cond]} for pp in people]
        texts = [template.format(who=f"{a['age']} year old {'woman' if a['sex'] == 'F' else 'man'}") for a in attrs]
        imgs = sample(texts, args.seed + 500_000 + 10_000 * k)
        shown = np.mean([_all_ok(a, im) for a, im in zip(attrs, imgs)])
        base = np.mean([_all_ok(a, im) for a, im in zip(attrs, normal_imgs)])
        rows.append({"prompt": label, "model": float(shown), "phantoms": None, "normal_prompt_base_rate": float(base)})

    print(f"\nmodel {info.path} ({info.model_hash}), {args.num_images} images per prompt, "
          f"DPM-Solver++ {args.steps} steps, guidance {args.guidance_scale}, {time.time() - t0:.0f} s\n")
    print("| prompt | share of samples showing it | same measurement on phantoms | on samples of the normal prompt |")
    print("|---|---|---|---|")
    for r in rows:
        fmt = lambda v: "–" if v is None else f"{v:.2f}"  # noqa: E731
        print(f"| {r['prompt']} | {fmt(r['model'])} | {fmt(r['phantoms'])} | {fmt(r['normal_prompt_base_rate'])} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
