"""``radsynth demo``: the whole pipeline on the bundled demo model, offline, in about two minutes."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

HELP = """Run the whole RadSynth pipeline on the bundled demo model.

Generates a small teaching set (normal, cardiomegaly, pleural effusion, nodule) from the
demonstration model (trained only on procedural chest phantoms), audits every image for
memorization against an index of the model's phantom training data, and exports it as a PNG
imagefolder, one DICOM study per synthetic patient and NIfTI files, with a contact sheet and an
HTML page. With --3d it also makes synthetic chest CT volumes from the bundled volume demo model
(trained only on procedural CT phantoms), gates and audits them against its training phantoms and
writes each as NIfTI (+ JSON sidecar, axial/coronal/sagittal preview) and as a DICOM CT series.
Needs no network and no data of your own."""

EPILOG = """examples:
  radsynth demo --output demo_out
  radsynth demo --output demo_out --images-per-prompt 6 --steps 25 --overwrite
  radsynth demo --output demo_out --3d             # also synthetic CT volumes (NIfTI + DICOM series)
"""

#: Contrastive-embedding training steps for the demo's index (the default 400 takes minutes on a CPU;
#: the pixel-correlation view, which needs no training, is unaffected).
DEMO_EMBEDDER_STEPS = 100

#: The teaching set: attributes per prompt (text comes from conditioning.prompts.build_prompt).
DEMO_REQUESTS: list[dict[str, Any]] = [
    {"view": "PA", "sex": "M", "age": 45, "findings": []},
    {"view": "PA", "sex": "F", "age": 72, "findings": [{"name": "cardiomegaly"}]},
    {"view": "PA", "sex": "F", "age": 70,
     "findings": [{"name": "pleural effusion", "location": "left", "size": "moderate"}]},
    {"view": "PA", "sex": "M", "age": 63,
     "findings": [{"name": "nodule", "location": "right upper lobe", "size_mm": 20}]},
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of ``radsynth demo``."""
    from generator.models.samplers import DEFAULT_STEPS, MAX_GUIDANCE, MAX_STEPS
    from radsynth._args import existing_dir, float_in, int_in, seed

    p.add_argument("--output", required=True, help="folder for everything the demo writes")
    p.add_argument("--images-per-prompt", type=int_in(1, 1000), default=3, help="images per prompt (default 3)")
    p.add_argument("--steps", type=int_in(1, MAX_STEPS), default=DEFAULT_STEPS,
                   help=f"sampler steps (default {DEFAULT_STEPS}, as radsynth generate)")
    p.add_argument("--guidance-scale", type=float_in(0.0, MAX_GUIDANCE), default=None,
                   help="classifier-free guidance (default: the model's recommended value)")
    p.add_argument("--seed", type=seed, default=0, help="base seed of the teaching set (default 0)")
    p.add_argument("--model", type=existing_dir, default=None, help="another model trained on phantoms (default: bundled)")
    p.add_argument("--text-encoder", default=None, metavar="PATH_OR_ID",
                   help="text encoder to use instead of the model folder's own")
    p.add_argument("--reference-images", type=int_in(1, 1_000_000), default=None,
                   help="phantoms rebuilt for the privacy index (default: the model's whole training set)")
    p.add_argument("--3d", dest="volumes", action="store_true",
                   help="also make, audit and export synthetic CT volumes (into OUTPUT/volumes)")
    p.add_argument("--volumes-per-prompt", type=int_in(1, 1000), default=None,
                   help="--3d: volumes per prompt (default 2)")
    p.add_argument("--volume-model", type=existing_dir, default=None,
                   help="--3d: another volume model trained on CT phantoms (default: bundled)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing demo folder")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def shipped_embedder(model_dir: Path, phantoms: dict[str, int]) -> Any:
    """The copy embedder shipped in ``model_dir`` when it was trained on exactly these ``phantoms``
    (``num_images``, ``size``, ``seed``), else ``None`` (the index build trains one).

    Any embedder keeps the index valid (calibration on held-out phantoms sets the thresholds); a
    shipped one trained on the same phantoms gives the power of a freshly trained one without its
    training time.
    """
    from generator.demo import DEMO_EMBEDDER_FILE
    from privacy.embedding import CopyEmbedder

    path = model_dir / DEMO_EMBEDDER_FILE
    if not path.is_file():
        return None
    try:
        if CopyEmbedder.read_metadata(path).get("phantoms") != phantoms:
            return None
        return CopyEmbedder.load(path)
    except (ValueError, RuntimeError, OSError):
        return None  # damaged or foreign: train one instead


def _load_model(model_dir: str, text_encoder: str | None) -> tuple[Any, Any]:
    """``load_pipeline`` (importing diffusers and transformers; run in a thread by the demo)."""
    from generator.models.model_folder import load_pipeline

    return load_pipeline(model_dir, text_encoder=text_encoder)


def run(args: argparse.Namespace) -> int:
    """Run ``radsynth demo``."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    from tqdm.auto import tqdm

    from generator.demo import DEMO_EMBEDDER_FILE, demo_settings, resolve_model
    from generator.models.samplers import check_sampling_settings
    from generator.phantoms import phantom_reference_set
    from generator.phantoms.measure import text_control_summary
    from privacy.audit import audit_images
    from privacy.embedding import EmbedderConfig
    from privacy.gate import PrivacyGate
    from privacy.index import ReferenceIndex
    from privacy.report import write_html, write_json
    from radsynth.commands._wiring import export_hook, privacy_gate

    if args.guidance_scale is not None:
        check_sampling_settings(args.steps, args.guidance_scale, source="--steps/--guidance-scale")
    if not args.volumes and (args.volume_model is not None or args.volumes_per_prompt is not None):
        raise ValueError("--volume-model and --volumes-per-prompt need --3d")
    if args.volumes:  # a missing or 2D volume model fails before anything is written
        from generator.demo import bundled_volume_model_path
        from generator.volumes.model_folder import read_volume_info

        args.volume_model = str(args.volume_model or bundled_volume_model_path())
        read_volume_info(args.volume_model)
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--output {str(out)!r} is a file, not a folder")
    if out.exists() and any(out.iterdir()):
        if not args.overwrite:
            raise FileExistsError(f"--output {str(out)!r} is not empty; pass --overwrite to replace it")
        shutil.rmtree(out)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    progress = not args.quiet
    bar = tqdm(total=6 if args.volumes else 5, desc="demo", unit="stage", disable=not progress)
    volumes = None
    try:

        # 1. The model, loaded in a thread while worker processes render the phantoms it was trained on
        #    (rebuilt from their seeds, for the privacy index) and held-out ones drawn with another seed.
        bar.set_postfix_str("loading the model, rendering the training phantoms")
        model_dir = resolve_model(args.model)
        size, demo_cfg = demo_settings(model_dir)
        n_ref = args.reference_images or int(demo_cfg["num_images"])
        workers = max(1, min(2, os.cpu_count() or 1))

        def render() -> tuple[Any, Any]:
            seed = int(demo_cfg["seed"])
            return (phantom_reference_set(n_ref, size=size, seed=seed, workers=workers),
                    phantom_reference_set(max(200, n_ref // 10), size=size, seed=seed + 1, workers=workers))

        with ThreadPoolExecutor(1) as pool:
            loading = pool.submit(_load_model, model_dir, args.text_encoder)
            ref, hold = render()
            pipe, info = loading.result()
        if info.resolution != size:
            raise ValueError(f"{model_dir}: radsynth.json says {size} px but the model makes {info.resolution} px")
        guidance = args.guidance_scale if args.guidance_scale is not None else float(demo_cfg.get("guidance_scale", 3.0))
        bar.update(1)

        # 2. Privacy index of the training phantoms, calibrated on the held-out ones.
        bar.set_postfix_str("indexing the training phantoms")
        from conditioning.prompts import build_prompt
        from generator.gallery import contact_sheet, gallery_html, save_contact_sheet
        from generator.generation import generate_to_folder, make_requests, prepare_output
        from generator.manifest import atomic_write_text, load_png, read_manifest, update_fields

        phantoms = {"num_images": n_ref, "size": info.resolution, "seed": int(demo_cfg["seed"])}
        embedder = shipped_embedder(Path(info.path), phantoms)
        with warnings.catch_warnings():
            # Phantoms are far more alike than radiographs: the index finds "self-similar data", raises its
            # exact-copy rule and records it (index.json, holdout "warnings"): expected here, not news to print.
            warnings.filterwarnings("ignore", message=r"reference index: self-similar data", category=UserWarning)
            index = ReferenceIndex.build(
                ref.images, ref.ids, ref.patient_ids, holdout_images=hold.images, holdout_ids=hold.ids,
                holdout_patient_ids=hold.patient_ids, alpha=0.01, progress=False,
                embedder_config=EmbedderConfig(steps=DEMO_EMBEDDER_STEPS), embedder=embedder,
                info={"embedder_source": f"{DEMO_EMBEDDER_FILE} of the model folder" if embedder is not None
                      else f"trained now ({DEMO_EMBEDDER_STEPS} steps)"},
            )
        index_dir = out / "privacy_index"
        index.save(index_dir)
        bar.update(1)

        # 3. Generate, gate and export as images are made.
        bar.set_postfix_str("generating")
        images_dir = out / "teaching_set"
        rows = [(build_prompt(a), a, args.images_per_prompt) for a in DEMO_REQUESTS]
        requests = make_requests(rows, args.seed)
        settings = {"model": info.model_hash, "steps": args.steps, "guidance_scale": guidance, "demo": True}
        prepare_output(images_dir, settings, requests, overwrite=True)
        summary = generate_to_folder(
            pipe, info, requests, images_dir, steps=args.steps, guidance_scale=guidance,
            gate=privacy_gate(PrivacyGate(index), info.resolution),
            on_image=export_hook({"dicom", "nifti"}, images_dir, info, modality="DX", images_per_study=1),
            batch_size=8, progress=False,
        )
        bar.update(1)

        # 4. Audit the whole set (JSON + HTML review page) and record it in the manifest.
        bar.set_postfix_str("auditing")
        lines = read_manifest(images_dir)
        stack = np.stack([load_png(images_dir / ln["file_name"]) for ln in lines])
        result = audit_images(index, stack, [ln["file_name"] for ln in lines], progress=False)
        write_json(result, out / "audit.json")
        write_html(result, index, stack, out / "audit.html")
        update_fields(images_dir, {v.file_name: v.manifest_fields() for v in result.images})
        lines = read_manifest(images_dir)
        bar.update(1)

        # 5. Contact sheet, gallery page and a check that the text controls the image.
        bar.set_postfix_str("writing the pages")
        captions = [f"{ln['text']} [{ln.get('privacy_verdict', '?')}]" for ln in lines]
        save_contact_sheet(contact_sheet(list(stack), captions, columns=args.images_per_prompt * 2, tile=160),
                           out / "contact_sheet.png")
        page = gallery_html(images_dir, lines, title="RadSynth demo teaching set", page_dir=out)
        atomic_write_text(out / "index.html", page)
        control = text_control_summary(lines, list(stack))
        atomic_write_text(out / "text_control.json", json.dumps(control, indent=2) + "\n")
        bar.update(1)

        # 6. (--3d) CT volumes: the same steps on the volume demo model, into OUTPUT/volumes.
        if args.volumes:
            bar.set_postfix_str("CT volumes")
            from radsynth.commands._demo_volumes import run_volume_demo

            volumes = run_volume_demo(out / "volumes", model=args.volume_model,
                                      images_per_prompt=args.volumes_per_prompt or 2, steps=args.steps,
                                      guidance_scale=args.guidance_scale, seed=args.seed,
                                      text_encoder=args.text_encoder)
            bar.update(1)
    except Exception:
        bar.close()  # ends the bar's line, so the error message starts on its own line
        if created:
            shutil.rmtree(out, ignore_errors=True)  # a failed demo leaves nothing half-made behind
        raise
    bar.close()

    s = result.summary
    print(f"\nRadSynth demo finished in {time.monotonic() - t0:.0f} s -> {out}/")
    print(f"  model            {info.path} (hash {info.model_hash}; a demonstration model trained on phantoms)")
    print(f"  images           {images_dir}/ ({len(lines)} PNG + metadata.jsonl)")
    print(f"  DICOM studies    {images_dir / 'dicom'}/ (one synthetic patient each)")
    print(f"  NIfTI            {images_dir / 'nifti'}/")
    print(f"  contact sheet    {out / 'contact_sheet.png'}")
    print(f"  gallery page     {out / 'index.html'}")
    print(f"  privacy audit    {out / 'audit.html'}, {out / 'audit.json'} (index: {index_dir}/, "
          f"{len(ref.ids)} training phantoms)")
    print(f"  privacy verdicts {s['counts']} (expected chance rejects at alpha {s['alpha']}: "
          f"{s['expected_chance_flags']['reject']}); resampled during generation: {summary.resampled}")
    print("  text control     " + ", ".join(
        f"{k}: {v['shown']}/{v['n']}" + (f" ({v['swapped']} on the other side)" if v.get("swapped") else "")
        for k, v in control.items()))
    if volumes is not None:
        v = volumes.summary
        print(f"  CT volumes       {volumes.folder}/ ({volumes.n_volumes} NIfTI + JSON sidecars, previews/, "
              f"dicom/ one CT series each; model hash {volumes.model_hash})")
        print(f"  volume audit     {volumes.audit_html}, {volumes.audit_json} (index: {volumes.index_dir}/, "
              f"{volumes.n_references} training CT phantoms): {v['counts']} (expected chance rejects "
              f"{v['expected_chance_flags']['reject']:.2f}); resampled during generation: {volumes.resampled}; "
              f"calibration: {volumes.calibration}")
    return 0
