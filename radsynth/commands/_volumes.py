"""Volume (3D) branches of the verbs: ``train --dims 3``, ``generate`` with a volume model, ``index`` and
``audit`` on volume folders (issue 10; DESIGN.md §8).

Like :mod:`radsynth.commands._wiring`, this module joins generator, privacy and exporters; the verbs call
into it (``if args.dims == 3: return run_train_3d(args)``), they do not import each other. Every flag is
checked before anything is written; a bad one is a ``ValueError`` naming the flag and the value.

Array conventions: volumes are ``(D, H, W)`` in the standard layout of :mod:`generator.volumes.records`
(RAS+ affine, spacing ``(slice, row, column)`` mm), physical units (HU for CT) in a ``Volume``, the model
range ``[0, 1]`` for networks and the privacy index.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any, Callable

from radsynth._args import check_number, prepare_model_output

__all__ = [
    "add_volume_train_arguments",
    "run_train_3d",
    "is_volume_model",
    "is_volume_folder",
    "run_generate_3d",
    "volume_writer",
    "volume_privacy_gate",
    "index_gate",
    "run_index_3d",
    "run_audit_3d",
    "audit_volume_folder",
]

#: Volume sides ``--resolution`` accepts for ``train --dims 3`` (a cube; the preset must divide it).
MAX_VOLUME_RESOLUTION = 256
_MAX_SEED = 2**32 - 1


# ------------------------------------------------------------------------------------------ helpers
def _spacing(text: Any, flag: str = "--spacing") -> tuple[float, float, float] | None:
    """``--spacing MM`` or ``"S,R,C"`` -> ``(slice, row, column)`` mm, or ``None``.

    Raises:
        ValueError: naming the flag and the value.
    """
    from generator.volumes.geometry import parse_spacing

    try:
        return parse_spacing(text)
    except ValueError:
        raise ValueError(f"{flag} must be 1 or 3 positive numbers in mm (e.g. 2 or 3,1.5,1.5), got {text!r}") from None


def is_volume_model(path: str | Path) -> bool:
    """Whether ``path`` is a model folder whose ``radsynth.json`` says ``dims: 3``."""
    try:
        info = json.loads((Path(path) / "radsynth.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(info, dict) and info.get("dims") == 3


def is_volume_folder(path: str | Path) -> bool:
    """Whether a data folder lists volumes: its metadata's first ``file_name`` is a 3D NIfTI file (every
    axis longer than 1) or a DICOM series folder."""
    from generator.data.metadata import METADATA_NAMES, read_metadata_rows

    root = Path(path)
    metas = [root / n for n in METADATA_NAMES if (root / n).is_file()]
    if not root.is_dir() or not metas:
        return False
    try:
        rows = read_metadata_rows(metas[0])
    except ValueError:
        return False
    name = str(rows[0].get("file_name") or "") if rows else ""
    member = root / name
    if name and member.is_dir():
        return True
    if name.lower().endswith((".nii", ".nii.gz")) and member.is_file():
        import nibabel as nib

        try:
            shape = nib.load(str(member)).shape
        except Exception:  # noqa: BLE001 - an unreadable file is reported by the loader, not here
            return False
        return len(shape) >= 3 and min(shape[:3]) > 1
    return False


def _intensity_window(mapping: dict[str, Any]) -> tuple[float, float] | None:
    """The CT window ``(low, high)`` HU of a ``ct_window`` mapping, else ``None``."""
    if str(mapping.get("kind")) == "ct_window":
        return float(mapping["low"]), float(mapping["high"])
    return None


# ------------------------------------------------------------------------------------------ train
def add_volume_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags ``radsynth train`` needs for volumes beyond the 2D ones: ``--dims`` and ``--spacing``.

    ``--resolution`` is the cube side (16, 32, 64: a multiple of what the preset's VAE and UNet halve);
    ``--preset`` is ``tiny``, ``small`` or ``lean`` (the benchmark's recipe) for volumes.
    """
    parser.add_argument("--dims", type=int, choices=[2, 3], default=2,
                        help="2 (default): images; 3: volumes (NIfTI files or DICOM series listed in metadata.jsonl, "
                             "or a DICOM archive without one, texts from --reports-csv)")
    parser.add_argument("--spacing", default=None, metavar="MM",
                        help="--dims 3: resample volumes to this spacing in mm, one number (isotropic) or "
                             "SLICE,ROW,COLUMN (default: keep the files' own, which must then agree)")


def run_train_3d(args: argparse.Namespace) -> int:
    """``radsynth train --dims 3``: a volume folder -> a volume model folder (:class:`VolumeTrainer`).

    Reads ``data``, ``output``, ``resolution``, ``preset``, ``spacing``, ``max_minutes``, ``max_steps``
    (upper bound of the steps of each stage: VAE default 200, UNet 1000), ``seed``, ``learning_rate``
    (UNet), ``checkpoint_every``, ``oversample`` (``(term, weight)`` pairs), ``prediction_type``,
    ``mixed_precision`` (``auto``: bf16 where the device
    has it natively; ``no``; ``bf16``), ``text_encoder``, ``resume``, ``overwrite``, ``keep_checkpoints``,
    ``quiet``, ``reports_csv`` (a ``data`` folder of DICOM series without a metadata file: report texts keyed
    by StudyInstanceUID or AccessionNumber), ``stream_from_disk`` (the volumes are first written one at a time
    into the volume store ``OUTPUT/checkpoints/prepared_volumes`` (:mod:`generator.volumes.store`) and training
    reads them from there, memory-mapped, so memory does not grow with their number; with ``resume`` a store
    written from the same source and settings is reused; the weights equal those of the in-memory path);
    refuses 2D-only flags that would be silently ignored. Under ``torchrun`` or ``accelerate launch`` every
    process runs this; the main process alone prepares the output folder (and the store) and prints.

    Raises:
        ValueError: a bad or unsupported flag (named), or a data folder without usable volumes.
        FileExistsError: a non-empty ``--output`` without ``--resume``/``--overwrite``.
    """
    from dataclasses import replace

    get = lambda name, default=None: getattr(args, name, default)  # noqa: E731 - flags added by train.py
    why_not = {"--init-from": "volumes train from scratch", "--label-text": "volumes carry their own texts",
               "--attribute-conditioning": "the volume UNet conditions on the text states only",
               "--gradient-accumulation-steps": "the volume trainer steps once per batch",
               "--mixed-precision": "volumes train in float32 or bf16 (no fp16 gradient scaler)"}
    for flag, name, bad in (("--init-from", "init_from", lambda v: v is not None),
                            ("--label-text", "label_text", bool),
                            ("--attribute-conditioning", "attribute_conditioning", bool),
                            ("--gradient-accumulation-steps", "gradient_accumulation_steps", lambda v: v not in (None, 1)),
                            ("--mixed-precision", "mixed_precision", lambda v: v == "fp16")):
        value = get(name)
        if bad(value):
            raise ValueError(f"{flag} {value!r} is not supported with --dims 3 ({why_not[flag]})")
    check_number("--max-minutes", get("max_minutes"), low=0.0, high=1e6, low_open=True)
    check_number("--max-steps", get("max_steps"), low=1, high=10**9)
    check_number("--seed", get("seed", 0), low=0, high=_MAX_SEED)
    check_number("--learning-rate", get("learning_rate"), low=0.0, high=1.0, low_open=True)
    check_number("--checkpoint-every", get("checkpoint_every"), low=1, high=10**9)
    from generator.models.config import check_oversample

    check_oversample(get("oversample"), "--oversample")
    resolution = get("resolution", 32)
    check_number("--resolution", resolution, low=8, high=MAX_VOLUME_RESOLUTION)
    spacing = _spacing(get("spacing"))

    from generator.volumes.models import get_volume_preset
    from generator.volumes.training import VolumeTrainConfig

    preset_name = get("preset") or "small"
    try:
        config = get_volume_preset(preset_name)
    except ValueError as exc:
        raise ValueError(f"--preset {preset_name!r} is not a volume preset ({' '.join(str(exc).split())})") from None
    if get("prediction_type"):
        config = replace(config, prediction_type=get("prediction_type"))
    try:
        config.latent_shape((resolution,) * 3)
    except ValueError:
        need = config.vae_factor * 2 ** (len(config.unet_channels) - 1)
        raise ValueError(f"--resolution must be a multiple of {need} for volume preset {preset_name!r} "
                         f"(e.g. {need * 4} or {need * 8}), got {resolution}") from None
    defaults = VolumeTrainConfig.for_preset(preset_name)
    steps = get("max_steps")
    train_kwargs: dict[str, Any] = {
        "seed": int(get("seed", 0)), "max_minutes": get("max_minutes"),
        "vae_steps": defaults.vae_steps if steps is None else min(defaults.vae_steps, int(steps)),
        "unet_steps": defaults.unet_steps if steps is None else min(defaults.unet_steps, int(steps)),
    }
    if get("learning_rate") is not None:
        train_kwargs["unet_lr"] = float(get("learning_rate"))
    if get("checkpoint_every") is not None:
        train_kwargs["checkpoint_every"] = int(get("checkpoint_every"))
    if get("oversample"):
        train_kwargs["oversample"] = tuple(get("oversample"))
    from accelerate import PartialState

    from generator._utils import cpu_only, resolve_mixed_precision
    from radsynth.commands._wiring import on_main_process

    state = PartialState(cpu=cpu_only())  # one process, or one of several under torchrun / accelerate launch
    try:
        train_kwargs["mixed_precision"] = resolve_mixed_precision(get("mixed_precision") or "auto", state.device)
    except ValueError as exc:
        raise ValueError(f"--mixed-precision: {exc}") from None
    train_config = VolumeTrainConfig.for_preset(preset_name, **train_kwargs)
    data_dir = Path(get("data"))
    if not data_dir.is_dir():
        raise ValueError(f"--data {str(data_dir)!r} is not a folder: --dims 3 needs a folder of volumes with "
                         "metadata.jsonl (file_name: a .nii.gz file or a DICOM series folder), or a folder of DICOM "
                         "series (any tree, e.g. patient/study/series/*.dcm) with --reports-csv or texts built "
                         "from the headers")
    reports_csv = get("reports_csv")
    if reports_csv is not None:  # checked before --overwrite empties the output folder
        from generator.data.metadata import METADATA_NAMES

        metas = [n for n in METADATA_NAMES if (data_dir / n).is_file()]
        if metas:
            raise ValueError(f"--reports-csv {reports_csv!r} is for a --data folder of DICOM series without a metadata "
                             f"file, but --data {str(data_dir)!r} has {metas[0]}: put the texts in its 'text' column")
        if not Path(reports_csv).is_file():
            raise ValueError(f"--reports-csv {reports_csv!r}: no such file")
    output = Path(get("output"))
    on_main_process(state, prepare_model_output, output, resume=bool(get("resume")), overwrite=bool(get("overwrite")))

    from generator.volumes.training import VolumeTrainer, VolumeTrainingData

    quiet = bool(get("quiet")) or not state.is_main_process
    if get("stream_from_disk"):
        from generator.volumes.store import PREPARED_VOLUMES_DIR, VolumeStore

        folder = output / "checkpoints" / PREPARED_VOLUMES_DIR
        on_main_process(state, _write_store, folder, data_dir, spacing=spacing, shape=resolution,
                        reports_csv=reports_csv, reuse=bool(get("resume")), progress=not quiet)
        store = VolumeStore.open(folder)  # every process, once the main one has written it
        summary, where = store.summary, f", read from {folder}"
        _print_skipped(store.skipped, state)
        data = VolumeTrainingData.from_store(store)
    else:
        from generator.volumes.ingest import load_volumes

        res = load_volumes(data_dir, spacing=spacing, shape=resolution, reports_csv=reports_csv)
        if not res.records:
            raise ValueError(f"--data {str(data_dir)!r}: no usable volumes ({res.summary})")
        summary, where = res.summary, ""
        _print_skipped(res.skipped, state)
        try:
            data = VolumeTrainingData.from_ingest(res)
        except ValueError as exc:
            raise ValueError(f"--data {str(data_dir)!r}: {exc}; {_ONE_GRID}") from None
    if not quiet:
        print(f"{summary}; training {data.volumes.shape[0]} volumes of {data.shape} at {data.spacing} mm "
              f"(preset {preset_name}){where}", flush=True)
    result = VolumeTrainer(data, output, config, train_config, text_encoder=get("text_encoder"),
                           resume=bool(get("resume")), progress=not quiet).run()
    if not state.is_main_process:
        return 0
    if result.finished and not get("keep_checkpoints"):
        shutil.rmtree(output / "checkpoints", ignore_errors=True)
    print(f"volume model written to {output} (VAE steps {result.vae_step}, UNet steps {result.unet_step}, "
          f"loss vae {result.vae_loss:.4f} unet {result.unet_loss:.4f}, {result.seconds:.0f} s); "
          f"log: {output / 'train_log.csv'}")
    return 0


def _print_skipped(skipped: list[Any], state: Any) -> None:
    """The first five skipped rows or series with their reasons, on stderr (main process)."""
    for entry in skipped[:5] if state.is_main_process else ():
        print(f"  skipped {entry.path}: {entry.reason}", file=sys.stderr)


#: What the volumes of ``--data`` on several grids are told to do.
_ONE_GRID = "pass --spacing MM to resample them to one grid"


def _write_store(folder: Path, data_dir: Path, *, spacing: tuple[float, float, float] | None, shape: int,
                 reports_csv: str | None, reuse: bool, progress: bool) -> None:
    """``--stream-from-disk``: write the volume store of ``--data`` at ``folder`` (main process only), or with
    ``reuse`` (``--resume``) keep the one there when it was written from the same source and settings.

    Raises:
        ValueError: no usable volumes, or volumes on several grids (the messages of the in-memory path,
            naming ``--data``), or what the reader raises for the folder.
    """
    from generator.volumes.store import VolumeSetError, write_volume_store

    try:
        write_volume_store(folder, data_dir, spacing=spacing, shape=shape, reports_csv=reports_csv, reuse=reuse,
                           progress=progress)
    except VolumeSetError as exc:
        hint = "" if exc.kind == "empty" else f"; {_ONE_GRID}"
        raise ValueError(f"--data {str(data_dir)!r}: {exc}{hint}") from None


# ------------------------------------------------------------------------------------------ generate
def volume_writer(output: Path, info: dict[str, Any], formats: set[str], *, modality: str | None = None,
                  images_per_study: int = 1) -> Callable[[Any, dict[str, Any]], dict[str, Any]]:
    """The ``write_volume`` of :func:`generator.volumes.generation.generate_volumes_to_folder`: the exporters'
    NIfTI writer (RAS affine from the volume's geometry, qform = sform, HU with explicit scl_slope 1 /
    scl_inter 0, ``descrip`` SYNTHETIC, JSON sidecar) into ``output``, and with ``dicom`` in ``formats``
    one CT/MR image series per volume under ``output/dicom``.

    Raises:
        ValueError: a DICOM modality other than CT or MR.
    """
    from exporters import DicomExporter, NiftiExporter
    from exporters.files import clean_stale_temps

    from radsynth import __version__

    model_modality = str(info.get("modality") or "CT").upper()
    mod = (modality or model_modality).upper()
    if mod not in ("CT", "MR"):
        raise ValueError(f"--modality must be CT or MR for volumes, got {modality!r}")
    common = {"software_name": "RadSynth", "software_version": __version__, "overwrite": True,
              "intensity": info.get("intensity")}
    clean_stale_temps(output)
    nifti = NiftiExporter(output, model_modality if model_modality in ("CT", "MR") else mod, **common)
    dicom = None
    if "dicom" in formats:
        clean_stale_temps(output / "dicom")
        dicom = DicomExporter(output / "dicom", mod, images_per_study=images_per_study, **common)

    def write(volume: Any, line: dict[str, Any]) -> dict[str, Any]:
        unit = volume.to_model()
        geo = {"orientation": volume.lps_orientation(), "origin": volume.lps_origin()}
        paths = nifti.add_volume(unit, line, volume.spacing, **geo)
        extra = {"nifti_sidecar": paths[1].relative_to(output).as_posix()}
        if dicom is not None:
            files = dicom.add_volume(unit, line, volume.spacing, **geo)
            extra["dicom_files"] = [p.relative_to(output).as_posix() for p in files]
            extra["dicom_file"] = extra["dicom_files"][0]
        return extra

    return write


def volume_privacy_gate(index_dir: str | Path, info: dict[str, Any]) -> Callable[[Any], list[dict[str, Any]]]:
    """A 3D privacy gate from a volume index folder for a volume model (``generate --privacy-index``).

    Raises:
        ValueError: a 2D index, or an index on another grid (shape or spacing) than the model's.
    """
    from privacy.volumes import VolumeIndex, is_volume_index

    if not is_volume_index(index_dir):
        raise ValueError(f"--privacy-index {str(index_dir)!r} is not a volume index: build one with "
                         "'radsynth index --data VOLUMES ...' for a volume model")
    return index_gate(VolumeIndex.load(index_dir), info)


def index_gate(index: Any, info: dict[str, Any]) -> Callable[[Any], list[dict[str, Any]]]:
    """The privacy gate of :func:`generator.volumes.generation.generate_volumes_to_folder` from a loaded
    :class:`privacy.volumes.VolumeIndex`: model-range volumes ``(B, D, H, W)`` in ``[0, 1]`` (mapped to the
    index's intensity window when it differs from the model's) -> one dict of verdict fields each.

    Raises:
        ValueError: an index on another grid (shape or spacing) than the model's.
    """
    import numpy as np

    shape, spacing = tuple(int(s) for s in info["shape"]), tuple(float(s) for s in info["spacing"])
    if shape != index.shape or not np.allclose(spacing, index.spacing, atol=1e-3):
        raise ValueError(f"--privacy-index was built on {index.shape} voxels at {index.spacing} mm but the model makes "
                         f"{shape} at {spacing} mm: rebuild it with --resolution {shape[0]} --spacing "
                         f"{','.join(f'{s:g}' for s in spacing)}")
    model_map, index_map = dict(info["intensity"]), dict(index.intensity)

    def check(volumes: Any) -> list[dict[str, Any]]:
        v = np.asarray(volumes, dtype=np.float64)
        if index_map and (index_map.get("low"), index_map.get("high")) != (model_map.get("low"), model_map.get("high")):
            phys = model_map["low"] + v * (model_map["high"] - model_map["low"])
            v = np.clip((phys - index_map["low"]) / (index_map["high"] - index_map["low"]), 0.0, 1.0)
        return [x.manifest_fields() for x in index.check(v.astype(np.float32))]

    return check


def run_generate_3d(args: argparse.Namespace, model_path: str | Path,
                    prompt_rows: Callable[[argparse.Namespace], list],
                    manifest_line: Callable[[argparse.Namespace, str], tuple[dict, Path]] | None = None) -> int:
    """``radsynth generate`` with a volume model: one NIfTI (+ sidecar) per volume, a preview PNG, a
    ``metadata.jsonl`` line; with ``--format dicom`` also a DICOM series; resumable; privacy-gated with a
    volume ``--privacy-index``. ``--from-manifest LINE`` (parsed by ``manifest_line``) re-makes the one
    volume of a manifest line (the same volume) into ``--output``, with its DICOM series under ``--format dicom``.

    Raises:
        ValueError: a flag volumes do not support (named) or a bad value.
    """
    from generator.models.samplers import make_sampler
    from generator.volumes.generation import (
        generate_volumes_to_folder,
        make_volume_requests,
        prepare_volume_output,
    )
    from generator.volumes.model_folder import read_volume_info
    from generator.volumes.pipeline import VolumePipeline
    from diffusers import DDPMScheduler

    get = lambda name, default=None: getattr(args, name, default)  # noqa: E731
    if get("grid") is not None:
        raise ValueError("--grid is not supported for volume models yet (each volume has its own preview)")
    if get("from_manifest") is not None and manifest_line is None:
        raise ValueError("--from-manifest needs the generate verb's line reader")
    if get("precision") in ("bf16", "fp16"):
        raise ValueError(f"--precision {get('precision')} is not supported for volume models (they sample in float32)")
    check_number("--steps", get("steps"), low=1, high=1000)
    check_number("--guidance-scale", get("guidance_scale"), low=0.0, high=100.0)
    formats = set(get("format") or ["png"])
    modality = get("modality")
    if modality is not None and modality.upper() not in ("CT", "MR"):
        raise ValueError(f"--modality must be CT or MR for volumes, got {modality!r}")
    try:
        make_sampler(args.sampler, DDPMScheduler())
    except ValueError as exc:
        raise ValueError(f"--sampler {args.sampler!r}: {exc}") from None
    if get("from_manifest") is not None:
        line, target = manifest_line(args, "regenerated.nii.gz")  # type: ignore[misc]
        if not target.name.endswith((".nii.gz", ".nii")):
            raise ValueError(f"--from-manifest: file_name of a volume must end in .nii.gz or .nii, got {target.name!r}")
    else:
        rows = prompt_rows(args)
    info = read_volume_info(model_path)
    device = get("device") or "cpu"
    pipe = VolumePipeline.from_pretrained(model_path, text_encoder=get("text_encoder"), device=device)
    if get("from_manifest") is not None:
        from generator.volumes.generation import regenerate_volume_line

        if line.get("model") and line["model"] != info.get("model_hash"):
            print(f"warning: the line was made by model {line['model']}, this is {info.get('model_hash')}",
                  file=sys.stderr)
        vol = regenerate_volume_line(pipe, {**line, "file_name": target.name})  # validates before writing
        output = Path(get("output"))
        output.mkdir(parents=True, exist_ok=True)
        writer = volume_writer(output, info, formats, modality=modality,
                               images_per_study=int(get("images_per_study", 1)))
        writer(vol, {**line, "file_name": target.name})
        print(f"regenerated {target} (sampler {line.get('sampler', 'ddim')}, seed {line['seed']})")
        return 0
    requests = make_volume_requests(rows, int(get("seed", 0)))
    gate = volume_privacy_gate(args.privacy_index, info) if get("privacy_index") else None
    output = Path(get("output"))
    settings = {"model": info.get("model_hash"), "steps": args.steps, "guidance_scale": args.guidance_scale,
                "sampler": str(args.sampler), "negative_prompt": get("negative_prompt"), "formats": sorted(formats),
                "modality": modality, "privacy_index": None if gate is None else Path(args.privacy_index).name,
                "max_resample": get("max_resample", 3)}
    prepare_volume_output(output, settings, requests, overwrite=bool(get("overwrite")))
    writer = volume_writer(output, info, formats, modality=modality, images_per_study=int(get("images_per_study", 1)))
    summary = generate_volumes_to_folder(
        pipe, info, requests, output, writer, steps=args.steps, guidance_scale=args.guidance_scale,
        sampler=str(args.sampler), negative_prompt=get("negative_prompt"), batch_size=int(get("batch_size", 4)),
        gate=gate, max_resample=int(get("max_resample", 3)), progress=not get("quiet"))
    from generator.manifest import sort_manifest

    sort_manifest(output)
    print(f"{summary.written} volumes written, {summary.skipped_done} already done, {summary.resampled} resampled by "
          f"the privacy gate, {summary.rejected} dropped after {get('max_resample', 3)} attempts -> {output} "
          f"(NIfTI + previews/{' + dicom/' if 'dicom' in formats else ''})")
    return 0


# ------------------------------------------------------------------------------------------ index / audit
def _load_volume_stack(folder: Path, flag: str, *, spacing: Any, shape: Any, ct_window: tuple[float, float] | None):
    """``load_volumes`` of ``folder`` on one grid; ValueError naming ``flag`` when nothing is usable."""
    from generator.volumes.ingest import load_volumes

    kwargs = {"ct_window": ct_window} if ct_window is not None else {}
    res = load_volumes(folder, spacing=spacing, shape=shape, **kwargs)
    if not res.records:
        raise ValueError(f"{flag} {str(folder)!r}: no usable volumes ({res.summary})")
    for skipped in res.skipped[:5]:
        print(f"  skipped {skipped.path}: {skipped.reason}", file=sys.stderr)
    shapes = {r.shape for r in res.records}
    spacings = {tuple(round(s, 4) for s in r.spacing) for r in res.records}
    if len(shapes) > 1 or len(spacings) > 1:
        raise ValueError(f"{flag} {str(folder)!r}: volumes on {len(shapes)} shapes and {len(spacings)} spacings; pass "
                         "--resolution N and --spacing MM to bring them onto one grid")
    return res


def run_index_3d(args: argparse.Namespace) -> int:
    """``radsynth index`` on a folder of volumes: a calibrated :class:`privacy.volumes.VolumeIndex`.

    Raises:
        ValueError: bad flags, unusable volumes, or a held-out set too small for ``--alpha``.
        FileExistsError: ``--output`` exists without ``--overwrite``.
    """
    from privacy.volumes import VolumeIndex

    output = Path(args.output)
    if output.exists() and not args.overwrite:
        raise FileExistsError(f"{output} already exists; pass --overwrite to replace it")
    spacing = _spacing(getattr(args, "spacing", None))
    train = _load_volume_stack(Path(args.data), "--data", spacing=spacing, shape=args.resolution, ct_window=None)
    first = train.records[0]
    kwargs: dict[str, Any] = {}
    if args.holdout is not None:
        hold = _load_volume_stack(Path(args.holdout), "--holdout", spacing=first.spacing, shape=first.shape,
                                  ct_window=_intensity_window(first.intensity.to_dict()))
        kwargs = {"holdout_volumes": hold.stack(), "holdout_ids": [f"holdout:{r.file_name}" for r in hold.records],
                  "holdout_patient_ids": [r.patient_id for r in hold.records]}
    index = VolumeIndex.build(
        train.stack(), [r.file_name for r in train.records], [r.patient_id for r in train.records],
        spacing=first.spacing, alpha=args.alpha, review_alpha=max(args.review_alpha, args.alpha),
        holdout_fraction=args.holdout_fraction, seed=args.seed, intensity=first.intensity.to_dict(),
        holdout_name="--holdout " + str(args.holdout) if args.holdout is not None else "the held-out split of --data",
        info={"data": Path(args.data).name, "holdout_dir": None if args.holdout is None else Path(args.holdout).name,
              "data_fingerprint": train.fingerprint()},
        **kwargs,
    )
    index.save(output, overwrite=args.overwrite)
    h = index.holdout
    print(f"volume reference index: {len(index.ids)} training volumes of {index.shape} at "
          f"{tuple(round(s, 3) for s in index.spacing)} mm -> {output}")
    print(f"calibration: {h['source']}; null from {h['n_null']} held-out volumes; excluded: "
          f"{len(h['excluded_same_patient'])} sharing a patient, {len(h['excluded_duplicates'])} near-duplicates")
    for warning in h.get("warnings", []):
        print(f"  warning: {warning}", file=sys.stderr)
    print(f"thresholds at alpha={args.alpha:g}: " + ", ".join(f"{k} {v:.4f}" for k, v in index.thresholds().items()))
    print(f"NOTE: {output} contains training-derived data (see its README.md); keep it with the training data, "
          "never inside a model folder or a synthetic dataset.")
    return 0


def audit_volume_folder(index: Any, folder: Path, *, alpha: float | None = None, self_test: bool = True,
                        json_path: str | Path | None = None, html_path: str | Path | None = None,
                        flag: str = "--synthetic") -> tuple[Any, int]:
    """Audit every volume of ``folder`` against a :class:`privacy.volumes.VolumeIndex` (resampled to its
    grid): verdict fields added to ``folder/metadata.jsonl`` when there is one, the report written as JSON to
    ``json_path`` and, to ``html_path``, a review page showing each flagged volume (axial, coronal and
    sagittal mid-slices) beside its nearest training volumes.

    Returns:
        ``(result, n_updated)``: the :class:`privacy.audit.AuditResult` and the manifest lines updated.

    Raises:
        ValueError: an empty or unusable folder (naming ``flag``).
    """
    from generator.manifest import update_fields
    from generator.volumes.previews import preview_image
    from privacy.report import write_html, write_json
    from privacy.volumes import audit_volumes

    data = _load_volume_stack(folder, flag, spacing=index.spacing, shape=index.shape,
                              ct_window=_intensity_window(dict(index.intensity)))
    names = [r.file_name for r in data.records]
    stack = data.stack()
    result = audit_volumes(index, stack, names, alpha=alpha, self_test=self_test)
    n_updated = 0
    if (folder / "metadata.jsonl").is_file():
        n_updated = update_fields(folder, {v.file_name: v.manifest_fields() for v in result.images})
    if json_path:
        write_json(result, json_path)
    if html_path:
        import numpy as np

        def picture(volume: np.ndarray) -> np.ndarray:  # model range [0, 1] -> the three mid-slices
            return preview_image(volume, index.spacing, height=64).astype(np.float32) / 255.0

        from types import SimpleNamespace

        class _TrainingPictures:  # index.images[i] as the page reads it, made only for the neighbours shown
            def __getitem__(self, i: int) -> np.ndarray:
                return picture(index.volumes[i])

        write_html(result, SimpleNamespace(ids=index.ids, images=_TrainingPictures()), [picture(v) for v in stack],
                   html_path, title="RadSynth memorization audit (volumes)")
    return result, n_updated


def run_audit_3d(args: argparse.Namespace) -> int:
    """``radsynth audit`` with a volume index: verdicts for every volume of ``--synthetic`` (resampled to
    the index grid), added to its ``metadata.jsonl``; summary printed and, with ``--json``, written.

    With ``--html`` a review page shows each flagged volume (axial, coronal and sagittal mid-slices)
    beside its nearest training volumes.

    Raises:
        ValueError: an empty or unusable folder.
    """
    from privacy.volumes import VolumeIndex

    index = VolumeIndex.load(args.index)
    folder = Path(args.synthetic)
    result, n_updated = audit_volume_folder(
        index, folder, alpha=getattr(args, "alpha", None), self_test=not getattr(args, "no_self_test", False),
        json_path=getattr(args, "json", None), html_path=getattr(args, "html", None))
    s = result.summary
    c = s["counts"]
    print(f"audited {s['n_images']} volumes against {s['n_references']} training volumes of {tuple(s['shape'])}")
    print(f"  keep {c['keep']}, review {c['review']}, reject {c['reject']} (copy rate {s['copy_rate']:.4f}; "
          f"expected by chance at alpha={s['alpha']:g}: {s['expected_chance_flags']['reject']:.2f})")
    print(f"  training volumes copied: {s['training_images_copied']} "
          f"({100 * s['share_training_images_copied']:.2f}% of the training set)")
    print(f"  calibration: {s['holdout'].get('source')}")
    if "self_test" in s:
        print("  planted-copy self-test (share rejected): " + ", ".join(f"{k} {v:.2f}" for k, v in s["self_test"].items()))
    if (folder / "metadata.jsonl").is_file():
        print(f"  verdict fields added to {n_updated} lines of {folder / 'metadata.jsonl'}")
    for path in (getattr(args, "json", None), getattr(args, "html", None)):
        if path:
            print(f"  wrote {path}")
    print(s["statement"])
    return 0
