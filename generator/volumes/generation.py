"""Volume generation runs: prompts -> a folder of synthetic volumes with previews and a manifest (issue 10).

The 3D counterpart of :mod:`generator.generation`, with its conventions (DESIGN.md §3.3, §8):

- Request ``i`` has seed ``base_seed + i`` and becomes ``{i:06d}.nii.gz``; any volume can be regenerated alone.
- Each volume is written as it is made: the ``write_volume`` callable (the command line passes the
  exporters' NIfTI/DICOM writers; this module imports neither exporters nor privacy) writes the
  ``file_name`` file, the axial/coronal/sagittal preview PNG goes to ``previews/``, and the
  ``metadata.jsonl`` line is appended last, so an interrupted run started again skips what is complete.
- A ``gate`` (the 3D privacy gate) may reject a volume; it is resampled with a new recorded seed
  (``seed + attempt * 1_000_003``), up to ``max_resample`` times, then dropped.

Volumes are ``(D, H, W)`` in the standard layout (:mod:`generator.volumes.records`), physical units (HU for
CT) in the :class:`~generator.volumes.records.Volume` handed to ``write_volume``; the gate sees the model
range ``[0, 1]``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from generator.manifest import append_line, atomic_write_text, read_manifest
from generator.volumes.pipeline import VolumePipeline
from generator.volumes.previews import BODY_WINDOW, save_preview
from generator.volumes.records import Volume

__all__ = ["VolumeRequest", "VolumeGenerationSummary", "make_volume_requests", "prepare_volume_output",
           "generate_volumes_to_folder", "regenerate_volume_line", "RUN_FILE", "PREVIEW_DIR"]

RUN_FILE = "generation.json"
PREVIEW_DIR = "previews"
_RESAMPLE_STRIDE = 1_000_003

#: ``gate(volumes (B, D, H, W) in [0, 1]) -> one dict per volume`` with ``privacy_verdict`` and other fields.
VolumeGate = Callable[[np.ndarray], list[dict[str, Any]]]
#: ``write_volume(volume, manifest_line) -> extra manifest fields``; must write ``output / line["file_name"]``.
VolumeWriter = Callable[[Volume, dict[str, Any]], dict[str, Any]]


@dataclass(frozen=True)
class VolumeRequest:
    """One volume to make.

    Attributes:
        index: Position in the run.
        text: Prompt.
        seed: Seed of the first attempt (``base_seed + index``).
        attributes: Structured attributes of the prompt, if any.
    """

    index: int
    text: str
    seed: int
    attributes: dict[str, Any] | None = None

    @property
    def file_name(self) -> str:
        """The NIfTI file of the volume in the output folder."""
        return f"{self.index:06d}.nii.gz"

    @property
    def preview_name(self) -> str:
        """The preview PNG, relative to the output folder."""
        return f"{PREVIEW_DIR}/{self.index:06d}.png"


@dataclass
class VolumeGenerationSummary:
    """What a run did: ``written``, ``skipped_done`` (complete from an earlier run), ``resampled`` (attempts
    rejected by the gate and made again), ``rejected`` (dropped after ``max_resample`` attempts),
    ``verdicts`` (count per privacy verdict of written volumes)."""

    written: int = 0
    skipped_done: int = 0
    resampled: int = 0
    rejected: int = 0
    verdicts: dict[str, int] = field(default_factory=dict)


def make_volume_requests(prompts: Sequence[tuple[str, dict[str, Any] | None, int]], base_seed: int) -> list[VolumeRequest]:
    """Expand ``(text, attributes, n)`` triples into numbered requests (seed ``base_seed + i``).

    Raises:
        ValueError: empty text or ``n < 1`` (naming the prompt).
    """
    out: list[VolumeRequest] = []
    for text, attrs, n in prompts:
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"prompt text must be a non-empty string, got {text!r}")
        if int(n) < 1:
            raise ValueError(f"num_images must be >= 1, got {n} for prompt {text!r}")
        for _ in range(int(n)):
            out.append(VolumeRequest(index=len(out), text=text, seed=int(base_seed) + len(out), attributes=attrs))
    return out


def attempt_seed(seed: int, attempt: int) -> int:
    """Seed of resampling attempt ``attempt`` (0: the request's own seed)."""
    return int(seed) + int(attempt) * _RESAMPLE_STRIDE


def prepare_volume_output(output: str | Path, settings: dict[str, Any], requests: Sequence[VolumeRequest], *,
                          overwrite: bool) -> Path:
    """Create ``output`` or check that it holds the same run (``generation.json`` fingerprint).

    Raises:
        FileExistsError: ``output`` holds other files or another run and ``overwrite`` is false.
    """
    output = Path(output)
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for r in requests:
        h.update(json.dumps([r.index, r.text, r.seed, r.attributes], sort_keys=True).encode())
    fp = h.hexdigest()[:16]
    run_file = output / RUN_FILE
    if output.is_dir() and any(output.iterdir()):
        try:
            same = run_file.is_file() and json.loads(run_file.read_text(encoding="utf-8")).get("fingerprint") == fp
        except (ValueError, AttributeError):
            same = False
        if not same:
            if not overwrite:
                raise FileExistsError(f"--output {str(output)!r} holds other files or another run's volumes: pass "
                                      "--overwrite to replace them (the same command again continues a run)")
            for entry in output.iterdir():
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    elif output.exists() and not output.is_dir():
        raise FileExistsError(f"--output {str(output)!r} is a file, not a folder")
    (output / PREVIEW_DIR).mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_file, json.dumps({"fingerprint": fp, "settings": settings, "dims": 3}, indent=2, sort_keys=True))
    return output


def generate_volumes_to_folder(
    pipe: VolumePipeline,
    info: dict[str, Any],
    requests: Sequence[VolumeRequest],
    output: str | Path,
    write_volume: VolumeWriter,
    *,
    steps: int = 25,
    guidance_scale: float = 3.0,
    sampler: str = "ddim",
    negative_prompt: str | None = None,
    batch_size: int = 4,
    gate: VolumeGate | None = None,
    max_resample: int = 3,
    progress: bool = True,
) -> VolumeGenerationSummary:
    """Make every pending request into ``output`` (prepared by :func:`prepare_volume_output`).

    Args:
        pipe: The loaded :class:`VolumePipeline`.
        info: The model's ``radsynth.json`` (``model_hash``, ``modality``, ``intensity``).
        requests: All requests of the run; those whose manifest line and file exist are skipped.
        output: Output folder.
        write_volume: Writes the volume to ``output / line["file_name"]`` (and any exports); returns
            manifest fields to add (paths relative to ``output``).
        steps: Sampler steps.
        guidance_scale: Classifier-free guidance weight.
        sampler: Sampler name (:class:`generator.models.samplers.Sampler`).
        negative_prompt: Replaces the null prompt.
        batch_size: Volumes per pipeline call (does not change the voxels).
        gate: Privacy gate; ``None`` records no privacy fields.
        max_resample: Attempts for a rejected volume before it is dropped (``>= 0``).
        progress: Print a line per written volume.

    Raises:
        ValueError: ``batch_size < 1`` or ``max_resample < 0``.
    """
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if int(max_resample) < 0:
        raise ValueError(f"max_resample must be >= 0, got {max_resample}")
    output = Path(output)
    done = {ln["file_name"] for ln in read_manifest(output) if (output / str(ln.get("file_name"))).is_file()}
    todo = [r for r in requests if r.file_name not in done]
    summary = VolumeGenerationSummary(skipped_done=len(requests) - len(todo))
    modality = str(info.get("modality") or "CT")
    window = BODY_WINDOW if modality == "CT" else None
    pending: list[tuple[VolumeRequest, int, list[int]]] = [(r, 0, []) for r in todo]
    while pending:
        batch, pending = pending[: int(batch_size)], pending[int(batch_size):]
        seeds = [attempt_seed(r.seed, a) for r, a, _ in batch]
        out = pipe([r.text for r, _, _ in batch], seeds=seeds, num_inference_steps=int(steps),
                   guidance_scale=float(guidance_scale), sampler=sampler,
                   negative_prompt=None if negative_prompt is None else [negative_prompt] * len(batch),
                   batch_size=int(batch_size))
        verdicts = gate(out.volumes) if gate is not None else [{} for _ in batch]
        retry: list[tuple[VolumeRequest, int, list[int]]] = []
        for j, ((req, attempt, rejected), seed, privacy) in enumerate(zip(batch, seeds, verdicts)):
            if privacy.get("privacy_verdict") == "reject":
                if attempt < int(max_resample):
                    summary.resampled += 1
                    retry.append((req, attempt + 1, rejected + [seed]))
                else:
                    summary.rejected += 1
                continue
            vol = out.volume(j, text=req.text, file_name=req.file_name)
            line: dict[str, Any] = {
                "file_name": req.file_name, "text": req.text, "seed": seed, "request_seed": req.seed,
                "rejected_seeds": rejected, "model": info.get("model_hash", ""), "sampler": str(sampler),
                "steps": int(steps), "guidance_scale": float(guidance_scale), "negative_prompt": negative_prompt,
                "dims": 3, "shape": list(vol.shape), "spacing_mm": list(vol.spacing), "modality": modality,
                "intensity": out.intensity.to_dict(), "preview_file": req.preview_name,
            }
            if req.attributes:
                line.update({k: v for k, v in req.attributes.items() if k not in line})
                line["attributes"] = req.attributes
            line.update(privacy)
            line.update(write_volume(vol, line))
            if not (output / req.file_name).is_file():
                raise RuntimeError(f"write_volume did not write {output / req.file_name}")
            save_preview(output / req.preview_name, vol.array if window else out.volumes[j], vol.spacing, window=window)
            append_line(output, line)
            summary.written += 1
            verdict = str(privacy.get("privacy_verdict", "unchecked"))
            summary.verdicts[verdict] = summary.verdicts.get(verdict, 0) + 1
            if progress:
                print(f"  {req.file_name} (seed {seed})", flush=True)
        pending = retry + pending
    return summary


def regenerate_volume_line(pipe: VolumePipeline, line: dict[str, Any]) -> Volume:
    """Re-make the volume of one ``metadata.jsonl`` line with its own ``text``, ``seed``, ``steps``,
    ``guidance_scale``, ``sampler`` and ``negative_prompt``: the same volume as the original run on the
    same model (it depends on the seed alone; batching changes only the last float bits, so a stored
    integer voxel may differ by one unit where the value sat on a rounding boundary).

    Returns:
        The :class:`~generator.volumes.records.Volume` (physical units, the model's affine), named
        ``line["file_name"]``.

    Raises:
        ValueError: the line lacks ``text``, ``seed``, ``steps`` or ``guidance_scale``, or holds a value
            out of range (named).
    """
    from generator.models.samplers import check_manifest_line

    text, seed, negative, steps, guidance = check_manifest_line(line)
    out = pipe([text], seeds=[seed], num_inference_steps=steps, guidance_scale=guidance,
               sampler=str(line.get("sampler", "ddim")), negative_prompt=None if negative is None else [negative])
    return out.volume(0, text=text, file_name=str(line.get("file_name", "regenerated.nii.gz")))
