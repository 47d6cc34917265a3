"""The volume half of ``radsynth demo --3d``: CT volumes from the bundled volume demo model, gated and
audited against its CT phantom training set, written as NIfTI and DICOM series (issue 10).

Like :mod:`radsynth.commands._volumes` (whose writer, gate and audit it reuses), this module joins
generator, privacy and exporters for a verb; nothing below ``radsynth`` imports it.
"""

from __future__ import annotations

import shutil
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["DEMO_VOLUME_REQUESTS", "VolumeDemoResult", "run_volume_demo"]

#: The volume teaching set: attributes per prompt (text from ``conditioning.prompts.build_prompt``, as
#: the CT phantoms' reports are made).
DEMO_VOLUME_REQUESTS: list[dict[str, Any]] = [
    {"modality": "CT", "sex": "M", "age": 55, "findings": []},
    {"modality": "CT", "sex": "F", "age": 64,
     "findings": [{"name": "nodule", "location": "right upper lobe", "size_mm": 25}]},
    {"modality": "CT", "sex": "M", "age": 70, "findings": [{"name": "liver lesion", "size_mm": 40}]},
]

#: Held-out phantoms that calibrate the demo's volume index (alpha 0.01 needs at least 99 in the null and
#: the index recommends twice that).
DEMO_VOLUME_HOLDOUT = 240


@dataclass
class VolumeDemoResult:
    """What the volume demo made (paths inside the demo folder).

    Attributes:
        folder: The generated set: NIfTI volumes, JSON sidecars, ``previews/``, ``dicom/``, ``metadata.jsonl``.
        index_dir: The volume privacy index of the training phantoms.
        audit_json: The audit report.
        audit_html: The review page.
        model: The model folder used.
        model_hash: Its weights hash.
        n_volumes: Volumes written.
        n_references: Training phantoms in the index.
        resampled: Volumes the privacy gate sent back during generation.
        summary: The audit summary (``counts``, ``alpha``, ``expected_chance_flags``, ...).
        calibration: How the index was calibrated (held-out phantoms in the null, near-duplicates left out).
    """

    folder: Path
    index_dir: Path
    audit_json: Path
    audit_html: Path
    model: str
    model_hash: str
    n_volumes: int
    n_references: int
    resampled: int
    summary: dict[str, Any]
    calibration: str = ""


def _phantom_stack(work: Path, n: int, *, shape: int, seed: int) -> Any:
    """Write ``n`` CT phantoms of ``seed`` into ``work`` and read them back as training reads them
    (``load_volumes``: int16 HU NIfTI -> model range), so that the index holds the model's training data."""
    from generator.volumes.ingest import load_volumes
    from generator.volumes.phantom import write_phantom_volumes

    write_phantom_volumes(work, n, shape=shape, seed=seed)
    return load_volumes(work, shape=shape)


def run_volume_demo(out: Path, *, model: str | None = None, images_per_prompt: int = 1, steps: int = 10,
                    guidance_scale: float | None = None, seed: int = 0, text_encoder: str | None = None,
                    reference_volumes: int | None = None) -> VolumeDemoResult:
    """Make, gate, export and audit the volume teaching set into ``out`` (created; must not hold a
    previous set).

    Args:
        out: Folder for everything this part writes.
        model: A volume model trained on CT phantoms; ``None``: the bundled volume demo model.
        images_per_prompt: Volumes per prompt of :data:`DEMO_VOLUME_REQUESTS` (``>= 1``).
        steps: Sampler steps (the default sampler of ``radsynth generate``).
        guidance_scale: Classifier-free guidance; ``None``: the model's ``demo.guidance_scale``.
        seed: Base seed of the set.
        text_encoder: Text encoder to use instead of the model folder's own.
        reference_volumes: Training phantoms rebuilt for the index (default: the whole training set).

    Raises:
        ValueError: a model folder without a ``demo`` block naming its phantom set, or another grid.
        FileNotFoundError: no bundled volume model.
    """
    from conditioning.prompts import build_prompt
    from generator.demo import DEMO_VOLUME_TRAINING, bundled_volume_model_path
    from generator.models.samplers import DEFAULT_SAMPLER
    from generator.volumes.generation import generate_volumes_to_folder, make_volume_requests, prepare_volume_output
    from generator.volumes.model_folder import read_volume_info
    from generator.volumes.pipeline import VolumePipeline
    from privacy.volumes import VolumeIndex
    from radsynth.commands._volumes import audit_volume_folder, index_gate, volume_writer

    model_dir = str(model) if model is not None else str(bundled_volume_model_path())
    info = read_volume_info(model_dir)
    demo = {**DEMO_VOLUME_TRAINING, **(info.get("demo") or {})}
    shape = [int(s) for s in info["shape"]]
    if len(set(shape)) != 1 or shape[0] != int(demo["shape"]):
        raise ValueError(f"{model_dir}: the volume demo needs a model trained on cubic CT phantoms of side "
                         f"{demo['shape']} (its radsynth.json demo block), this one makes {shape}")
    n_ref = int(reference_volumes or demo["num_volumes"])
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".phantoms-", dir=out))
    try:
        with ThreadPoolExecutor(1) as pool:  # the model loads while the training phantoms are rebuilt
            loading = pool.submit(VolumePipeline.from_pretrained, model_dir, text_encoder=text_encoder)
            train = _phantom_stack(work / "train", n_ref, shape=shape[0], seed=int(demo["seed"]))
            hold = _phantom_stack(work / "holdout", DEMO_VOLUME_HOLDOUT, shape=shape[0], seed=int(demo["seed"]) + 1)
            pipe = loading.result()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    first = train.records[0]
    with warnings.catch_warnings():
        # Phantoms of different seeds can be near-identical at 32^3; the index leaves such held-out ones out
        # of its null and records them (index.json "excluded_duplicates"): expected here, not news to print.
        warnings.filterwarnings("ignore", message=r".*held-out volume\(s\) correlate", category=UserWarning)
        index = VolumeIndex.build(
            train.stack(), [r.file_name for r in train.records], [r.patient_id for r in train.records],
            spacing=first.spacing, holdout_volumes=hold.stack(),
            holdout_ids=[f"holdout:{r.file_name}" for r in hold.records],
            holdout_patient_ids=[r.patient_id for r in hold.records], alpha=0.01,
            intensity=first.intensity.to_dict(), holdout_name="the held-out CT phantoms",
            info={"data": f"CT phantoms (seed {demo['seed']}, {n_ref} volumes of {shape[0]}^3)"})
    index_dir = out / "privacy_index"
    index.save(index_dir, overwrite=True)

    guidance = float(guidance_scale if guidance_scale is not None else demo.get("guidance_scale", 3.0))
    folder = out / "ct_set"
    rows = [(build_prompt(a), a, images_per_prompt) for a in DEMO_VOLUME_REQUESTS]
    requests = make_volume_requests(rows, seed)
    settings = {"model": info.get("model_hash"), "steps": steps, "guidance_scale": guidance,
                "sampler": str(DEFAULT_SAMPLER), "demo": True}
    prepare_volume_output(folder, settings, requests, overwrite=True)
    summary = generate_volumes_to_folder(
        pipe, info, requests, folder, volume_writer(folder, info, {"dicom"}, modality="CT"), steps=steps,
        guidance_scale=guidance, sampler=str(DEFAULT_SAMPLER), batch_size=4, gate=index_gate(index, info),
        progress=False)
    from generator.manifest import sort_manifest

    sort_manifest(folder)
    result, _ = audit_volume_folder(index, folder, json_path=out / "audit.json", html_path=out / "audit.html",
                                    flag="the demo's CT set")
    return VolumeDemoResult(folder=folder, index_dir=index_dir, audit_json=out / "audit.json",
                            audit_html=out / "audit.html", model=model_dir, model_hash=str(info.get("model_hash")),
                            n_volumes=summary.written, n_references=len(index.ids), resampled=summary.resampled,
                            summary=result.summary,
                            calibration=f"{index.holdout['n_null']} held-out phantoms in the null, "
                                        f"{len(index.holdout['excluded_duplicates'])} near-duplicates of training "
                                        "phantoms left out")
