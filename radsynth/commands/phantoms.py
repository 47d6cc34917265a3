"""``radsynth phantoms``: write procedural chest radiograph phantoms with report text (issue 6), or with
``--dims 3`` procedural chest CT volumes in Hounsfield units (issue 10)."""

from __future__ import annotations

import argparse

HELP = (
    "Write procedural frontal chest radiograph phantoms (PA view; normal, cardiomegaly, pleural "
    "effusion, nodule, pneumothorax, consolidation) as an imagefolder: 8-bit PNG files plus "
    "metadata.jsonl with report-style text and attributes (DESIGN.md section 3.1). Deterministic: "
    "image i depends only on --seed, i and --size. Useful as demo and test training data. With --dims 3: "
    "chest CT volumes (int16 HU NIfTI, RAS affine, qform = sform, descrip SYNTHETIC; lungs, heart, liver, "
    "aorta, spine; nodules and liver lesions with their size in the text) of --shape voxels per side."
)

EPILOG = """examples:
  radsynth phantoms --num-images 2000 --output data/phantoms
  radsynth phantoms --num-images 64 --output /tmp/phantoms128 --size 128 --seed 7
  radsynth phantoms --num-images 500 --output data/phantoms --overwrite
  radsynth phantoms --dims 3 --num-images 200 --shape 32 --output data/ct_phantoms
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``radsynth phantoms``."""
    from radsynth._args import int_in, seed

    parser.add_argument("--num-images", type=int_in(1, 10_000_000), required=True, metavar="N", help="number of phantoms to write")
    parser.add_argument("--output", required=True, metavar="DIR", help="output folder (created; must be empty)")
    parser.add_argument("--size", type=int_in(32, 4096), default=64, help="image height and width in pixels (default 64)")
    parser.add_argument("--seed", type=seed, default=0, help="base seed (default 0)")
    parser.add_argument("--dims", type=int, choices=[2, 3], default=2,
                        help="2 (default): radiograph PNGs; 3: CT volumes as NIfTI")
    parser.add_argument("--shape", type=int_in(8, 512), default=32, metavar="N",
                        help="--dims 3: voxels per side of each volume (default 32; 400 x 400 x 320 mm field of view)")
    parser.add_argument(
        "--overwrite", action="store_true", help="write into a non-empty folder, replacing earlier phantoms"
    )


def run(args: argparse.Namespace) -> int:
    """Write the folder; returns 0.

    Raises:
        FileExistsError: ``--dims 3`` into a non-empty folder without ``--overwrite``.
    """
    if args.dims == 3:
        return _run_volumes(args)
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


def _run_volumes(args: argparse.Namespace) -> int:
    """``--dims 3``: ``write_phantom_volumes`` into ``--output`` (empty, or replaced with ``--overwrite``)."""
    import shutil
    from pathlib import Path

    from generator.volumes.phantom import write_phantom_volumes

    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--output {str(out)!r} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not args.overwrite:
            raise FileExistsError(f"--output {str(out)!r} is not empty; pass --overwrite to replace its contents")
        for entry in out.iterdir():
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    write_phantom_volumes(out, args.num_images, shape=args.shape, seed=args.seed)
    print(f"wrote {args.num_images} CT phantom volumes ({args.shape}^3 int16 HU NIfTI) and metadata.jsonl to {out}")
    return 0
