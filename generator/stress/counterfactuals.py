"""The counterfactual image folder of a stress test: plan, make (resumable), read back.

Layout of ``OUTPUT/images`` (an ``imagefolder``; ``datasets.load_dataset("imagefolder", ...)`` and
``radsynth train`` read it):

- ``n{seed:07d}_c{cell:03d}.png``: from noise, one per seed and cell; all cells of a seed form the *set*
  ``noise-{seed}``.
- with real images (``--images``): ``o{j:05d}.png`` the j-th input image at the model's resolution and
  ``e{j:05d}_c{cell:03d}.png`` its edit under each cell's prompt (seed ``seeds[0] + j``); the original
  and its edits form the set ``image-{j}``.

Each manifest line has the fields of ``radsynth generate`` (``file_name``, ``text``, ``seed``, ``model``,
``sampler``, ``steps``, ``guidance_scale``, ``resolution``, ``intensity``, attributes, privacy fields)
plus ``set_id``, ``cell_id``, ``varied`` (the varied attributes' values), ``expected_label`` and
``stress_source`` (``noise``, ``edit`` or ``original``). Images are written as they are made (PNG under
a temporary name, then renamed; the line appended after), so a run started again makes only what is
missing: same seeds, same files, same pairs. An image the privacy gate rejects is not written; it is
listed in ``OUTPUT/privacy_rejected.json`` and its pairs are left out of the statistics.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import numpy as np
from tqdm.auto import tqdm

from generator.manifest import append_line, atomic_write_text, load_png, read_manifest, save_png, sort_manifest
from generator.stress.spec import StressSpec

__all__ = ["ImageSource", "ImageJob", "plan_jobs", "CounterfactualFolder", "CounterfactualTable", "MakeSummary",
           "IMAGES_DIR", "REJECTED_FILE"]

#: Sub-folder of the output that holds the imagefolder.
IMAGES_DIR = "images"
#: Images the privacy gate rejected (not written).
REJECTED_FILE = "privacy_rejected.json"

#: ``gate(images (B, H, W) in [0, 1]) -> one dict per image`` with ``privacy_verdict`` (see generation.Gate).
Gate = Callable[[np.ndarray], list[dict[str, Any]]]


class ImageSource(Protocol):
    """What makes the images: :class:`~generator.stress.sources.DiffusionSource` or
    :class:`~generator.stress.phantom_source.PhantomSource`."""

    resolution: int

    def manifest_fields(self) -> dict[str, Any]: ...

    def from_noise(self, prompts: Sequence[str], seeds: Sequence[int]) -> np.ndarray: ...

    def edit(self, images: np.ndarray, prompts: Sequence[str], seeds: Sequence[int], *, strength: float,
             keep_masks: np.ndarray | None = None) -> np.ndarray: ...


@dataclass(frozen=True)
class ImageJob:
    """One image of the stress test.

    Attributes:
        file_name: Name in the imagefolder.
        kind: ``"noise"``, ``"edit"`` or ``"original"``.
        set_index: Row of the set in :class:`CounterfactualTable`.
        set_id: ``"noise-{seed}"`` or ``"image-{j}"``.
        seed: Seed of the initial or added noise (``None`` for an original).
        cell: Index of the cell (``None`` for an original).
        source_index: Index of the real input image (edits and originals).
    """

    file_name: str
    kind: str
    set_index: int
    set_id: str
    seed: int | None
    cell: int | None
    source_index: int | None = None


def plan_jobs(spec: StressSpec, num_images: int | None = None) -> list[ImageJob]:
    """Every image of a run, in the order they are made.

    Args:
        spec: The stress-test spec.
        num_images: Number of real input images (``None``: counterfactuals from noise).
    """
    cells = spec.cells
    jobs: list[ImageJob] = []
    if num_images is None:
        for k, seed in enumerate(spec.seeds):
            for c in cells:
                jobs.append(ImageJob(f"n{seed:07d}_c{c.index:03d}.png", "noise", k, f"noise-{seed}", seed, c.index))
        return jobs
    for j in range(num_images):
        seed = spec.seeds[0] + j
        jobs.append(ImageJob(f"o{j:05d}.png", "original", j, f"image-{j}", None, None, j))
        for c in cells:
            jobs.append(ImageJob(f"e{j:05d}_c{c.index:03d}.png", "edit", j, f"image-{j}", seed, c.index, j))
    return jobs


@dataclass
class MakeSummary:
    """What :meth:`CounterfactualFolder.make` did.

    Attributes:
        written: Images written in this call.
        skipped_done: Images already there from an earlier run.
        rejected: Images the privacy gate rejected (in this and earlier runs).
        verdicts: Count per privacy verdict of the images written in this call.
    """

    written: int = 0
    skipped_done: int = 0
    rejected: int = 0
    verdicts: dict[str, int] = field(default_factory=dict)


@dataclass
class CounterfactualTable:
    """The images of a finished run, by set and cell.

    Attributes:
        spec: The spec.
        set_ids: ``(S,)`` set ids.
        files: ``S x C`` file names (``None`` where the privacy gate rejected the image).
        images: ``(S, C, H, W)`` float32 in ``[0, 1]`` read back from the PNGs (NaN where missing).
        originals: ``(S, H, W)`` real input images (``None`` for noise runs).
        original_files: File names of the originals (``None`` for noise runs).
        original_labels: ``(S,)`` label of each original from its metadata (-1 unknown), or ``None``.
    """

    spec: StressSpec
    set_ids: list[str]
    files: list[list[str | None]]
    images: np.ndarray
    originals: np.ndarray | None = None
    original_files: list[str] | None = None
    original_labels: np.ndarray | None = None

    @property
    def present(self) -> np.ndarray:
        """``bool (S, C)``: the image exists."""
        return np.array([[f is not None for f in row] for row in self.files], dtype=bool)


class CounterfactualFolder:
    """Makes and reads the imagefolder of one stress test.

    Args:
        output: The stress test's output folder (images go to ``output/images``).
        spec: The spec.
        source: The image source.
        originals: ``(N, H, W)`` real input images at the source's resolution, for edits (``None``: from noise).
        original_texts: Their report texts (manifest ``text`` of the originals).
        original_labels: Their 0/1 labels (-1 unknown).
        keep_masks: ``(N, H, W)`` in ``[0, 1]`` (1 = keep), or ``None``.
        gate: Privacy gate, or ``None``.
        batch_size: Images per source call (does not change the pixels).
        progress: Show a progress bar.

    Raises:
        ValueError: originals, texts, labels or masks of inconsistent shapes, or ``batch_size`` < 1.
    """

    def __init__(self, output: str | Path, spec: StressSpec, source: ImageSource, *,
                 originals: np.ndarray | None = None, original_texts: Sequence[str] | None = None,
                 original_labels: Sequence[int] | None = None, keep_masks: np.ndarray | None = None,
                 gate: Gate | None = None, batch_size: int = 8, progress: bool = True) -> None:
        if int(batch_size) < 1:
            raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
        r = int(source.resolution)
        if originals is not None:
            originals = np.asarray(originals, dtype=np.float32)
            if originals.ndim != 3 or originals.shape[1:] != (r, r) or len(originals) == 0:
                raise ValueError(f"--images must give (N, {r}, {r}) images, got {originals.shape}")
            n = len(originals)
            original_texts = list(original_texts or [""] * n)
            original_labels = list(original_labels if original_labels is not None else [-1] * n)
            if len(original_texts) != n or len(original_labels) != n:
                raise ValueError(f"got {n} images but {len(original_texts)} texts and {len(original_labels)} labels")
            if keep_masks is not None and np.shape(keep_masks) != originals.shape:
                raise ValueError(f"--keep-mask must give masks of shape {originals.shape}, got {np.shape(keep_masks)}")
        elif keep_masks is not None:
            raise ValueError("--keep-mask applies to --images edits only")
        self.output = Path(output)
        self.folder = self.output / IMAGES_DIR
        self.spec = spec
        self.source = source
        self.originals = originals
        self.original_texts = original_texts
        self.original_labels = original_labels
        self.keep_masks = keep_masks
        self.gate = gate
        self.batch_size = int(batch_size)
        self.progress = progress
        self.jobs = plan_jobs(spec, None if originals is None else len(originals))

    # ------------------------------------------------------------------------------ bookkeeping
    def _rejected(self) -> dict[str, dict[str, Any]]:
        path = self.output / REJECTED_FILE
        if not path.is_file():
            return {}
        return {row["file_name"]: row for row in json.loads(path.read_text())}

    def _save_rejected(self, rejected: dict[str, dict[str, Any]]) -> None:
        rows = [rejected[k] for k in sorted(rejected)]
        atomic_write_text(self.output / REJECTED_FILE, json.dumps(rows, indent=1, sort_keys=True) + "\n")

    def _line(self, job: ImageJob, image: np.ndarray) -> dict[str, Any]:
        spec = self.spec
        if job.kind == "original":
            j = int(job.source_index or 0)
            texts, labels = self.original_texts or [], self.original_labels or []
            line: dict[str, Any] = {
                "file_name": job.file_name, "text": (texts[j] if j < len(texts) else "") or "input image",
                "set_id": job.set_id, "stress_source": "original", "source_index": job.source_index,
                "resolution": int(image.shape[-1]),
            }
            label = int(labels[j]) if j < len(labels) else -1
            if label in (0, 1):
                line["label"] = label
            return line
        cell = spec.cells[job.cell or 0]
        attributes = {**spec.fixed, **cell.values}
        line = {
            "file_name": job.file_name, "text": cell.prompt, "seed": job.seed, "request_seed": job.seed,
            "rejected_seeds": [], **self.source.manifest_fields(), "resolution": int(image.shape[-1]),
        }
        line.update({k: v for k, v in attributes.items() if k not in line})
        line.update({
            "attributes": attributes, "set_id": job.set_id, "cell_id": cell.index, "varied": cell.values,
            "expected_label": cell.label, "stress_source": job.kind,
        })
        if job.kind == "edit":
            line.update({"strength": spec.strength, "original_file": f"o{job.source_index:05d}.png",
                         "keep_mask": self.keep_masks is not None})
        return line

    # ------------------------------------------------------------------------------ making
    def make(self) -> MakeSummary:
        """Make every image not made yet (the output folder must exist; see ``generation.prepare_output``).

        Returns:
            A :class:`MakeSummary`.
        """
        self.folder.mkdir(parents=True, exist_ok=True)
        done = {ln["file_name"] for ln in read_manifest(self.folder) if (self.folder / ln["file_name"]).is_file()}
        rejected = self._rejected()
        todo = [j for j in self.jobs if j.file_name not in done and j.file_name not in rejected]
        summary = MakeSummary(skipped_done=len(self.jobs) - len(todo) - len(rejected), rejected=len(rejected))
        bits = 16 if int(self.source.manifest_fields()["intensity"].get("bits_stored", 8)) > 8 else 8
        bar = tqdm(total=len(self.jobs), initial=len(self.jobs) - len(todo), desc="stress-test images",
                   unit="img", disable=not self.progress)
        cells = self.spec.cells
        for kind in ("original", "noise", "edit"):
            mine = [j for j in todo if j.kind == kind]
            for i in range(0, len(mine), self.batch_size):
                batch = mine[i : i + self.batch_size]
                if kind == "noise" or self.originals is None:
                    images = self.source.from_noise([cells[j.cell].prompt for j in batch], [j.seed for j in batch])
                elif kind == "original":
                    images = self.originals[[j.source_index for j in batch]]
                else:
                    idx = [j.source_index for j in batch]
                    images = self.source.edit(
                        self.originals[idx], [cells[j.cell].prompt for j in batch], [j.seed for j in batch],
                        strength=self.spec.strength,
                        keep_masks=None if self.keep_masks is None else self.keep_masks[idx])
                gated = kind != "original" and self.gate is not None
                verdicts = self.gate(np.asarray(images)) if gated else [{} for _ in batch]
                for job, image, privacy in zip(batch, images, verdicts):
                    line = self._line(job, np.asarray(image))
                    line.update(privacy)
                    if privacy.get("privacy_verdict") == "reject":
                        rejected[job.file_name] = dict(line)
                        summary.rejected += 1
                        self._save_rejected(rejected)
                    else:
                        save_png(np.asarray(image), self.folder / job.file_name, bits=bits)
                        append_line(self.folder, line)
                        summary.written += 1
                        verdict = str(privacy.get("privacy_verdict", "unchecked"))
                        summary.verdicts[verdict] = summary.verdicts.get(verdict, 0) + 1
                    bar.update(1)
        bar.close()
        sort_manifest(self.folder)
        return summary

    # ------------------------------------------------------------------------------ reading
    def table(self) -> CounterfactualTable:
        """Read the finished run back from its PNG files (what the statistics use).

        Raises:
            ValueError: an image of the plan is neither written nor rejected (run :meth:`make` first).
        """
        lines = {ln["file_name"]: ln for ln in read_manifest(self.folder)}
        rejected = self._rejected()
        n_sets = max(j.set_index for j in self.jobs) + 1
        n_cells = len(self.spec.cells)
        r = int(self.source.resolution)
        images = np.full((n_sets, n_cells, r, r), np.nan, dtype=np.float32)
        files: list[list[str | None]] = [[None] * n_cells for _ in range(n_sets)]
        set_ids = [""] * n_sets
        originals = None if self.originals is None else np.zeros((n_sets, r, r), np.float32)
        original_files: list[str] | None = None if self.originals is None else [""] * n_sets
        for job in self.jobs:
            set_ids[job.set_index] = job.set_id
            if job.file_name in rejected:
                continue
            if job.file_name not in lines or not (self.folder / job.file_name).is_file():
                raise ValueError(f"{self.folder}: {job.file_name} is missing; the run is not complete")
            image = load_png(self.folder / job.file_name)
            if job.kind == "original" and originals is not None and original_files is not None:
                originals[job.set_index] = image
                original_files[job.set_index] = job.file_name
            else:
                images[job.set_index, job.cell] = image
                files[job.set_index][job.cell] = job.file_name
        labels = None if self.original_labels is None else np.asarray(self.original_labels, dtype=np.int64)
        return CounterfactualTable(spec=self.spec, set_ids=set_ids, files=files, images=images,
                                   originals=originals, original_files=original_files, original_labels=labels)
