"""``radsynth train``: data folder -> model folder."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from radsynth._args import oversample_term

HELP = """Train a text-conditioned latent diffusion model on your own radiographs or scans.

Stage 1 trains a single-channel AutoencoderKL on the images; stage 2 trains a
UNet2DConditionModel on the cached latents, cross-attending to a frozen text encoder
(default: the bundled MiniLM). The result is a diffusers model folder plus radsynth.json
and a model card. Training data never goes into the model folder.

--data may be a raw source (held in memory: fine for small sets) or a folder written by
`radsynth prepare` (read from disk in bounded memory, whatever its size). With
--stream-from-disk a raw source is first prepared into OUTPUT/checkpoints/prepared and read
from there (with --dims 3: a volume store in OUTPUT/checkpoints/prepared_volumes, memory-mapped). Latents are cached on disk (OUTPUT/checkpoints/latents-*.npy, memory-mapped)."""

EPILOG = """examples:
  # an imagefolder (images + metadata.jsonl with file_name and text), 20 CPU-minutes
  radsynth train --data my_cxr/ --output models/cxr --preset small --max-minutes 20

  # MedMNIST-style .npz with a text per label
  radsynth train --data pneumoniamnist.npz --label-text "0=normal chest radiograph" \\
      --label-text "1=chest radiograph with pneumonia" --output models/pneu --resolution 32

  # fine-tune the bundled demo model (or any RadSynth / Stable-Diffusion-layout folder) on your data
  radsynth train --data my_cxr/ --output models/cxr_ft --init-from generator/demo_model --max-minutes 10

  # a rare finding: UNet steps draw images whose text names it 3 times as often
  radsynth train --data my_cxr/ --output models/cxr --oversample pneumothorax=3

  # continue an interrupted run from its last checkpoint
  radsynth train --data my_cxr/ --output models/cxr --resume

  # a large dataset: prepare it once, then train from disk with 4 loader workers and augmentation
  radsynth prepare --data big_cxr/ --output big_cxr_256 --resolution 256 --workers 4
  radsynth train --data big_cxr_256/ --output models/big --resolution 256 --preset base \\
      --dataloader-workers 4 --augment --gradient-checkpointing

  # the same in one command: the source is prepared into models/big/checkpoints/prepared first
  # (an interrupted preparation or training continues with --resume)
  radsynth train --data big_cxr/ --output models/big --resolution 256 --stream-from-disk

  # full float32 training (the default is bf16 where the CPU or GPU has native bfloat16)
  radsynth train --data my_cxr/ --output models/cxr --mixed-precision no

  # two processes (CPU: gloo backend) or GPUs
  accelerate launch --multi_gpu --num_processes 2 -m radsynth train --data my_cxr/ --output models/cxr

  # CT volumes (NIfTI files or DICOM series listed in metadata.jsonl), 32^3 at 2 mm
  radsynth phantoms --dims 3 --num-images 200 --output ct_phantoms/
  radsynth train --dims 3 --data ct_phantoms/ --output models/ct3d --resolution 32 --spacing 2 --max-minutes 30
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of ``radsynth train``."""
    p.add_argument("--data", required=True,
                   help="imagefolder, DICOM folder or .npz file, or a folder written by 'radsynth prepare' "
                        "(its resolution must equal --resolution)")
    p.add_argument("--output", required=True, help="model folder to write")
    p.add_argument("--resolution", type=int, default=64, help="image side in pixels (default 64)")
    p.add_argument("--preset", default="small", help="tiny | small | base (32-64 px) | cxr128 | cxr256 | cxr512 (default small); the cxr "
                        "presets take only their own resolution (128/256/512)")
    p.add_argument("--max-minutes", type=float, default=None, help="wall-clock budget of the whole run")
    p.add_argument("--max-steps", type=int, default=None, help="upper bound of steps per stage")
    p.add_argument("--text-encoder", default=None,
                   help="Hugging Face text encoder folder or id (default: bundled MiniLM); radsynth.json "
                        "records its name and weights hash, never its path")
    p.add_argument("--seed", type=int, default=0, help=f"seed of every random draw, 0..{MAX_SEED} (default 0)")
    p.add_argument("--learning-rate", type=float, default=None,
                   help="UNet learning rate, in (0, 1] (default: the preset's)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing model folder")
    p.add_argument("--mixed-precision", default="auto", choices=["auto", "no", "fp16", "bf16"],
                   help="auto (default): bf16 where the hardware has native bfloat16 (AMX/AVX512-BF16 CPUs, "
                        "recent GPUs), else no; the choice is recorded in radsynth.json")
    p.add_argument("--gradient-accumulation-steps", type=int, default=1)
    p.add_argument("--checkpoint-every", type=int, default=None, help="steps between checkpoints")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep OUTPUT/checkpoints at the end")
    p.add_argument("--prediction-type", choices=["epsilon", "v_prediction"], default=None)
    p.add_argument("--attribute-conditioning", action="store_true",
                   help="also condition on the finding/side/lobe/size attributes read back from each prompt "
                        "(conditioning.attributes); off by default, see the README's ablation")
    p.add_argument("--oversample", action="append", default=[], type=oversample_term, metavar="TERM=WEIGHT",
                   help="UNet steps draw images whose text contains TERM (case-insensitive) WEIGHT times as often, "
                        "e.g. a rare finding or class: --oversample nodule=2 (repeat per term; weights of several "
                        "matching terms multiply; the VAE stage draws uniformly); recorded in radsynth.json")
    p.add_argument("--label-text", action="append", default=[], metavar="LABEL=TEXT",
                   help=".npz input: prompt text of a label (repeat per label)")
    p.add_argument("--npz-split", default="train", help=".npz input: split to read (default train)")
    p.add_argument("--reports-csv", default=None, help="DICOM folder input: CSV of report texts")
    p.add_argument("--ct-window", type=float, nargs=2, default=(40.0, 400.0), metavar=("CENTER", "WIDTH"),
                   help="HU window for CT without a stored window (default 40 400)")
    p.add_argument("--init-from", default=None, metavar="MODEL_DIR",
                   help="fine-tune: start the UNet from this RadSynth or Stable-Diffusion-layout model folder "
                        "(its text encoder frozen; its VAE frozen when --resolution equals the model's)")
    p.add_argument("--stream-from-disk", action="store_true",
                   help="raw --data: prepare it first into OUTPUT/checkpoints/prepared (as 'radsynth prepare' "
                        "does; --resume continues an interrupted preparation) and read training batches from "
                        "there, so memory does not grow with the number of images; with --dims 3 a volume store in "
                        "OUTPUT/checkpoints/prepared_volumes (default: hold the images "
                        "in memory; a prepared --data is always read from disk)")
    p.add_argument("--dataloader-workers", type=int, default=0, metavar="N",
                   help="processes reading training batches (and preparing, with --stream-from-disk); results "
                        "do not depend on N (default 0: read in the training process)")
    p.add_argument("--augment", action="store_true",
                   help="augment VAE training batches with small shifts, zooms, rotations and intensity changes "
                        "(never left-right flips: they swap laterality); recorded in radsynth.json")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute activations in the backward pass (UNet and VAE): less memory at large "
                        "resolutions, slower, same results; recorded in radsynth.json")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    from radsynth.commands._volumes import add_volume_train_arguments

    add_volume_train_arguments(p)  # --dims, --spacing (volumes)


MAX_SEED = 2**32 - 1
MAX_RESOLUTION = 4096


def check_flags(args: argparse.Namespace) -> None:
    """Range checks of the numeric flags, before any file is touched.

    Raises:
        ValueError: one line naming the flag and the value received.
    """
    from generator.models.config import check_oversample
    from radsynth._args import check_number

    check_number("--max-minutes", args.max_minutes, low=0.0, high=1e6, low_open=True)  # 1e6 min: ~2 years
    check_oversample(args.oversample, "--oversample")
    check_number("--max-steps", args.max_steps, low=1, high=10**9)
    check_number("--seed", args.seed, low=0, high=MAX_SEED)
    check_number("--learning-rate", args.learning_rate, low=0.0, high=1.0, low_open=True)
    check_number("--gradient-accumulation-steps", args.gradient_accumulation_steps, low=1, high=1024)
    check_number("--checkpoint-every", args.checkpoint_every, low=1, high=10**9)
    check_number("--resolution", args.resolution, low=8, high=MAX_RESOLUTION)
    check_number("--dataloader-workers", args.dataloader_workers, low=0, high=64)
    center, width = args.ct_window
    check_number("--ct-window CENTER", center, low=-1e5, high=1e5)
    check_number("--ct-window WIDTH", width, low=0.0, high=1e5, low_open=True)


def run(args: argparse.Namespace) -> int:
    """Run ``radsynth train``."""
    if args.dims == 3:
        from radsynth.commands._volumes import run_train_3d

        return run_train_3d(args)
    from radsynth._args import prepare_model_output
    from radsynth.commands._wiring import on_main_process
    from accelerate import PartialState

    from generator._utils import cpu_only
    from generator.data import Augment

    from generator.models.config import PRESET_DOWNSAMPLING, get_preset
    from generator.training import Trainer

    check_flags(args)
    if args.init_from is not None:
        from generator.models.model_folder import read_model_info

        read_model_info(args.init_from)  # a missing or foreign folder fails before anything is written
    state = PartialState(cpu=cpu_only())
    output = Path(args.output)
    overrides: dict[str, object] = {}
    if args.checkpoint_every is not None:
        overrides["checkpoint_every"] = args.checkpoint_every
    if args.prediction_type is not None:
        overrides["prediction_type"] = args.prediction_type
    if args.attribute_conditioning:
        overrides["attribute_conditioning"] = True
    if args.oversample:
        overrides["oversample"] = tuple(args.oversample)
    if args.learning_rate is not None:
        overrides["unet_lr"] = args.learning_rate
    try:
        config = get_preset(args.preset, **overrides)
    except ValueError as exc:
        raise ValueError(f"--preset {args.preset}: {exc}") from None
    try:
        if args.init_from is None:  # fine-tuning may reuse the model's VAE (the Trainer checks then)
            config.vae_block_channels(args.resolution)  # fail fast on an impossible resolution
    except ValueError as exc:
        if args.preset in PRESET_DOWNSAMPLING:  # resolution presets: their own message names the size
            raise ValueError(f"--resolution: {exc}") from None
        raise ValueError(
            f"--resolution must be latent_size ({config.latent_size}) of preset {args.preset!r} times a power "
            f"of two (e.g. {config.latent_size * 2} or {config.latent_size * 4}), got {args.resolution}"
        ) from None
    on_main_process(state, prepare_model_output, output, resume=args.resume, overwrite=args.overwrite)
    data = training_data(args, output, state)
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
        init_from=args.init_from,
        dataloader_workers=args.dataloader_workers,
        augment=Augment() if args.augment else None,
        gradient_checkpointing=args.gradient_checkpointing,
    ).run()
    if state.is_main_process:
        print(
            f"model written to {output} (steps {result.steps}, final loss "
            f"{ {k: round(v, 4) for k, v in result.final_loss.items()} }); log: {output / 'train_log.csv'}"
        )
    return 0


def training_data(args: argparse.Namespace, output: Path, state: Any) -> object:
    """What ``--data`` names, as the Trainer takes it.

    A prepared folder (``radsynth prepare``): a :class:`PreparedDataset` read from disk. A raw source:
    loaded into memory, or with ``--stream-from-disk`` prepared into ``OUTPUT/checkpoints/prepared`` by
    the main process (resumed with ``--resume``) and read from there.

    Raises:
        ValueError: a prepared folder at another resolution than ``--resolution`` (naming the folder and
            both), an unfinished preparation, or a source ``load_dataset``/``prepare`` refuses.
    """
    from radsynth._args import parse_label_text
    from radsynth.commands._wiring import on_main_process

    from generator.data import PreparedDataset, is_prepared, load_dataset, prepare
    from generator.data.prepared import PROGRESS_NAME
    from generator.training import PREPARED_DIR

    source = Path(args.data)
    if is_prepared(source) or (source.is_dir() and (source / PROGRESS_NAME).is_file()):
        return PreparedDataset(source, resolution=args.resolution)  # an unfinished one says how to finish it
    options = dict(label_text=parse_label_text(args.label_text), npz_split=args.npz_split,
                   reports_csv=args.reports_csv, ct_window=tuple(args.ct_window))
    main = bool(getattr(state, "is_main_process", True))
    if not args.stream_from_disk:
        return load_dataset(source, resolution=args.resolution, progress=not args.quiet and main, **options)
    folder = output / "checkpoints" / PREPARED_DIR
    on_main_process(state, prepare, source, folder, resolution=args.resolution,
                    workers=max(1, args.dataloader_workers), resume=args.resume, progress=not args.quiet,
                    **options)
    return PreparedDataset(folder, resolution=args.resolution)
