"""``radsynth stress-test``: does a user's classifier break when one attribute of the image changes?"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

HELP = """Test a classifier on synthetic counterfactuals (issue 11).

A spec (YAML or JSON; write a commented example with --init-spec FILE) names a prompt template, the
attribute values to vary (every combination is a cell), the fixed values, the class each value should
get from the classifier, and the seeds. Every cell is generated from the same seeds, so the images of
one seed differ only in the varied attributes; with --images the user's own radiographs are edited
instead (SDEdit: partial noising and denoising under each cell's prompt, --keep-mask to protect a part).

The classifier (a TorchScript file, an ONNX file, or package.module:function taking a (B, 1, H, W)
float tensor in [0, 1] and returning a score per class) scores every image. The report gives per cell
and per attribute value accuracy, sensitivity, specificity and AUROC, per change of a value the flip
rate and mean score shift, gaps between values, all with bootstrap 95% CIs over seeds, and flags
effects whose CI lies beyond the spec's tolerance: OUTPUT/report.json and OUTPUT/report.html (with a
gallery of the most failed pairs). The images form an imagefolder in OUTPUT/images with generate's
manifest fields plus set_id, cell_id and the varied values; the same command again continues an
interrupted run (same images, same pairs), and another classifier can be tested on the same images.
--fail-under METRIC=VALUE exits with status 1 when a metric is below VALUE (for a model's CI)."""

EPILOG = """examples:
  # a commented example spec
  radsynth stress-test --init-spec stress.yaml

  # test a TorchScript model on counterfactuals of the bundled demo model
  radsynth stress-test --spec stress.yaml --classifier effusion.pt --output st/ --guidance-scale 3

  # a Python callable, 224 px input, fail the CI when the worst subgroup's accuracy is under 0.8
  radsynth stress-test --spec stress.yaml --classifier mypkg.models:predict --input-size 224 \\
      --output st/ --fail-under worst_subgroup_accuracy=0.8 --fail-under consistency.ci_low=0.9

  # ground-truth counterfactuals from procedural phantoms (no generator error)
  radsynth stress-test --spec stress.yaml --classifier effusion.pt --model phantoms --output st_ph/

  # edit real radiographs ("this radiograph, with a left pleural effusion"), privacy-gated
  radsynth stress-test --spec stress.yaml --classifier effusion.pt --model models/cxr \\
      --images my_normals/ --privacy-index idx/ --output st_edit/

fail-under metrics: auroc, accuracy, sensitivity, specificity, balanced_accuracy (overall),
worst_subgroup_accuracy, worst_cell_accuracy, consistency (1 - largest flip rate of a change that keeps
the expected class); add .ci_low or .ci_high to test a CI bound. Exit status: 0 pass, 1 a --fail-under
rule failed, 2 bad input. Seeds per CI width: docs/stress_test.md."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of ``radsynth stress-test``."""
    p.add_argument("--spec", default=None, metavar="FILE", help="stress-test spec (YAML or JSON)")
    p.add_argument("--init-spec", default=None, metavar="FILE", help="write a commented example spec and exit")
    p.add_argument("--classifier", default=None, metavar="MODEL",
                   help="TorchScript file, .onnx file (needs onnxruntime) or package.module:function")
    p.add_argument("--output", default=None, metavar="DIR", help="output folder (images, report.json, report.html)")
    p.add_argument("--model", default=None, metavar="GEN_MODEL",
                   help="generator model folder (default: the bundled demo model); 'phantoms' renders procedural phantoms")
    p.add_argument("--images", default=None, metavar="DIR",
                   help="edit these real images (any folder 'radsynth train' reads) instead of sampling from noise")
    p.add_argument("--keep-mask", default=None, metavar="PNG",
                   help="--images: white = keep the original pixel (one mask for all images; a keep_mask "
                        "metadata column gives one per image)")
    p.add_argument("--max-images", type=int, default=None, help="--images: use the first N images only")
    p.add_argument("--privacy-index", default=None, metavar="DIR", help="index from 'radsynth index': reject copies")
    p.add_argument("--input-size", type=int, default=None, metavar="N", help="resize images to N x N for the classifier")
    p.add_argument("--batch-size", type=int, default=32, help="images per classifier call (default 32)")
    p.add_argument("--sample-batch-size", type=int, default=8, help="images per generator call (default 8)")
    p.add_argument("--device", default=None, help="cpu | cuda[:N] (default: cuda when available)")
    p.add_argument("--threshold", type=float, default=None, help="override the spec's decision threshold")
    p.add_argument("--fail-under", action="append", default=[], metavar="METRIC=VALUE",
                   help="exit 1 when METRIC[.ci_low|.ci_high] is below VALUE (repeatable)")
    p.add_argument("--steps", type=int, default=25, help="sampler steps (default 25)")
    p.add_argument("--guidance-scale", type=float, default=2.0, help="classifier-free guidance (default 2)")
    p.add_argument("--sampler", default="dpm", help="dpm | ddim | euler | ddpm (default dpm)")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--phantom-size", type=int, default=64, help="--model phantoms: image side (default 64)")
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap replicates for the CIs (default 2000)")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast for the UNet")
    p.add_argument("--overwrite", action="store_true", help="replace another run's output (or an --init-spec file)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _load_images(args: argparse.Namespace, resolution: int) -> tuple[Any, list[str], list[int], Any]:
    """Real images for edits: ``(N, R, R)``, texts, labels (-1 unknown), keep masks or ``None``."""
    import numpy as np
    from PIL import Image

    from generator.data import load_dataset

    data = load_dataset(args.images, resolution=resolution, progress=not args.quiet)
    records = data.records[: args.max_images] if args.max_images else data.records
    if not records:
        raise ValueError(f"--images {args.images}: no usable image")
    images = np.stack([r.image for r in records]).astype(np.float32)
    texts = [r.text for r in records]
    labels = []
    for r in records:
        lab = r.attributes.get("label")
        labels.append(int(lab) if lab in (0, 1) else -1)

    def read_mask(path: Path, what: str) -> Any:
        if not path.is_file():
            raise FileNotFoundError(f"{what}: mask file not found: {path}")
        try:
            with Image.open(path) as im:
                m = im.convert("L").resize((resolution, resolution), Image.Resampling.BILINEAR)
        except OSError as exc:
            raise ValueError(f"{what}: {path} is not a readable image ({exc})") from None
        return np.asarray(m, dtype=np.float32) / 255.0

    per_image = [r.extra.get("keep_mask") for r in records]
    if args.keep_mask and any(per_image):
        raise ValueError("give --keep-mask or a keep_mask metadata column in --images, not both")
    masks = None
    if args.keep_mask:
        one = read_mask(Path(args.keep_mask), "--keep-mask")
        masks = np.repeat(one[None], len(records), axis=0)
    elif any(per_image):
        root = Path(args.images)
        blank = np.zeros((resolution, resolution), np.float32)  # no mask: edit everywhere
        masks = np.stack([read_mask(root / str(m), f"--images keep_mask of {r.file_name}") if m else blank
                          for m, r in zip(per_image, records)])
    return images, texts, labels, masks


def run(args: argparse.Namespace) -> int:
    """Run ``radsynth stress-test``; 0 pass, 1 a ``--fail-under`` rule failed."""
    from generator._utils import best_device
    from generator.stress import (
        PhantomSource, UserClassifier, load_spec, parse_fail_under, run_stress_test, write_example_spec,
    )

    if args.init_spec:
        path = write_example_spec(args.init_spec, overwrite=args.overwrite)
        print(f"wrote an example spec to {path}; edit it, then run: radsynth stress-test --spec {path} "
              "--classifier MODEL --output DIR")
        return 0
    for flag, value in (("--spec", args.spec), ("--classifier", args.classifier), ("--output", args.output)):
        if not value:
            raise ValueError(f"{flag} is required (or --init-spec FILE to write an example spec)")
    for flag, value, low in (("--batch-size", args.batch_size, 1), ("--sample-batch-size", args.sample_batch_size, 1),
                             ("--steps", args.steps, 1), ("--bootstrap", args.bootstrap, 100),
                             ("--phantom-size", args.phantom_size, 32)):
        if value < low:
            raise ValueError(f"{flag} must be >= {low}, got {value}")
    if args.max_images is not None and args.max_images < 1:
        raise ValueError(f"--max-images must be >= 1, got {args.max_images}")
    if args.keep_mask and not args.images:
        raise ValueError("--keep-mask applies to --images edits only")

    # 1. Everything that can be checked before a model is loaded: the spec and the rules.
    spec = load_spec(args.spec)
    if args.threshold is not None:
        from dataclasses import replace

        spec = replace(spec, threshold=args.threshold)
    rules = parse_fail_under(args.fail_under)
    for rule in rules:
        rule.requires(spec)
    device = args.device or best_device()
    if device == "mps":
        device = "cpu"

    # 2. The image source and its resolution, the classifier (probed at that resolution).
    phantoms = args.model == "phantoms"
    if phantoms:
        if args.images:
            raise ValueError("--images needs a diffusion model (--model MODEL_DIR), not --model phantoms")
        if args.privacy_index:
            raise ValueError("--privacy-index checks generated images; --model phantoms has no training data")
        source: Any = PhantomSource(args.phantom_size)
        source.check_prompts([c.prompt for c in spec.cells])
        resolution = args.phantom_size
    else:
        from generator.demo import resolve_model
        from generator.models.model_folder import read_model_info

        model_path = resolve_model(args.model)
        resolution = read_model_info(model_path).resolution
    classifier = UserClassifier.load(args.classifier, device=device, input_size=args.input_size,
                                     batch_size=args.batch_size, class_index=spec.class_index, probe_size=resolution)

    # 3. Real images, the generator (with its vocabulary check), the privacy gate.
    originals = texts = labels = masks = None
    if args.images:
        originals, texts, labels, masks = _load_images(args, resolution)
    gate = None
    if not phantoms:
        from generator.models.model_folder import load_pipeline
        from generator.models.samplers import make_sampler
        from generator.stress.sources import DiffusionSource

        pipe, info = load_pipeline(model_path, device=device)
        pipe.scheduler = make_sampler(args.sampler, pipe.scheduler)
        source = DiffusionSource(pipe, info, steps=args.steps, guidance_scale=args.guidance_scale,
                                 sampler=args.sampler, negative_prompt=args.negative_prompt, autocast_bf16=args.bf16)
        source.check_spec(spec)
        if args.privacy_index:
            from radsynth.commands._wiring import privacy_gate

            gate = privacy_gate(args.privacy_index, info.resolution)

    # 4. Images (continuing an interrupted run), scores, statistics, report.
    result = run_stress_test(
        spec, source, classifier, Path(args.output), originals=originals, original_texts=texts,
        original_labels=labels, keep_masks=masks, gate=gate, privacy_index=args.privacy_index, rules=rules,
        batch_size=args.sample_batch_size, n_boot=args.bootstrap, overwrite=args.overwrite, progress=not args.quiet,
    )
    s = result.report["summary"]
    made = result.made
    print(f"{made.written} images made, {made.skipped_done} already there, {made.rejected} rejected by the privacy "
          f"gate; {s['n_images']} scored ({s['seeds_per_cell']} seeds per cell)")
    overall = ", ".join(f"{k} {v['value']:.3f} [{v['ci_low']:.3f}, {v['ci_high']:.3f}]"
                        for k, v in s["overall"].items() if v.get("value") is not None and v.get("ci_low") is not None)
    print(f"overall: {overall}")
    for flag in s["flags"]:
        print(f"FLAG {flag['what']}: {flag['reason']}")
    if not s["flags"]:
        print(f"nothing flagged at tolerance {spec.tolerance}")
    for r in s["fail_under"]:
        print(f"--fail-under {r['rule']}: {r['value']} -> {'pass' if r['passed'] else 'FAIL'}")
    print(f"report: {result.report_json} and {result.report_html}")
    if not result.passed:
        print("radsynth stress-test: a --fail-under rule failed", file=sys.stderr)
        return 1
    return 0
