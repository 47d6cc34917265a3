"""Generation runs: requests -> an imagefolder of synthetic images with a manifest (DESIGN.md §3.3).

- Seeds are per image: request ``i`` has seed ``base_seed + i``, so any image can be regenerated alone.
- Images are written as they are made (memory stays flat), each PNG under a temporary name and then
  renamed, and its ``metadata.jsonl`` line appended only after the file is complete; a run started
  again with the same arguments skips what is done (no duplicate, no partial file).
- Under several processes (``accelerate launch``/``torchrun``) request ``i`` belongs to process
  ``i % num_processes``; the manifest is sorted once all processes are done.
- A ``gate`` (e.g. ``privacy.gate.PrivacyGate.check``) can reject images; a rejected image is
  resampled with a new recorded seed, up to ``max_resample`` times. This module does not import the
  privacy or exporter packages: the command line passes them in as callables.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from tqdm.auto import tqdm

from generator.manifest import append_line, atomic_write_text, read_manifest, save_png
from generator.models.model_folder import ModelInfo
from generator.models.pipeline import RadSynthPipeline
from generator.models.pipeline import Precision
from generator.models.samplers import (  # noqa: F401  (the limits and their check are re-exported here)
    DEFAULT_SAMPLER,
    DEFAULT_STEPS,
    MAX_GUIDANCE,
    MAX_STEPS,
    check_manifest_line,
    check_sampling_settings,
    make_sampler,
)

RUN_FILE = "generation.json"

#: ``gate(images (B, H, W) in [0, 1]) -> one dict per image``; each dict has ``privacy_verdict``
#: (``"keep"``, ``"review"``, ``"reject"``) and any other JSON fields to record.
Gate = Callable[[np.ndarray], list[dict[str, Any]]]
#: ``on_image(image (H, W) in [0, 1], manifest_line) -> extra manifest fields`` (exporters).
ImageHook = Callable[[np.ndarray, dict[str, Any]], dict[str, Any]]

_RESAMPLE_STRIDE = 1_000_003


@dataclass(frozen=True)
class Request:
    """One image to make.

    Attributes:
        index: Position in the whole run (file ``{index:06d}.png``).
        text: Prompt.
        seed: Seed of the first attempt (``base_seed + index``).
        attributes: Structured attributes the prompt was built from, if any.
    """

    index: int
    text: str
    seed: int
    attributes: dict[str, Any] | None = None

    @property
    def file_name(self) -> str:
        """File name of the image in the output folder."""
        return f"{self.index:06d}.png"


@dataclass
class GenerationSummary:
    """What a run did (this process's share).

    Attributes:
        written: Images written in this run.
        skipped_done: Images already present from an earlier run.
        resampled: Attempts rejected by the gate and made again with a new seed.
        rejected: Images still rejected after ``max_resample`` attempts (not written).
        verdicts: Count per privacy verdict of written images.
    """

    written: int = 0
    skipped_done: int = 0
    resampled: int = 0
    rejected: int = 0
    verdicts: dict[str, int] = field(default_factory=dict)


def make_requests(
    prompts: Sequence[tuple[str, dict[str, Any] | None, int]], base_seed: int
) -> list[Request]:
    """Expand ``(text, attributes, num_images)`` triples into numbered requests.

    Raises:
        ValueError: empty text or ``num_images`` < 1 (naming the prompt).
    """
    out: list[Request] = []
    for text, attrs, n in prompts:
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"prompt text must be a non-empty string, got {text!r}")
        if int(n) < 1:
            raise ValueError(f"num_images must be >= 1, got {n} for prompt {text!r}")
        for _ in range(int(n)):
            i = len(out)
            out.append(Request(index=i, text=text, seed=base_seed + i, attributes=attrs))
    return out


def attempt_seed(seed: int, attempt: int) -> int:
    """Seed of resampling attempt ``attempt`` (0 = the request's own seed)."""
    return seed + attempt * _RESAMPLE_STRIDE


def run_fingerprint(settings: dict[str, Any], requests: Sequence[Request]) -> str:
    """Hash of everything that determines the pixels of a run (to detect a changed restart)."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for r in requests:
        h.update(json.dumps([r.index, r.text, r.seed, r.attributes], sort_keys=True).encode())
    return h.hexdigest()[:16]


def prepare_output(
    output: Path, settings: dict[str, Any], requests: Sequence[Request], *, overwrite: bool
) -> None:
    """Create the output folder or check that it belongs to the same run (main process only).

    Raises:
        FileExistsError: the folder holds another run's images and ``overwrite`` is false.
    """
    fp = run_fingerprint(settings, requests)
    run_file = output / RUN_FILE
    if output.is_dir() and any(output.iterdir()):
        try:
            same = run_file.is_file() and json.loads(run_file.read_text(encoding="utf-8")).get("fingerprint") == fp
        except (ValueError, AttributeError):  # unreadable or not an object: not this run's folder
            same = False
        if not same:
            if not overwrite:
                raise FileExistsError(
                    f"--output {str(output)!r} holds other files or another run's images: pass "
                    "--overwrite to replace them (the same command again continues a run)"
                )
            for entry in output.iterdir():
                if entry.is_dir():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
    output.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_file, json.dumps({"fingerprint": fp, "settings": settings}, indent=2, sort_keys=True))


def generate_to_folder(
    pipe: RadSynthPipeline,
    info: ModelInfo,
    requests: Sequence[Request],
    output: str | Path,
    *,
    steps: int = DEFAULT_STEPS,
    guidance_scale: float = 2.0,
    sampler: str = DEFAULT_SAMPLER,
    negative_prompt: str | None = None,
    batch_size: int = 8,
    gate: Gate | None = None,
    max_resample: int = 3,
    on_image: ImageHook | None = None,
    process_index: int = 0,
    num_processes: int = 1,
    precision: Precision = "auto",
    progress: bool = True,
) -> GenerationSummary:
    """Make this process's share of ``requests`` into ``output`` (which must exist).

    Args:
        pipe: Loaded pipeline whose scheduler is already the requested ``sampler``.
        info: The model's :class:`ModelInfo` (hash, intensity mapping, path).
        requests: All requests of the run (this process takes ``index % num_processes``).
        output: Output folder (see :func:`prepare_output`).
        steps: Sampler steps.
        guidance_scale: Classifier-free guidance weight.
        sampler: Sampler name recorded in the manifest.
        negative_prompt: Negative prompt (default: the null prompt).
        batch_size: Images per pipeline call (does not change the pixels).
        gate: Privacy gate; ``None`` records no privacy fields.
        max_resample: Resampling attempts for a rejected image before it is dropped.
        on_image: Called for each written image; its dict is merged into the manifest line.
        process_index: This process's rank.
        num_processes: Number of processes sharing the run.
        precision: ``"auto"`` (bfloat16 where the hardware has it), ``"fp32"``, ``"bf16"``, ``"fp16"``; the
            precision actually used is recorded in each manifest line.
        progress: Show a progress bar.

    Returns:
        A :class:`GenerationSummary` of this process's work.

    Raises:
        ValueError: ``batch_size`` or ``max_resample`` out of range.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    check_sampling_settings(steps, guidance_scale)
    if max_resample < 0:
        raise ValueError(f"max_resample must be >= 0, got {max_resample}")
    output = Path(output)
    done = {ln["file_name"] for ln in read_manifest(output) if (output / ln["file_name"]).is_file()}
    mine = [r for r in requests if r.index % num_processes == process_index]
    todo = [r for r in mine if r.file_name not in done]
    summary = GenerationSummary(skipped_done=len(mine) - len(todo))
    bits = 16 if int(info.intensity.get("bits_stored", 8)) > 8 else 8
    bar = tqdm(total=len(mine), initial=summary.skipped_done, desc="generate", unit="img",
               disable=not progress)
    # Each pending item: (request, attempt number, seeds rejected so far)
    pending: list[tuple[Request, int, list[int]]] = [(r, 0, []) for r in todo]
    while pending:
        batch, pending = pending[:batch_size], pending[batch_size:]
        seeds = [attempt_seed(r.seed, a) for r, a, _ in batch]
        out = pipe(
            [r.text for r, _, _ in batch],
            seeds=seeds,
            negative_prompt=negative_prompt,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            precision=precision,
        )
        images, used_precision, vae_tiled = out.images, out.precision, out.vae_tiled
        verdicts = gate(images) if gate is not None else [{} for _ in batch]
        retry: list[tuple[Request, int, list[int]]] = []
        for (req, attempt, rejected), seed, image, privacy in zip(batch, seeds, images, verdicts):
            if privacy.get("privacy_verdict") == "reject":
                summary.resampled += 1
                if attempt < max_resample:
                    retry.append((req, attempt + 1, rejected + [seed]))
                    continue
                summary.rejected += 1
                summary.resampled -= 1
                bar.update(1)
                continue
            line: dict[str, Any] = {
                "file_name": req.file_name,
                "text": req.text,
                "seed": seed,
                "request_seed": req.seed,
                "rejected_seeds": rejected,
                "model": info.model_hash,
                "model_name": Path(info.path).name,
                "sampler": sampler,
                "precision": used_precision,
                "vae_tiled": vae_tiled,
                "steps": steps,
                "guidance_scale": guidance_scale,
                "negative_prompt": negative_prompt,
                "resolution": int(image.shape[-1]),
                "intensity": info.intensity,
            }
            if req.attributes:
                line.update({k: v for k, v in req.attributes.items() if k not in line})
                line["attributes"] = req.attributes
            line.update(privacy)
            save_png(image, output / req.file_name, bits=bits)
            if on_image is not None:
                line.update(on_image(image, line))
            append_line(output, line)
            summary.written += 1
            verdict = str(privacy.get("privacy_verdict", "unchecked"))
            summary.verdicts[verdict] = summary.verdicts.get(verdict, 0) + 1
            bar.update(1)
        pending = retry + pending
    bar.close()
    return summary


def regenerate_line(pipe: RadSynthPipeline, line: dict[str, Any]) -> np.ndarray:
    """Re-make the image of one manifest line: ``(H, W)`` float32 in ``[0, 1]``.

    Uses the line's own ``sampler``, ``steps``, ``guidance_scale``, ``negative_prompt``, ``seed``
    and ``precision``, so the pixels equal those of the original run on the same model. The
    pipeline's scheduler is replaced by the line's sampler.

    Raises:
        ValueError: the line is not a JSON object, lacks ``text``, ``seed``, ``steps`` or
            ``guidance_scale``, or holds a value out of range (an unknown sampler, a NaN guidance).
    """
    text, seed, negative, steps, guidance = check_manifest_line(line)
    precision = line.get("precision", "fp32")
    if precision not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"manifest line: precision must be 'fp32', 'bf16' or 'fp16', got {precision!r}")
    pipe.scheduler = make_sampler(str(line.get("sampler", "dpm")), pipe.scheduler)
    return pipe(
        [text],
        seeds=[seed],
        negative_prompt=negative,
        num_inference_steps=steps,
        guidance_scale=guidance,
        precision=precision,
        vae_tiling=bool(line.get("vae_tiled", False)),
    ).images[0]
