"""``radsynth export``: convert an image folder to DICOM studies and/or NIfTI volumes."""

from __future__ import annotations

import argparse
import difflib
import sys

from radsynth import __version__

HELP = (
    "Convert an imagefolder (PNG 8/16-bit or NIfTI volumes + metadata.jsonl, e.g. from 'radsynth generate') "
    "to DICOM studies and/or NIfTI volumes whose headers say the images are synthetic. The input folder is "
    "left untouched; OUTPUT gets dicom/, nifti/ and export_manifest.jsonl (file_name -> dicom_file, nifti_file). "
    "Every metadata row is checked before anything is written; an interrupted export continues when the "
    "same command is run again."
)

EPILOG = """examples:
  radsynth export --input samples/ --format dicom --output exported/
  radsynth export --input samples/ --format dicom --format nifti --output exported/ --modality DX
  radsynth export --input ct_slices/ --format dicom --output ct_out/ --modality CT --images-per-study 4
  radsynth export --input samples/ --format nifti --output exported/ --overwrite

The modality comes from --modality, else from the first metadata line (attributes.modality or the
intensity mapping), else DX. DX/CR are written as Digital X-Ray (For Presentation), CT as CT Image
and MR as MR Image storage; every file has Synthetic Data = YES and an invented patient. A file_name
ending in .nii or .nii.gz is a volume: one CT/MR series (geometry from its affine) and one NIfTI.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``export`` options to ``parser`` (values are checked in :func:`run`, so a bad value
    gives one ``radsynth export: error: ...`` line)."""
    parser.add_argument("--input", required=True, metavar="IMAGEFOLDER", help="folder with images and metadata.jsonl")
    parser.add_argument(
        "--format",
        dest="formats",
        action="append",
        required=True,
        metavar="{dicom,nifti}",
        help="output format; repeat for several (--format dicom --format nifti)",
    )
    parser.add_argument("--output", required=True, metavar="DIR", help="output folder (not inside --input)")
    parser.add_argument(
        "--modality",
        default=None,
        metavar="{DX,CR,CT,MR}",
        help="modality of every image (default: from the metadata, else DX); volumes need CT or MR",
    )
    parser.add_argument(
        "--images-per-study",
        default="1",
        metavar="K",
        help="group K consecutive images into one DICOM study of one synthetic patient (default 1)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a previous export in --output (without it, only the same command may continue there)",
    )


def _choice(flag: str, value: str, choices: tuple[str, ...]) -> str:
    """``value`` if it is one of ``choices`` (case-insensitive), else ValueError with a suggestion."""
    if value.lower() in (c.lower() for c in choices):
        return next(c for c in choices if c.lower() == value.lower())
    lower = {c.lower(): c for c in choices}
    close = difflib.get_close_matches(value.lower(), list(lower), n=1)
    hint = f"; did you mean {lower[close[0]]!r}?" if close else ""
    raise ValueError(f"{flag} {value!r}: expected one of {', '.join(choices)}{hint}")


def run(args: argparse.Namespace) -> int:
    """Export; returns 0 on success.

    Raises:
        ValueError: a bad option value, metadata row or image (the CLI exits 2).
        FileNotFoundError: missing input (exit 2).
        FileExistsError: --output is a file or holds another export (exit 2).
        PermissionError: --output cannot be written.
    """
    from exporters.folder import FORMATS, export_imagefolder

    formats = [_choice("--format", f, FORMATS) for f in args.formats]
    modality = None if args.modality is None else _choice("--modality", args.modality, ("DX", "CR", "CT", "MR"))
    try:
        images_per_study = int(str(args.images_per_study).strip())
    except ValueError:
        images_per_study = 0
    if not 1 <= images_per_study <= 100_000:
        raise ValueError(f"--images-per-study {args.images_per_study!r}: expected an integer in [1, 100000]")

    def progress(done: int) -> None:
        if done % 100 == 0:
            print(f"  {done} images exported", file=sys.stderr)

    summary = export_imagefolder(
        args.input,
        args.output,
        formats,
        modality=modality,
        images_per_study=images_per_study,
        overwrite=args.overwrite,
        software_name="RadSynth",
        software_version=__version__,
        on_image=progress,
    )
    counts = ", ".join(f"{n} {fmt} files" for fmt, n in summary.files.items())
    resumed = f" ({summary.resumed} done by an earlier run)" if summary.resumed else ""
    print(
        f"exported {summary.images} images{resumed} as {summary.modality} ({counts}) to {args.output}; "
        f"manifest {summary.manifest}"
    )
    if summary.truncated:
        cuts = ", ".join(f"{key} {n}x" for key, n in sorted(summary.truncated.items()))
        print(f"note: over-long DICOM text cut to its VR maximum length: {cuts}")
    return 0
