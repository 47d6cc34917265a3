"""One stress test from start to finish: images (resumable), scores, statistics, report.

:func:`run_stress_test` is what ``radsynth stress-test`` calls once every input has been checked. The
output folder holds ``images/`` (the counterfactual imagefolder), ``scores.csv`` (one row per image),
``report.json``, ``report.html`` and ``generation.json`` (the fingerprint of what determines the pixels).
The fingerprint leaves out the classifier, the labels, the threshold and the tolerance: the same
output folder can test several models on the same images, and a changed spec that keeps the prompts and
seeds does not remake them.
"""

from __future__ import annotations

import csv
import hashlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from generator.generation import Gate, prepare_output
from generator.manifest import atomic_write_text
from generator.stress.classifier import UserClassifier
from generator.stress.counterfactuals import CounterfactualFolder, ImageSource, MakeSummary
from generator.stress.regions import RegionMaps
from generator.stress.report import FailRule, build_report, write_report
from generator.stress.spec import StressSpec
from generator.stress.statistics import analyse

__all__ = ["StressResult", "run_stress_test", "SCORES_CSV"]

SCORES_CSV = "scores.csv"


@dataclass
class StressResult:
    """What :func:`run_stress_test` produced.

    Attributes:
        report: The ``report.json`` content.
        report_json: Its path.
        report_html: Path of ``report.html``.
        made: What the image step did (written / already there / rejected by the privacy gate).
    """

    report: dict[str, Any]
    report_json: Path
    report_html: Path
    made: MakeSummary

    @property
    def passed(self) -> bool:
        """All ``--fail-under`` rules hold."""
        return bool(self.report["summary"]["passed"])


def _array_hash(arr: np.ndarray | None) -> str | None:
    if arr is None:
        return None
    return hashlib.sha256(np.ascontiguousarray(arr, dtype="<f4").tobytes()).hexdigest()[:16]


def run_stress_test(
    spec: StressSpec,
    source: ImageSource,
    classifier: UserClassifier,
    output: str | Path,
    *,
    originals: np.ndarray | None = None,
    original_texts: Sequence[str] | None = None,
    original_labels: Sequence[int] | None = None,
    keep_masks: np.ndarray | None = None,
    gate: Gate | None = None,
    privacy_index: str | None = None,
    rules: Sequence[FailRule] = (),
    batch_size: int = 8,
    n_boot: int = 2000,
    bootstrap_seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
) -> StressResult:
    """Make the counterfactuals (or finish an interrupted run), score them and write the report.

    Args:
        spec: The validated spec.
        source: Makes the images (:class:`~generator.stress.sources.DiffusionSource` or
            :class:`~generator.stress.phantom_source.PhantomSource`).
        classifier: The loaded model under test.
        output: Output folder (created; must be empty or hold this run).
        originals: ``(N, H, W)`` real images to edit at the source's resolution (``None``: from noise).
        original_texts: Their texts.
        original_labels: Their 0/1 labels (-1 unknown).
        keep_masks: ``(N, H, W)`` in ``[0, 1]`` (1 = keep the original pixel), or ``None``.
        gate: Privacy gate, or ``None``.
        privacy_index: The index folder behind ``gate`` (recorded in the fingerprint).
        rules: ``--fail-under`` rules.
        batch_size: Images per generator call.
        n_boot: Bootstrap replicates.
        bootstrap_seed: Seed of the bootstrap.
        overwrite: Replace another run's output.
        progress: Progress bars.

    Returns:
        A :class:`StressResult`.

    Raises:
        FileExistsError: ``output`` holds another run and ``overwrite`` is false.
        ValueError: the classifier misbehaves on an image.
    """
    output = Path(output)
    fields = source.manifest_fields()
    settings = {
        "stress_test": 1, "prompts": [c.prompt for c in spec.cells], "seeds": list(spec.seeds),
        "generator": {k: fields.get(k) for k in ("model", "sampler", "steps", "guidance_scale", "negative_prompt")},
        "resolution": int(source.resolution), "privacy_index": privacy_index,
        "images": _array_hash(originals), "keep_masks": _array_hash(keep_masks),
        "strength": spec.strength if originals is not None else None,
    }
    prepare_output(output, settings, [], overwrite=overwrite)
    folder = CounterfactualFolder(output, spec, source, originals=originals, original_texts=original_texts,
                                  original_labels=original_labels, keep_masks=keep_masks, gate=gate,
                                  batch_size=batch_size, progress=progress)
    made = folder.make()
    table = folder.table()
    present = table.present
    s_idx, c_idx = np.nonzero(present)
    scores = np.full(present.shape, np.nan)
    names = [table.files[s][c] or "" for s, c in zip(s_idx, c_idx)]
    if len(s_idx):
        scores[s_idx, c_idx] = classifier.scores(table.images[s_idx, c_idx], names)
    original_scores = None
    if table.originals is not None:
        original_scores = classifier.scores(table.originals, table.original_files)

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["file_name", "set_id", "cell_id", "expected_label", "score", "prediction"])
    cells = spec.cells
    for s, c in zip(s_idx, c_idx):
        writer.writerow([table.files[s][c], table.set_ids[s], c, cells[c].label, f"{scores[s, c]:.6g}",
                         int(scores[s, c] >= spec.threshold)])
    if original_scores is not None and table.original_files is not None:
        for s, name in enumerate(table.original_files):
            label = "" if table.original_labels is None or table.original_labels[s] < 0 else int(table.original_labels[s])
            writer.writerow([name, table.set_ids[s], "", label, f"{original_scores[s]:.6g}",
                             int(original_scores[s] >= spec.threshold)])
    atomic_write_text(output / SCORES_CSV, buf.getvalue())

    analysis = analyse(spec, table, scores, n_boot=n_boot, seed=bootstrap_seed,
                       regions=RegionMaps(spec.regions, int(source.resolution)), original_scores=original_scores)
    run_settings = {"source": "images" if originals is not None else "noise", "bootstrap": n_boot,
                    "bootstrap_seed": bootstrap_seed, "n_images_in": None if originals is None else len(originals),
                    "privacy_index": privacy_index, "resolution": int(source.resolution)}
    report = build_report(spec, analysis, generator=fields, classifier=classifier.describe(), settings=run_settings,
                          rules=rules, n_images=int(present.sum()), n_rejected=int((~present).sum()))
    j, h = write_report(output, report)
    return StressResult(report=report, report_json=j, report_html=h, made=made)
