"""``radsynth train``: data folder -> model folder."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

HELP = """Train a text-conditioned latent diffusion model on your own radiographs or scans.

Stage 1 trains a single-channel AutoencoderKL on the images; stage 2 trains a
UNet2DConditionModel on the cached latents, cross-attending to a frozen text encoder
(default: the bundled MiniLM). The result is a diffusers model folder plus radsynth.json
and a model card. Training data never goes into the model folder."""

EPILOG = """examples:
  # an imagefolder (images + metadata.jsonl with file_name and text), 20 CPU-minutes
  radsynth train --data my_cxr/ --output models/cxr --preset small --max-minutes 20

  # MedMNIST-style .npz with a text per label
  radsynth train --data pneumoniamnist.npz --label-text "0=normal chest radiograph" \\
      --label-text "1=chest radiograph with pneumonia" --output models/pneu --resolution 32

  # continue an interrupted run from its last checkpoint
  radsynth train --data my_cxr/ --output models/cxr --resume

  # two processes (CPU: gloo backend) or GPUs
  accelerate launch --multi_gpu --num_processes 2 -m radsynth train --data my_cxr/ --output models/cxr
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of ``radsynth train``."""
    p.add_argument("--data", required=True, help="imagefolder, DICOM folder or .npz file")
    p.add_argument("--output", required=True, help="model folder to write")
    p.add_argument("--resolution", type=int, default=64, help="image side in pixels (default 64)")
    p.add_argument("--preset", default="small", help="tiny | small | base (default small)")
    p.add_argument("--max-minutes", type=float, default=None, help="wall-clock budget of the whole run")
    p.add_argument("--max-steps", type=int, default=None, help="upper bound of steps per stage")
    p.add_argument("--text-encoder", default=None,
                   help="Hugging Face text encoder folder or id (default: bundled MiniLM)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing model folder")
    p.add_argument("--mixed-precision", default="no", choices=["no", "fp16", "bf16"])
    p.add_argument("--gradient-accumulation-steps", type=int, default=1)
    p.add_argument("--checkpoint-every", type=int, default=None, help="steps between checkpoints")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep OUTPUT/checkpoints at the end")
    p.add_argument("--prediction-type", choices=["epsilon", "v_prediction"], default=None)
    p.add_argument("--label-text", action="append", default=[], metavar="LABEL=TEXT",
                   help=".npz input: prompt text of a label (repeat per label)")
    p.add_argument("--npz-split", default="train", help=".npz input: split to read (default train)")
    p.add_argument("--reports-csv", default=None, help="DICOM folder input: CSV of report texts")
    p.add_argument("--ct-window", type=float, nargs=2, default=(40.0, 400.0), metavar=("CENTER", "WIDTH"),
                   help="HU window for CT without a stored window (default 40 400)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def parse_label_text(items: list[str]) -> dict[int, str] | None:
    """``["0=normal", "1=pneumonia"]`` -> ``{0: "normal", 1: "pneumonia"}``.

    Raises:
        ValueError: an item without ``=`` or with a non-integer label.
    """
    if not items:
        return None
    out: dict[int, str] = {}
    for item in items:
        label, sep, text = item.partition("=")
        if not sep or not text.strip():
            raise ValueError(f"--label-text must look like LABEL=TEXT, got {item!r}")
        try:
            out[int(label)] = text.strip()
        except ValueError:
            raise ValueError(f"--label-text label must be an integer, got {label!r}") from None
    return out


def prepare_output(output: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse to clobber an existing model folder unless asked to (main process only).

    Raises:
        FileExistsError: ``output`` exists, is not empty, and neither flag is given.
        ValueError: both flags are given.
    """
    if resume and overwrite:
        raise ValueError("--resume and --overwrite exclude each other")
    if output.exists() and not output.is_dir():
        raise FileExistsError(f"--output {str(output)!r} exists and is not a folder")
    if output.is_dir() and any(output.iterdir()):
        if overwrite:
            shutil.rmtree(output)
        elif not resume:
            raise FileExistsError(
                f"--output {str(output)!r} is not empty: pass --resume to continue its training or "
                "--overwrite to replace it"
            )


def run(args: argparse.Namespace) -> int:
    """Run ``radsynth train``."""
    from accelerate import PartialState

    from generator._utils import cpu_only

    from generator.models.config import get_preset
    from generator.data import load_dataset
    from generator.training import Trainer

    state = PartialState(cpu=cpu_only())
    output = Path(args.output)
    overrides = {}
    if args.checkpoint_every is not None:
        overrides["checkpoint_every"] = args.checkpoint_every
    if args.prediction_type is not None:
        overrides["prediction_type"] = args.prediction_type
    config = get_preset(args.preset, **overrides)
    config.vae_block_channels(args.resolution)  # fail fast on an impossible resolution
    if state.is_main_process:
        prepare_output(output, resume=args.resume, overwrite=args.overwrite)
    state.wait_for_everyone()
    data = load_dataset(
        args.data,
        resolution=args.resolution,
        label_text=parse_label_text(args.label_text),
        npz_split=args.npz_split,
        reports_csv=args.reports_csv,
        ct_window=tuple(args.ct_window),
        progress=not args.quiet and state.is_main_process,
    )
    result = Trainer(
        data,
        output,
        config,
        resolution=args.resolution,
        text_encoder=args.text_encoder,
        seed=args.seed,
        max_minutes=args.max_minutes,
        max_steps=args.max_steps,
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        resume=args.resume,
        keep_checkpoints=args.keep_checkpoints,
        progress=not args.quiet,
    ).run()
    if state.is_main_process:
        print(
            f"model written to {output} (steps {result.steps}, final loss "
            f"{ {k: round(v, 4) for k, v in result.final_loss.items()} }); log: {output / 'train_log.csv'}"
        )
    return 0
