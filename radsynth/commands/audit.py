"""``radsynth audit``: audit a folder of synthetic images for copies of training images.

Under ``torchrun`` / ``accelerate launch`` the images are split across the processes: process ``r`` of
``N`` audits images ``i`` with ``i % N == r`` and writes its verdicts (lossless JSON, atomically) into
the hidden folder ``<synthetic>/.radsynth-audit-parts/``; after a barrier the main process reads them,
merges them in image order, writes the one JSON/HTML report and the one manifest update, and deletes
the folder. The planted-copy self-test runs on the last process while the others audit. With one
process the audit runs as before, in one call of :func:`privacy.audit.audit_images`.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

HELP = (
    "Compare every image of a synthetic imagefolder with the training images of a reference index "
    "(built by 'radsynth index') and give each a verdict: keep, review or reject, with the reasons, "
    "its nearest training images per view, an empirical p-value against real held-out images and the "
    "nearest/second-nearest ratio. The verdict fields are added to the folder's metadata.jsonl "
    "(rewritten atomically, other fields kept). A dataset summary (copy rate, share of training "
    "images copied, similarity quantiles against held-out images, expected chance flags) is printed "
    "and written with --json; --html writes a review page showing each flagged image beside its "
    "nearest training images. A passed audit is not a privacy guarantee: only differentially "
    "private training gives one. Under torchrun or accelerate launch the images are split across the "
    "processes and the main process writes one report, the same as a single process would."
)

EPILOG = """examples:
  radsynth audit --index runs/index --synthetic runs/samples
  radsynth audit --index runs/index --synthetic runs/samples --alpha 0.001 --json audit.json --html audit.html

  # split across 4 processes (one report, written by the main process)
  torchrun --nproc_per_node 4 -m radsynth audit --index runs/index --synthetic runs/samples --json audit.json
"""

_IMAGE_ENDINGS = (".png", ".jpg", ".jpeg", ".dcm", ".nii", ".nii.gz", ".tif", ".tiff")
#: Hidden folder in the synthetic folder holding the per-process verdicts of a split audit.
PARTS_DIR = ".radsynth-audit-parts"


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
    """Audit the folder; print the summary. Returns 0 (also when images are flagged).

    Several processes (``torchrun``/``accelerate launch``) split the images; only the main process
    writes the report, updates the manifest and prints. A volume index (``radsynth index`` of volumes)
    takes :func:`radsynth.commands._volumes.run_audit_3d`.
    """
    from privacy.volumes import is_volume_index

    if is_volume_index(args.index):
        from radsynth.commands._volumes import run_audit_3d

        return run_audit_3d(args)
    from accelerate import PartialState

    from generator._utils import cpu_only
    from generator.data import load_dataset
    from generator.manifest import update_fields
    from privacy.audit import audit_images
    from privacy.index import ReferenceIndex
    from privacy.report import write_html, write_json

    state = PartialState(cpu=cpu_only())
    main = state.is_main_process
    index = ReferenceIndex.load(args.index)
    folder = args.synthetic
    if not folder.is_dir():
        raise FileNotFoundError(f"synthetic folder {folder} does not exist")
    if not any(p.is_file() and p.name.lower().endswith(_IMAGE_ENDINGS) for p in folder.rglob("*")):
        raise ValueError(f"synthetic folder {folder} is empty: it holds no image files")
    data = load_dataset(folder, progress=not args.quiet and main)
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
    if state.num_processes == 1:
        result = audit_images(index, images, names, alpha=args.alpha, self_test=not args.no_self_test,
                              progress=not args.quiet)
    else:
        split = _audit_split(state, index, images, names, folder, alpha=args.alpha,
                             self_test=not args.no_self_test, progress=not args.quiet and main)
        if split is None:  # not the main process: its verdicts are in the main process's report
            return 0
        result = split
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


def _audit_split(state: Any, index: Any, images: Any, names: list[str], folder: Path, *,
                 alpha: float | None, self_test: bool, progress: bool) -> Any:
    """This process's share of the audit; on the main process the merged ``AuditResult``, else ``None``.

    Process ``r`` of ``N`` audits images ``r, r + N, ...`` and writes ``rank-<r>.json`` (positions
    and lossless verdict records) atomically into ``folder/PARTS_DIR``; the last process also runs
    the planted-copy self-test. After a barrier the main process reads all ``N`` files, merges them
    in image order (:func:`privacy.audit.merge_verdict_parts`) and deletes the folder.

    Args:
        state: ``accelerate.PartialState`` of the launched group.
        index: The loaded ``ReferenceIndex``.
        images: ``(Q, R, R)`` float32 images in ``[0, 1]`` (all of them, on every process).
        names: ``(Q,)`` file names.
        folder: The synthetic folder (holds the hidden parts folder while the audit runs).
        alpha: Reject false-flag rate (``None``: the index's).
        self_test: Include the planted-copy self-test.
        progress: Show progress bars.

    Raises:
        ValueError: a part file is missing, damaged or from another audit (the message names it).
    """
    from generator.manifest import atomic_write_text
    from privacy.audit import (
        PART_FORMAT,
        audit_verdicts,
        merge_verdict_parts,
        planted_copy_self_test,
        verdict_from_record,
        verdict_to_record,
    )

    rank, world, n = state.process_index, state.num_processes, len(names)
    parts_dir = folder / PARTS_DIR
    state.wait_for_everyone()  # every process has read the folder before the parts folder appears
    if state.is_main_process:
        shutil.rmtree(parts_dir, ignore_errors=True)  # left by an audit that was killed
        parts_dir.mkdir()
    state.wait_for_everyone()
    mine = list(range(rank, n, world))
    verdicts = audit_verdicts(index, images[mine], [names[i] for i in mine], alpha=alpha, progress=progress)
    part: dict[str, Any] = {
        "format": PART_FORMAT, "rank": rank, "num_processes": world, "n_images": n,
        "positions": mine, "verdicts": [verdict_to_record(v) for v in verdicts],
    }
    if self_test and rank == world - 1:
        a = index.alpha if alpha is None else float(alpha)
        part["self_test"] = planted_copy_self_test(index, alpha=a)
    atomic_write_text(parts_dir / f"rank-{rank:05d}.json", json.dumps(part))
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    parts, tested = [], None
    for r in range(world):
        path = parts_dir / f"rank-{r:05d}.json"
        try:
            got = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"audit part {path} is missing or damaged ({exc})") from None
        if not isinstance(got, dict) or got.get("format") != PART_FORMAT or got.get("rank") != r \
                or got.get("num_processes") != world or got.get("n_images") != n:
            raise ValueError(f"audit part {path} does not belong to this audit of {n} images by {world} processes")
        parts.append((got["positions"], [verdict_from_record(rec) for rec in got["verdicts"]]))
        tested = got.get("self_test", tested)
    result = merge_verdict_parts(index, parts, n, self_test=tested if self_test else False)
    shutil.rmtree(parts_dir, ignore_errors=True)
    return result
