"""Benchmark of ``radsynth stress-test`` (issue 11): does it find planted defects, and not a fair model?

Three classifiers of "pleural effusion", each a model the stress test knows nothing about:

(a) ``shortcut``: reads the mean brightness of the lower half of the image, its threshold fitted on
    phantoms where effusion is confounded with sex (every positive a man, every negative a woman); a
    TorchScript file.
(b) ``left_blind``: the classical measurement counting the patient's right side only (blind to the left
    hemithorax); a Python callable.
(c) ``fair``: the classical measurement :func:`generator.phantoms.measure` of both sides wrapped as a
    model; a Python callable.

Spec: "frontal chest radiograph, {finding}, 60 year old {sex}", finding in {no acute findings, moderate
left pleural effusion, moderate right pleural effusion} (labels 0/1/1) x sex in {woman, man}; ``--seeds``
seeds per cell; ``regions: phantom``. Sources: ``phantoms`` (exact counterfactuals, no generator error)
and ``demo`` (the bundled demo model, DPM-Solver++ ``--steps`` steps, the demo's guidance from its ``radsynth.json``). Expected: (a) flagged
by its flip rate under the sex change, (b) by the left-vs-right sensitivity gap, (c) not flagged.

    OMP_NUM_THREADS=1 python scripts/bench_stress.py --threads 1 --seeds 32 --out bench_stress
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from generator._utils import torch_threads
from generator.demo import bundled_model_path, demo_settings
from generator.phantoms import render_phantom
from generator.stress import PhantomSource, StressSpec, UserClassifier, run_stress_test
from generator.stress.reference_models import BrightnessShortcut

FINDINGS = ["no acute findings", "moderate left pleural effusion", "moderate right pleural effusion"]
CLASSIFIERS = {
    "shortcut": None,  # TorchScript file written below
    "left_blind": "generator.stress.reference_models:left_blind_effusion",
    "fair": "generator.stress.reference_models:fair_effusion",
}


def make_spec(seeds: int) -> StressSpec:
    return StressSpec.from_mapping({
        "prompt": "frontal chest radiograph, {finding}, {age} year old {sex}",
        "vary": {"finding": FINDINGS, "sex": ["woman", "man"]},
        "fixed": {"age": 60},
        "labels": {"finding": dict(zip(FINDINGS, [0, 1, 1]))},
        "seeds": seeds, "base_seed": 1000, "regions": "phantom",
    })


def shortcut_file(out: Path, size: int = 64, n: int = 60) -> Path:
    """Fit the brightness shortcut on confounded phantoms (seeds 5000+, none shared with the test)."""
    images, labels = [], []
    for s in range(5000, 5000 + n):
        side = "right" if s % 2 else "left"
        images.append(render_phantom({"sex": "M", "age": 60, "findings": [
            {"name": "pleural effusion", "location": side, "size": "moderate"}]}, size=size, seed=s).image)
        labels.append(1)
        images.append(render_phantom({"sex": "F", "age": 60, "findings": []}, size=size, seed=s).image)
        labels.append(0)
    path = out / "shortcut.pt"
    torch.jit.save(torch.jit.script(BrightnessShortcut.fit(np.stack(images), np.array(labels))), str(path))
    return path


def row(source: str, name: str, report: dict, seconds: float) -> dict:
    pairs = {(p["attribute"], p["from"], p["to"]): p for p in report["pairs"]}
    gaps = {(g["attribute"], g["a"], g["b"], g["metric"]): g for g in report["gaps"]}
    s = report["summary"]
    return {
        "source": source, "classifier": name, "seeds_per_cell": s["seeds_per_cell"], "images": s["n_images"],
        "auroc": s["overall"].get("auroc"), "accuracy": s["overall"]["accuracy"],
        "sex_flip_rate": pairs[("sex", "woman", "man")]["flip_rate"],
        "sex_score_shift": pairs[("sex", "woman", "man")]["score_shift"],
        "left_right_flip_rate": pairs[("finding", FINDINGS[1], FINDINGS[2])]["flip_rate"],
        "left_right_sensitivity_gap": gaps[("finding", FINDINGS[1], FINDINGS[2], "sensitivity")]["gap"],
        "ssim_outside_left": pairs[("finding", FINDINGS[0], FINDINGS[1])].get("ssim_outside"),
        "mad_outside_left": pairs[("finding", FINDINGS[0], FINDINGS[1])].get("mean_abs_diff_outside"),
        "mad_left": pairs[("finding", FINDINGS[0], FINDINGS[1])].get("mean_abs_diff"),
        "flags": [f"{f['kind']}: {f['what']}" for f in s["flags"]], "seconds": round(seconds, 1),
    }


def fmt(m: dict | None) -> str:
    if not m or m.get("value") is None:
        return "–"
    return f"{m['value']:.2f} [{m['ci_low']:.2f}, {m['ci_high']:.2f}]"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=32, help="seeds per cell (default 32)")
    p.add_argument("--steps", type=int, default=20, help="sampler steps of the demo model (default 20)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--sources", default="phantoms,demo", help="comma list of phantoms, demo")
    p.add_argument("--bootstrap", type=int, default=2000)
    p.add_argument("--out", default="bench_stress", help="output folder")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    spec = make_spec(args.seeds)
    rows = []
    with torch_threads(args.threads):
        CLASSIFIERS["shortcut"] = str(shortcut_file(out))
        for source_name in args.sources.split(","):
            t0 = time.perf_counter()
            if source_name == "phantoms":
                source = PhantomSource(64)
            elif source_name == "demo":
                from generator.models.model_folder import load_pipeline
                from generator.models.samplers import make_sampler
                from generator.stress.sources import DiffusionSource

                pipe, info = load_pipeline(bundled_model_path(), device="cpu")
                pipe.scheduler = make_sampler("dpm", pipe.scheduler)
                guidance = float(demo_settings(info.path)[1]["guidance_scale"])  # the demo's, from radsynth.json
                source = DiffusionSource(pipe, info, steps=args.steps, guidance_scale=guidance)
                source.check_spec(spec)
            else:
                raise ValueError(f"--sources: unknown source {source_name!r} (phantoms, demo)")
            folder = out / source_name
            for name, ref in CLASSIFIERS.items():
                clf = UserClassifier.load(ref, probe_size=source.resolution)
                result = run_stress_test(spec, source, clf, folder, n_boot=args.bootstrap, progress=False)
                rows.append(row(source_name, name, result.report, time.perf_counter() - t0))
                (folder / f"report_{name}.json").write_text(json.dumps(result.report, indent=1))
                (folder / f"report_{name}.html").write_text((folder / "report.html").read_text())
                t0 = time.perf_counter()
                r = rows[-1]
                print(f"{source_name:8s} {name:10s} flags={r['flags']} sex flip {fmt(r['sex_flip_rate'])} "
                      f"L-R sens gap {fmt(r['left_right_sensitivity_gap'])} ({r['seconds']} s)", flush=True)
    meta = {"threads": args.threads, "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "seeds_per_cell": args.seeds, "steps": args.steps, "bootstrap": args.bootstrap, "torch": torch.__version__}
    (out / "bench_stress.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = ["| source | classifier | AUROC | sex flip rate | sex score shift | L→R flip rate | "
             "L−R sensitivity gap (R − L) | flagged | s |", "|---|---|---|---|---|---|---|---|---:|"]
    for r in rows:
        flagged = "; ".join(r["flags"]) or "nothing"
        lines.append(f"| {r['source']} | {r['classifier']} | {fmt(r['auroc'])} | {fmt(r['sex_flip_rate'])} | "
                     f"{fmt(r['sex_score_shift'])} | {fmt(r['left_right_flip_rate'])} | "
                     f"{fmt(r['left_right_sensitivity_gap'])} | {flagged} | {r['seconds']} |")
    (out / "bench_stress.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(json.dumps(meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
