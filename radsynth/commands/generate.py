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


def run(args: argparse.Namespace) -> int:
    """Run ``radsynth generate``."""
    from accelerate import PartialState

    from generator._utils import cpu_only
    from generator.demo import resolve_model
    from generator.gallery import folder_contact_sheet
    from generator.generation import generate_to_folder, make_requests, prepare_output, regenerate_line
    from generator.manifest import save_png, sort_manifest
    from generator.models.samplers import make_sampler
    from generator.models.model_folder import load_pipeline
    from radsynth.commands._wiring import export_hook, privacy_gate

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
            folder_contact_sheet(output, Path(args.grid))
            print(f"contact sheet: {args.grid}")
    return 0
