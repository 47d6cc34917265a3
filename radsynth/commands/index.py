"""``radsynth index``: build a memorization reference index from training data (DESIGN.md §4)."""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

HELP = (
    "Build the reference index that 'radsynth audit' and 'radsynth generate --privacy-index' compare "
    "synthetic images against. It stores the training images at one resolution, their perceptual "
    "hashes, a copy-detection embedding trained on them (no downloaded weights), and thresholds "
    "calibrated on real held-out images: each view's threshold is the (1 - alpha) quantile of "
    "held-out->train nearest similarity. The held-out set is --holdout, or else a patient-disjoint "
    "split of the training folder. The index CONTAINS TRAINING-DERIVED DATA: keep it like the "
    "training set, never inside a model folder or an export."
)

EPILOG = """examples:
  radsynth index --data data/train --output runs/index
  radsynth index --data data/train --holdout data/val --output runs/index --alpha 0.001
  radsynth index --data data/train --output runs/index --resolution 64 --overwrite
  radsynth index --data ct_train/ --holdout ct_val/ --output runs/ct_index --alpha 0.05 --spacing 2
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``radsynth index``."""
    from radsynth._args import existing_path, float_in, int_in, seed

    parser.add_argument("--data", required=True, type=existing_path, metavar="TRAIN_DIR",
                        help="training data folder (imagefolder with metadata.jsonl, or a DICOM folder)")
    parser.add_argument("--output", required=True, type=Path, metavar="INDEX_DIR",
                        help="index folder to write (a separate artifact: it holds training data)")
    parser.add_argument("--holdout", type=existing_path, metavar="HOLDOUT_DIR",
                        help="real images never used in training, for calibration "
                             "(default: a patient-disjoint split of --data)")
    parser.add_argument("--alpha", type=float_in(0.0, 0.5, lo_open=True), default=0.01,
                        help="false-flag rate for 'reject' (default 0.01; 0.001 to gate a release)")
    parser.add_argument("--review-alpha", type=float_in(0.0, 0.5, lo_open=True), default=0.05,
                        help="false-flag rate for 'review' (default 0.05)")
    parser.add_argument("--resolution", type=int_in(8, 1024), metavar="R",
                        help="resize images to R x R (default: the training images' size if all equal)")
    parser.add_argument("--holdout-fraction", type=float_in(0.0, 1.0, lo_open=True, hi_open=True), default=0.2,
                        help="share of patients held out when no --holdout is given (default 0.2)")
    parser.add_argument("--embedder-steps", type=int_in(0, 100_000), default=200,
                        help="training steps of the copy-detection embedding (default 200)")
    parser.add_argument("--seed", type=seed, default=0, help="seed for the split and the embedder")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing INDEX_DIR")
    parser.add_argument("--dims", type=int, choices=[2, 3], default=None,
                        help="2: images, 3: volumes (default: 3 when --data lists 3D NIfTI files or DICOM series)")
    parser.add_argument("--spacing", default=None, metavar="MM",
                        help="volumes: resample to this spacing in mm, one number or SLICE,ROW,COLUMN "
                             "(default: the training volumes' own); --resolution is then the cube side")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _resolution(records: list, given: int | None, what: str) -> int:
    if given is not None:
        return given
    shapes = Counter(tuple(r.image.shape) for r in records)
    if len(shapes) != 1:
        listed = ", ".join(f"{h}x{w} ({n})" for (h, w), n in shapes.most_common(4))
        raise ValueError(f"{what} images have different sizes ({listed}); pass --resolution R")
    (h, w), = shapes
    if h != w:
        raise ValueError(f"{what} images are {h}x{w}, not square; pass --resolution R to centre-crop and resize")
    return int(h)


def run(args: argparse.Namespace) -> int:
    """Build, calibrate and save the index; print a summary. Returns 0.

    A volume folder (``--dims 3``, or detected) takes :func:`radsynth.commands._volumes.run_index_3d`.
    """
    from radsynth.commands._volumes import is_volume_folder, run_index_3d

    dims = getattr(args, "dims", None)
    if dims == 3 or (dims is None and is_volume_folder(args.data)):
        return run_index_3d(args)
    if getattr(args, "spacing", None) is not None:
        raise ValueError(f"--spacing {args.spacing!r} applies to volumes only (--dims 3)")
    from generator.data import load_dataset
    from privacy.embedding import EmbedderConfig
    from privacy.index import ReferenceIndex

    if args.output.exists() and not args.overwrite:
        raise FileExistsError(f"{args.output} already exists; pass --overwrite to replace it")
    progress = not args.quiet
    train = load_dataset(args.data, resolution=args.resolution, progress=progress)
    if not train.records:
        raise ValueError(f"no usable training images in {args.data}")
    res = _resolution(train.records, args.resolution, "training")
    images = train.stack()
    ids = [r.file_name for r in train.records]
    pids = [r.patient_id for r in train.records]
    kwargs = {}
    if args.holdout is not None:
        hold = load_dataset(args.holdout, resolution=res, progress=progress)
        if not hold.records:
            raise ValueError(f"no usable held-out images in {args.holdout}")
        kwargs = dict(
            holdout_images=hold.stack(),
            holdout_ids=[f"holdout:{r.file_name}" for r in hold.records],
            holdout_patient_ids=[r.patient_id for r in hold.records],
        )
    previous = None
    if args.overwrite and args.output.is_dir():
        try:  # rebuilding on the same data reuses the trained embedder (recorded by fingerprint)
            previous = ReferenceIndex.load(args.output)
        except (FileNotFoundError, ValueError):
            previous = None
    index = ReferenceIndex.build(
        images, ids, pids, alpha=args.alpha, review_alpha=args.review_alpha,
        holdout_fraction=args.holdout_fraction,
        embedder_config=EmbedderConfig(steps=args.embedder_steps, seed=args.seed),
        seed=args.seed, progress=progress, previous=previous,
        holdout_name="--holdout " + str(args.holdout) if args.holdout is not None else "the held-out split of --data",
        # names only: an index may be moved, and its JSON should not reveal the training machine's paths
        info={"data": Path(args.data).name,
              "holdout_dir": None if args.holdout is None else Path(args.holdout).name,
              "data_fingerprint": train.fingerprint()},
        **kwargs,
    )
    index.save(args.output, overwrite=args.overwrite)
    h = index.holdout
    thr = index.thresholds()
    print(f"reference index: {len(ids)} training images at {res}x{res} -> {args.output}")
    print(f"calibration: {h['source']}")
    if h["split"]:
        print("  (no --holdout given: the held-out part is a split of the training folder; its images "
              "were added back to the references after calibration)")
    print(f"  null from {h['n_null']} held-out images; excluded: {len(h['excluded_same_patient'])} "
          f"sharing a patient with training, {len(h['excluded_duplicates'])} near-duplicates of a training image")
    if previous is not None and previous.embedder_fingerprint == index.embedder_fingerprint:
        print("  the copy-detection embedder of the previous index was reused (same images, same settings)")
    for warning in h.get("warnings", []):
        print(f"  warning: {warning}", file=sys.stderr)
    print("thresholds at alpha=%g: " % args.alpha + ", ".join(f"{k} {v:.4f}" for k, v in thr.items()))
    print(f"NOTE: {args.output} contains training-derived data (see its README.md); keep it with the "
          "training data, never inside a model folder or a synthetic dataset.")
    return 0
