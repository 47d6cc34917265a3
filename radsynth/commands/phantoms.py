"""``radsynth phantoms``: write procedural chest radiograph phantoms with report text (issue 6)."""

from __future__ import annotations

import argparse

HELP = (
    "Write procedural frontal chest radiograph phantoms (PA view; normal, cardiomegaly, pleural "
    "effusion, nodule, pneumothorax, consolidation) as an imagefolder: 8-bit PNG files plus "
    "metadata.jsonl with report-style text and attributes (DESIGN.md section 3.1). Deterministic: "
    "image i depends only on --seed, i and --size. Useful as demo and test training data."
)

EPILOG = """examples:
  radsynth phantoms --num-images 2000 --output data/phantoms
  radsynth phantoms --num-images 64 --output /tmp/phantoms128 --size 128 --seed 7
  radsynth phantoms --num-images 500 --output data/phantoms --overwrite
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``radsynth phantoms``."""
    from radsynth._args import int_in, seed

    parser.add_argument("--num-images", type=int_in(1, 10_000_000), required=True, metavar="N", help="number of phantoms to write")
    parser.add_argument("--output", required=True, metavar="DIR", help="output folder (created; must be empty)")
    parser.add_argument("--size", type=int_in(32, 4096), default=64, help="image height and width in pixels (default 64)")
    parser.add_argument("--seed", type=seed, default=0, help="base seed (default 0)")
    parser.add_argument(
        "--overwrite", action="store_true", help="write into a non-empty folder, replacing earlier phantoms"
    )


def run(args: argparse.Namespace) -> int:
    """Write the folder; returns 0."""
    from tqdm import tqdm

    from generator.phantoms import write_phantom_folder

    with tqdm(total=args.num_images, desc="phantoms", unit="img", disable=None) as bar:
        out = write_phantom_folder(
            args.output,
            args.num_images,
            size=args.size,
            seed=args.seed,
            overwrite=args.overwrite,
            progress=bar.update,
        )
    print(f"wrote {args.num_images} phantoms ({args.size}x{args.size} PNG) and metadata.jsonl to {out}")
    return 0
