"""``radsynth audit``: audit a folder of synthetic images for copies of training images."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HELP = (
    "Compare every image of a synthetic imagefolder with the training images of a reference index "
    "(built by 'radsynth index') and give each a verdict: keep, review or reject, with the reasons, "
    "its nearest training images per view, an empirical p-value against real held-out images and the "
    "nearest/second-nearest ratio. The verdict fields are added to the folder's metadata.jsonl "
    "(rewritten atomically, other fields kept). A dataset summary (copy rate, share of training "
    "images copied, similarity quantiles against held-out images, expected chance flags) is printed "
    "and written with --json; --html writes a review page showing each flagged image beside its "
    "nearest training images. A passed audit is not a privacy guarantee: only differentially "
    "private training gives one."
)

EPILOG = """examples:
  radsynth audit --index runs/index --synthetic runs/samples
  radsynth audit --index runs/index --synthetic runs/samples --alpha 0.001 --json audit.json --html audit.html
"""

_IMAGE_ENDINGS = (".png", ".jpg", ".jpeg", ".dcm", ".nii", ".nii.gz", ".tif", ".tiff")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``radsynth audit``."""
    from radsynth._args import existing_dir, float_in, new_file

    parser.add_argument("--index", required=True, type=existing_dir, metavar="INDEX_DIR",
                        help="reference index folder written by 'radsynth index'")
    parser.add_argument("--synthetic", required=True, type=existing_dir, metavar="DIR",
                        help="synthetic imagefolder (images + metadata.jsonl)")
    parser.add_argument("--alpha", type=float_in(0.0, 0.5, lo_open=True),
                        help="false-flag rate for 'reject' (default: the index's alpha)")
    parser.add_argument("--json", type=new_file, metavar="FILE", help="write the full audit as JSON")
    parser.add_argument("--html", type=new_file, metavar="FILE",
                        help="write the review page (contains training images: keep it with the index)")
    parser.add_argument("--no-self-test", action="store_true", help="skip the planted-copy self-test")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    """Audit the folder; print the summary. Returns 0 (also when images are flagged)."""
    from generator.data import load_dataset
    from generator.manifest import update_fields
    from privacy.audit import audit_images
    from privacy.index import ReferenceIndex
    from privacy.report import write_html, write_json

    index = ReferenceIndex.load(args.index)
    folder = args.synthetic
    if not folder.is_dir():
        raise FileNotFoundError(f"synthetic folder {folder} does not exist")
    if not any(p.is_file() and p.name.lower().endswith(_IMAGE_ENDINGS) for p in folder.rglob("*")):
        raise ValueError(f"synthetic folder {folder} is empty: it holds no image files")
    data = load_dataset(folder, progress=not args.quiet)
    if not data.records:
        raise ValueError(f"synthetic folder {folder} is empty: no usable images were read")
    res = index.resolution
    wrong = [r for r in data.records if tuple(r.image.shape) != (res, res)]
    if wrong:
        h, w = wrong[0].image.shape
        raise ValueError(
            f"synthetic image {wrong[0].file_name} is {h}x{w} pixels but the index {args.index} was built at "
            f"{res}x{res}; rebuild the index with 'radsynth index --resolution {h}' or generate at {res} px"
        )
    images = data.stack()
    names = [r.file_name for r in data.records]
    result = audit_images(index, images, names, alpha=args.alpha, self_test=not args.no_self_test,
                          progress=not args.quiet)
    s = result.summary
    n_updated = 0
    if (folder / "metadata.jsonl").is_file():
        n_updated = update_fields(folder, {v.file_name: v.manifest_fields() for v in result.images})
    if args.json:
        write_json(result, args.json)
    if args.html:
        write_html(result, index, images, args.html)
    c = s["counts"]
    print(f"audited {s['n_images']} images against {s['n_references']} training images at {res}x{res}")
    print(f"  keep {c['keep']}, review {c['review']}, reject {c['reject']} "
          f"(copy rate {s['copy_rate']:.4f}; expected by chance at alpha={s['alpha']:g}: "
          f"{s['expected_chance_flags']['reject']:.2f})")
    print(f"  training images copied: {s['training_images_copied']} "
          f"({100 * s['share_training_images_copied']:.2f}% of the training set)")
    if "training_patients_copied" in s:
        print(f"  training patients copied: {s['training_patients_copied']} "
              f"({100 * s['share_training_patients_copied']:.2f}%)")
    print(f"  authenticity share: {s['authenticity_share']:.3f}; calibration: {s['holdout'].get('source')}")
    if "self_test" in s:
        print("  planted-copy self-test (share rejected): "
              + ", ".join(f"{k} {v:.2f}" for k, v in s["self_test"].items()))
    if (folder / "metadata.jsonl").is_file():
        print(f"  verdict fields added to {n_updated} lines of {folder / 'metadata.jsonl'}")
    else:
        print(f"  {folder} has no metadata.jsonl: verdicts are only in the report")
    for path in (args.json, args.html):
        if path:
            print(f"  wrote {path}")
    print(s["statement"])
    return 0
