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
stopped when started again.

With a volume model (trained with 'radsynth train --dims 3') it writes one NIfTI volume per sample
(RAS affine from the model's spacing, HU for CT, JSON sidecar), axial/coronal/sagittal previews under
previews/, and metadata.jsonl; --format dicom adds one CT/MR image series per volume under dicom/."""

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

  # CT volumes from a volume model, also as DICOM series
  radsynth generate --model models/ct3d --prompt "chest CT, 12 mm nodule in the right upper lobe" \\
      --num-images 4 --format dicom --modality CT --output ct_synth/

  # split across processes (no duplicate seed or file)
  accelerate launch --multi_gpu --num_processes 2 -m radsynth generate --model models/cxr --prompts r.csv --output out/
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of ``radsynth generate``."""
    from generator.models.samplers import DEFAULT_SAMPLER, DEFAULT_STEPS, MAX_GUIDANCE, MAX_STEPS, PRECISIONS, Sampler
    from radsynth._args import existing_dir, existing_file, float_in, int_in, new_file, seed

    p.add_argument("--model", default=None, help="model folder (default: the bundled demo model)")
    p.add_argument("--prompt", action="append", default=[], help="prompt text (repeatable)")
    p.add_argument("--prompts", type=existing_file, default=None, help="CSV or JSONL prompt file")
    p.add_argument("--num-images", type=int_in(1, 100_000), default=1, help="images per --prompt (default 1)")
    p.add_argument("--seed", type=seed, default=0, help="base seed; image i gets seed+i")
    p.add_argument("--output", default="synthetic", help="output folder (default ./synthetic)")
    p.add_argument("--steps", type=int_in(1, MAX_STEPS), default=DEFAULT_STEPS,
                   help=f"sampler steps (default {DEFAULT_STEPS})")
    p.add_argument("--guidance-scale", type=float_in(0.0, MAX_GUIDANCE), default=2.0, help="classifier-free guidance (default 2)")
    p.add_argument("--sampler", default=str(DEFAULT_SAMPLER),
                   help=" | ".join(str(x) for x in Sampler) + f" (default {DEFAULT_SAMPLER})")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--batch-size", type=int_in(1, 4096), default=16,
                   help="images per pipeline call; does not change the pixels (default 16)")
    p.add_argument("--grid", type=new_file, default=None, metavar="FILE.png", help="write a captioned contact sheet")
    p.add_argument("--overwrite", action="store_true", help="replace another run's output")
    p.add_argument("--privacy-index", type=existing_dir, default=None, help="index from 'radsynth index': reject copies")
    p.add_argument("--max-resample", type=int_in(0, 100), default=3, help="attempts for a rejected image (default 3)")
    p.add_argument("--format", action="append", default=None, choices=["png", "dicom", "nifti"],
                   help="png (always written), dicom, nifti; repeatable")
    p.add_argument("--modality", default=None, help="DICOM modality override (DX, CT, MR)")
    p.add_argument("--images-per-study", type=int_in(1, 100_000), default=1, help="DICOM: images per synthetic patient")
    p.add_argument("--from-manifest", default=None, metavar="LINE",
                   help="regenerate the image (or, on a volume model, the volume) of one metadata.jsonl line (JSON text)")
    p.add_argument("--text-encoder", default=None, metavar="PATH_OR_ID",
                   help="text encoder to use instead of the model folder's own (its width must fit the UNet)")
    p.add_argument("--device", default=None, choices=["cuda", "mps", "cpu"], help="cuda | mps | cpu (default: best available)")
    p.add_argument("--precision", default="auto", choices=list(PRECISIONS),
                   help="UNet precision: auto = bfloat16 where the CPU (AMX/AVX-512-BF16) or GPU has it, else "
                        "fp32 (default auto); fp32 opts out")
    p.add_argument("--bf16", dest="precision", action="store_const", const="bf16", help="same as --precision bf16")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _prompt_rows(args: argparse.Namespace) -> list[tuple[str, dict[str, Any] | None, int]]:
    from conditioning.prompt_file import read_prompt_file

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


def _manifest_line(args: argparse.Namespace, default_name: str) -> tuple[dict, Path]:
    """The ``--from-manifest`` line as a dict and the file it regenerates (``--output`` / its file name).

    Raises:
        ValueError: not one JSON object, or a ``file_name`` that is not a plain file name.
        FileExistsError: the target exists and ``--overwrite`` is not given.
    """
    try:
        line = json.loads(args.from_manifest)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--from-manifest must be one JSON line of metadata.jsonl ({exc.msg})") from None
    if not isinstance(line, dict):
        raise ValueError(f"--from-manifest must be a JSON object (one metadata.jsonl line), "
                         f"got a {type(line).__name__}")
    name = line.get("file_name", default_name)
    if not isinstance(name, str) or not name.strip() or Path(name).name in ("", ".", ".."):
        raise ValueError(f"--from-manifest: file_name must be a file name, got {name!r}")
    target = Path(args.output) / Path(name).name
    if target.exists() and not args.overwrite:
        raise FileExistsError(f"{target} exists; pass --overwrite to replace it")
    return line, target


def run(args: argparse.Namespace) -> int:
    """Run ``radsynth generate``.

    A volume model (``radsynth.json`` with ``dims: 3``) takes the 3D branch
    (:func:`radsynth.commands._volumes.run_generate_3d`): one NIfTI + JSON sidecar, one preview PNG and one
    manifest line per volume; ``--format dicom`` adds a DICOM image series per volume.
    """
    from generator.demo import resolve_model as _resolve
    from radsynth.commands._volumes import is_volume_model, run_generate_3d

    if is_volume_model(_resolve(args.model)):
        return run_generate_3d(args, _resolve(args.model), _prompt_rows, _manifest_line)

    from accelerate import PartialState

    from generator._utils import cpu_only
    from generator.demo import resolve_model
    from generator.gallery import folder_contact_sheet
    from generator.generation import (
        check_sampling_settings,
        generate_to_folder,
        make_requests,
        prepare_output,
        regenerate_line,
    )
    from generator.manifest import save_png, sort_manifest
    from diffusers import DDPMScheduler

    from generator._utils import check_device
    from generator.models.samplers import make_sampler
    from generator.models.model_folder import load_pipeline
    from radsynth.commands._wiring import export_hook, on_main_process, privacy_gate

    check_sampling_settings(args.steps, args.guidance_scale, source="--steps/--guidance-scale")
    if args.device is not None:
        check_device(args.device)
    if args.from_manifest is None:
        make_sampler(args.sampler, DDPMScheduler())  # an unknown --sampler fails before the model loads
    rows = None if args.from_manifest else _prompt_rows(args)
    model_path = resolve_model(args.model)
    state = PartialState(cpu=cpu_only())
    device = args.device or (str(state.device) if state.num_processes > 1 else None)
    pipe, info = load_pipeline(model_path, device=device, text_encoder=args.text_encoder)
    if not args.from_manifest:
        pipe.scheduler = make_sampler(args.sampler, pipe.scheduler)
    output = Path(args.output)

    if args.from_manifest:
        line, target = _manifest_line(args, "regenerated.png")
        if line.get("model") and line["model"] != info.model_hash:
            print(f"warning: the line was made by model {line['model']}, this is {info.model_hash}",
                  file=sys.stderr)
        image = regenerate_line(pipe, line)  # validates the line before anything is written
        output.mkdir(parents=True, exist_ok=True)
        bits = 16 if int(info.intensity.get("bits_stored", 8)) > 8 else 8
        save_png(image, target, bits=bits)
        print(f"regenerated {target} (sampler {line.get('sampler', 'dpm')}, seed {line['seed']})")
        return 0

    requests = make_requests(rows, args.seed)
    gate = privacy_gate(args.privacy_index, info.resolution) if args.privacy_index else None
    settings = {
        "model": info.model_hash, "steps": args.steps, "guidance_scale": args.guidance_scale,
        "precision": args.precision,
        "sampler": args.sampler, "negative_prompt": args.negative_prompt,
        "privacy_index": None if args.privacy_index is None else Path(args.privacy_index).name, "formats": sorted(set(args.format or ["png"])),
        "max_resample": args.max_resample,
    }
    on_main_process(state, prepare_output, output, settings, requests, overwrite=args.overwrite)

    hook = export_hook(set(args.format or ["png"]), output, info, modality=args.modality,
                       images_per_study=args.images_per_study)
    summary = generate_to_folder(
        pipe, info, requests, output,
        steps=args.steps, guidance_scale=args.guidance_scale, sampler=args.sampler,
        negative_prompt=args.negative_prompt, batch_size=args.batch_size,
        gate=gate, max_resample=args.max_resample, on_image=hook,
        process_index=state.process_index, num_processes=state.num_processes,
        precision=args.precision, progress=not args.quiet and state.is_main_process,
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
