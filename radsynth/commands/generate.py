"""``radsynth generate``: model + prompts -> imagefolder (+ privacy verdicts, DICOM/NIfTI exports)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

HELP = """Sample synthetic images from prompts with a trained model.

Writes an imagefolder: PNG files (16-bit when the model's data had more than 8 bits) and
metadata.jsonl with one line per image (file_name, text, seed, model hash, sampler, steps,
guidance_scale, attributes, privacy verdict, export paths). Seeds are per image (base seed +
index), so the same command gives identical pixels and an interrupted run continues where it
stopped when started again."""

EPILOG = """examples:
  # four images of one finding, with the bundled demo model
  radsynth generate --prompt "frontal chest radiograph, small left pleural effusion, 70 year old woman" \\
      --num-images 4 --output synth/

  # a balanced augmentation set from a prompt file (CSV/JSONL: text or attribute columns, num_images)
  radsynth generate --model models/cxr --prompts requests.csv --output aug/ --grid aug/sheet.png

  # a shareable teaching set: privacy-gated, exported as DICOM studies and NIfTI
  radsynth generate --model models/cxr --prompts teaching.jsonl --privacy-index idx/ \\
      --format png --format dicom --format nifti --output teach/

  # regenerate one image from its manifest line
  radsynth generate --model models/cxr --from-manifest "$(sed -n 3p teach/metadata.jsonl)" --output one/

  # split across processes (no duplicate seed or file)
  accelerate launch --multi_gpu --num_processes 2 -m radsynth generate --model models/cxr --prompts r.csv --output out/
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of ``radsynth generate``."""
    p.add_argument("--model", default=None, help="model folder (default: the bundled demo model)")
    p.add_argument("--prompt", action="append", default=[], help="prompt text (repeatable)")
    p.add_argument("--prompts", default=None, help="CSV or JSONL prompt file")
    p.add_argument("--num-images", type=int, default=1, help="images per --prompt (default 1)")
    p.add_argument("--seed", type=int, default=0, help="base seed; image i gets seed+i")
    p.add_argument("--output", default="synthetic", help="output folder (default ./synthetic)")
    p.add_argument("--steps", type=int, default=25, help="sampler steps (default 25)")
    p.add_argument("--guidance-scale", type=float, default=2.0, help="classifier-free guidance (default 2)")
    p.add_argument("--sampler", default="dpm", help="dpm | ddim | euler | ddpm (default dpm)")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--grid", default=None, metavar="FILE.png", help="write a captioned contact sheet")
    p.add_argument("--overwrite", action="store_true", help="replace another run's output")
    p.add_argument("--privacy-index", default=None, help="index from 'radsynth index': reject copies")
    p.add_argument("--max-resample", type=int, default=3, help="attempts for a rejected image (default 3)")
    p.add_argument("--format", action="append", default=None, choices=["png", "dicom", "nifti"],
                   help="png (always written), dicom, nifti; repeatable")
    p.add_argument("--modality", default=None, help="DICOM modality override (DX, CT, MR)")
    p.add_argument("--images-per-study", type=int, default=1, help="DICOM: images per synthetic patient")
    p.add_argument("--from-manifest", default=None, metavar="LINE",
                   help="regenerate the image of one metadata.jsonl line (JSON text)")
    p.add_argument("--device", default=None, help="cuda | mps | cpu (default: best available)")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast for the UNet")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _prompt_rows(args: argparse.Namespace) -> list[tuple[str, dict[str, Any] | None, int]]:
    from conditioning.prompt_file import read_prompt_file

    if args.num_images < 1:
        raise ValueError(f"--num-images must be >= 1, got {args.num_images}")
    if args.prompt and args.prompts:
        raise ValueError("give --prompt or --prompts, not both")
    if args.prompts:
        return read_prompt_file(args.prompts)
    if not args.prompt:
        raise ValueError("give at least one --prompt TEXT or a --prompts FILE")
    for text in args.prompt:
        if not text.strip():
            raise ValueError(f"--prompt must not be empty, got {text!r}")
    return [(t, None, args.num_images) for t in args.prompt]


def resolve_model(model: str | None) -> str:
    """The ``--model`` folder, or the bundled demo model when omitted."""
    if model is not None:
        return model
    from generator.demo import bundled_model_path

    return str(bundled_model_path())


def run(args: argparse.Namespace) -> int:
    """Run ``radsynth generate``."""
    from accelerate import PartialState

    from generator.devices import cpu_only

    from generator.generation import (
        generate_to_folder,
        make_requests,
        prepare_output,
        regenerate_line,
        save_png,
        sort_manifest,
    )
    from generator.model_folder import load_pipeline
    from generator.models import make_sampler

    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    rows = None if args.from_manifest else _prompt_rows(args)
    model_path = resolve_model(args.model)
    state = PartialState(cpu=cpu_only())
    device = args.device or (str(state.device) if state.num_processes > 1 else None)
    pipe, info = load_pipeline(model_path, device=device)
    pipe.scheduler = make_sampler(args.sampler, pipe.scheduler)
    output = Path(args.output)

    if args.from_manifest:
        try:
            line = json.loads(args.from_manifest)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--from-manifest must be one JSON line of metadata.jsonl ({exc.msg})") from None
        output.mkdir(parents=True, exist_ok=True)
        target = output / Path(line.get("file_name", "regenerated.png")).name
        if target.exists() and not args.overwrite:
            raise FileExistsError(f"{target} exists; pass --overwrite to replace it")
        if line.get("model") and line["model"] != info.model_hash:
            print(f"warning: the line was made by model {line['model']}, this is {info.model_hash}",
                  file=sys.stderr)
        image = regenerate_line(pipe, line)
        bits = 16 if int(info.intensity.get("bits_stored", 8)) > 8 else 8
        save_png(image, target, bits=bits)
        print(f"regenerated {target}")
        return 0

    requests = make_requests(rows, args.seed)
    settings = {
        "model": info.model_hash, "steps": args.steps, "guidance_scale": args.guidance_scale,
        "sampler": args.sampler, "negative_prompt": args.negative_prompt,
        "privacy_index": args.privacy_index, "formats": sorted(set(args.format or ["png"])),
        "max_resample": args.max_resample,
    }
    if state.is_main_process:
        prepare_output(output, settings, requests, overwrite=args.overwrite)
    state.wait_for_everyone()

    gate = privacy_gate(args.privacy_index, info.resolution) if args.privacy_index else None
    hook = export_hook(set(args.format or ["png"]), output, info, modality=args.modality,
                       images_per_study=args.images_per_study)
    summary = generate_to_folder(
        pipe, info, requests, output,
        steps=args.steps, guidance_scale=args.guidance_scale, sampler=args.sampler,
        negative_prompt=args.negative_prompt, batch_size=args.batch_size,
        gate=gate, max_resample=args.max_resample, on_image=hook,
        process_index=state.process_index, num_processes=state.num_processes,
        autocast_bf16=args.bf16, progress=not args.quiet and state.is_main_process,
    )
    state.wait_for_everyone()
    parts = [summary]
    if state.num_processes > 1:
        from accelerate.utils import gather_object

        parts = gather_object([summary])
    if state.is_main_process:
        sort_manifest(output)
        total = {k: sum(getattr(p, k) for p in parts) for k in ("written", "skipped_done", "resampled", "rejected")}
        print(
            f"{total['written']} images written, {total['skipped_done']} already done, "
            f"{total['resampled']} resampled by the privacy gate, {total['rejected']} dropped after "
            f"{args.max_resample} attempts ({state.num_processes} process(es)) -> {output}"
        )
        if args.grid:
            write_grid(output, Path(args.grid))
            print(f"contact sheet: {args.grid}")
    return 0


def privacy_gate(index: Any, resolution: int):
    """A ``generation.Gate`` from an index folder (or a loaded ``PrivacyGate``).

    Raises:
        ValueError: the index was built at another resolution than the model's.
    """
    from privacy.gate import PrivacyGate

    gate = index if isinstance(index, PrivacyGate) else PrivacyGate.load(index)
    if int(gate.resolution) != int(resolution):
        raise ValueError(
            f"--privacy-index was built at {gate.resolution} px but the model makes {resolution} px "
            f"images: rebuild the index with --resolution {resolution}"
        )

    def check(images):
        return [v.manifest_fields() for v in gate.check(images)]

    return check


def export_hook(formats: set[str], output: Path, info: Any, *, modality: str | None = None,
                images_per_study: int = 1):
    """A ``generation.ImageHook`` exporting each image as it is made; ``None`` for PNG only.

    The exporters own ``output/dicom`` and ``output/nifti`` and may overwrite there: the output
    folder belongs to this run (checked by ``prepare_output``), and an image whose manifest line was
    not written before an interruption is made and exported again.
    """
    formats = set(formats) - {"png"}
    if not formats:
        return None
    from exporters import DicomExporter, NiftiExporter

    from radsynth import __version__

    modality = (modality or info.modality or "DX").upper()
    common = {"software_name": "RadSynth", "software_version": __version__, "overwrite": True,
              "intensity": info.intensity}
    exporters: dict[str, Any] = {}
    if "dicom" in formats:
        exporters["dicom_file"] = DicomExporter(output / "dicom", modality,
                                                images_per_study=images_per_study, **common)
    if "nifti" in formats:
        exporters["nifti_file"] = NiftiExporter(output / "nifti", modality, **common)

    def hook(image, line):
        return {key: exp.add(image, line)[0].relative_to(output).as_posix() for key, exp in exporters.items()}

    return hook


def write_grid(output: Path, path: Path, limit: int = 48) -> None:
    import numpy as np
    from PIL import Image

    from generator.generation import read_manifest
    from generator.grid import contact_sheet, save_contact_sheet

    lines = read_manifest(output)[:limit]
    images = []
    for ln in lines:
        with Image.open(output / ln["file_name"]) as im:
            scale = 255.0 if im.mode == "L" else 65535.0
            images.append(np.asarray(im, dtype=np.float64) / scale)
    captions = [f"{ln['text']} (seed {ln['seed']}; {ln.get('privacy_verdict', 'unchecked')})" for ln in lines]
    save_contact_sheet(contact_sheet(images, captions), path)
