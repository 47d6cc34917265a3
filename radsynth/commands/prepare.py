"""``radsynth prepare``: a training source -> a prepared dataset on disk (issue 9)."""

from __future__ import annotations

import argparse

HELP = """Prepare a training source once into a sharded dataset on disk, for archives too large for memory.

Reads any source that 'radsynth train' accepts (imagefolder with metadata.jsonl/csv, DICOM folder
with --reports-csv, NIfTI, MedMNIST .npz) in one streaming pass, centre-crops and area-resizes every
image to --resolution, and writes .npy shards at the source bit depth (uint16 where the source had
more than 8 bits), their metadata (text, attributes, patient id, file name), the intensity mapping,
the ingest report (report.jsonl: skipped files with reasons) and manifest.json (format version,
resolution, source fingerprint, per-shard SHA-256). Memory stays flat in the number of images; the
output is the same for any --workers. An interrupted run continues with --resume."""

EPILOG = """examples:
  radsynth prepare --data my_cxr/ --output prepared/cxr256 --resolution 256 --workers 4
  radsynth prepare --data my_cxr/ --output prepared/cxr256 --resolution 256 --workers 4 --resume
  radsynth prepare --data dicoms/ --reports-csv reports.csv --output prepared/ct --resolution 256
  radsynth prepare --data pneumoniamnist.npz --label-text "0=normal chest radiograph" \\
      --label-text "1=chest radiograph with pneumonia" --output prepared/pneu --resolution 64
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``radsynth prepare``."""
    from radsynth._args import existing_file, existing_path, float_in, int_in

    parser.add_argument("--data", required=True, type=existing_path, metavar="SRC",
                        help="imagefolder, DICOM folder or .npz file")
    parser.add_argument("--output", required=True, metavar="PREPARED_DIR", help="folder to write")
    parser.add_argument("--resolution", required=True, type=int_in(4, 8192), metavar="R",
                        help="image side in pixels after centre crop and area resize")
    parser.add_argument("--workers", type=int_in(1, 256), default=1, metavar="N",
                        help="worker processes (default 1); the output does not depend on it")
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted preparation (finished shards are kept when their "
                             "checksums and sources still match); on a finished one, check it")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier preparation in --output")
    parser.add_argument("--shard-size", type=int_in(1, 1_000_000), default=None, metavar="FILES",
                        help="source files (.npz: images) per shard (default: about 64 MiB of pixels)")
    parser.add_argument("--label-text", action="append", default=[], metavar="LABEL=TEXT",
                        help=".npz input: prompt text of a label (repeat per label)")
    parser.add_argument("--npz-split", default="train", help=".npz input: split to read (default train)")
    parser.add_argument("--reports-csv", type=existing_file, default=None,
                        help="DICOM folder input: CSV of report texts")
    parser.add_argument("--ct-window", type=float_in(-1e5, 1e5), nargs=2, default=(40.0, 400.0),
                        metavar=("CENTER", "WIDTH"), help="HU window for CT without a stored window (default 40 400)")
    parser.add_argument("--nifti-axis", type=int_in(0, 2), default=2,
                        help="NIfTI volumes: slicing axis after RAS+ reorientation (0 sagittal, 1 coronal, "
                             "2 axial; default 2)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Prepare the dataset; returns 0."""
    from radsynth._args import parse_label_text

    from generator.data.preparing import prepare

    if args.ct_window[1] <= 0:
        raise ValueError(f"--ct-window WIDTH must be > 0, got {args.ct_window[1]:g}")
    result = prepare(
        args.data,
        args.output,
        resolution=args.resolution,
        workers=args.workers,
        resume=args.resume,
        overwrite=args.overwrite,
        shard_size=args.shard_size,
        label_text=parse_label_text(args.label_text),
        npz_split=args.npz_split,
        reports_csv=args.reports_csv,
        ct_window=tuple(args.ct_window),
        nifti_axis=args.nifti_axis,
        progress=not args.quiet,
    )
    rate = result.count / result.seconds if result.seconds > 0 else float("inf")
    reused = f", {result.reused} kept from the earlier run" if result.reused else ""
    print(f"prepared {result.count} images in {result.shards} shards{reused} to {result.path} "
          f"({result.seconds:.1f} s, {rate:.0f} images/s); skipped {result.skipped} (see "
          f"{result.path / 'report.jsonl'}); data fingerprint {result.fingerprint[:16]}")
    return 0
