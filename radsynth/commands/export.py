"""``radsynth export``: convert an image folder to DICOM studies and/or NIfTI volumes."""

from __future__ import annotations

import argparse
import sys

from radsynth import __version__

HELP = (
    "Convert an imagefolder (PNG 8/16-bit + metadata.jsonl, e.g. from 'radsynth generate') to DICOM "
    "studies and/or NIfTI volumes whose headers say the images are synthetic. The input folder is left "
    "untouched; OUTPUT gets dicom/, nifti/ and export_manifest.jsonl (file_name -> dicom_file, nifti_file)."
)

EPILOG = """examples:
  radsynth export --input samples/ --format dicom --output exported/
  radsynth export --input samples/ --format dicom --format nifti --output exported/ --modality DX
  radsynth export --input ct_slices/ --format dicom --output ct_out/ --modality CT --images-per-study 4
  radsynth export --input samples/ --format nifti --output exported/ --overwrite

The modality comes from --modality, else from the first metadata line (attributes.modality or the
intensity mapping), else DX. DX/CR are written as Digital X-Ray (For Presentation), CT as CT Image
and MR as MR Image storage; every file has Synthetic Data = YES and an invented patient.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``export`` options to ``parser``."""
    parser.add_argument("--input", required=True, metavar="IMAGEFOLDER", help="folder with images and metadata.jsonl")
    parser.add_argument(
        "--format",
        dest="formats",
        action="append",
        required=True,
        choices=("dicom", "nifti"),
        help="output format; repeat for several (--format dicom --format nifti)",
    )
    parser.add_argument("--output", required=True, metavar="DIR", help="output folder")
    parser.add_argument(
        "--modality",
        type=str.upper,
        choices=("DX", "CR", "CT", "MR"),
        default=None,
        help="modality of every image (default: from the metadata, else DX)",
    )
    parser.add_argument(
        "--images-per-study",
        type=int,
        default=1,
        metavar="K",
        help="group K consecutive images into one DICOM study of one synthetic patient (default 1)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")


def run(args: argparse.Namespace) -> int:
    """Export; returns 0 on success (errors raise ValueError/FileNotFoundError/FileExistsError)."""
    from exporters.folder import export_imagefolder

    if args.images_per_study < 1:
        raise ValueError(f"--images-per-study={args.images_per_study}: expected an integer >= 1")

    def progress(done: int) -> None:
        if done % 100 == 0:
            print(f"  {done} images exported", file=sys.stderr)

    summary = export_imagefolder(
        args.input,
        args.output,
        args.formats,
        modality=args.modality,
        images_per_study=args.images_per_study,
        overwrite=args.overwrite,
        software_name="RadSynth",
        software_version=__version__,
        on_image=progress,
    )
    counts = ", ".join(f"{n} {fmt} files" for fmt, n in summary.files.items())
    print(
        f"exported {summary.images} images as {summary.modality} ({counts}) to {args.output}; "
        f"manifest {summary.manifest}"
    )
    return 0
