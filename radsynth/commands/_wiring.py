"""Wiring shared by the verbs that generate (``generate``, ``demo``): the privacy gate, the export
hook. The only place that joins generator, privacy and
exporters (DESIGN.md §2)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["privacy_gate", "export_hook", "on_main_process"]


def on_main_process(state: Any, fn: Any, *args: Any, **kwargs: Any) -> None:
    """Run ``fn(*args, **kwargs)`` on the main process only (e.g. creating or clearing the output
    folder), then let every process continue — or fail with the same error.

    Without this, an error raised on the main process alone (a non-empty ``--output``) would leave the
    other processes waiting forever at the next barrier.

    Args:
        state: ``accelerate.PartialState`` of the run.

    Raises:
        ValueError, FileExistsError, FileNotFoundError, OSError: what ``fn`` raised on the main process
            (re-raised on every process, with its message).
    """
    error: list[Any] = [None]
    if state.is_main_process:
        try:
            fn(*args, **kwargs)
        except (ValueError, OSError) as exc:
            error = [(type(exc).__name__, str(exc))]
    if state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(error, from_process=0)
    state.wait_for_everyone()
    if error[0] is not None:
        kind, message = error[0]
        cls = {"FileExistsError": FileExistsError, "FileNotFoundError": FileNotFoundError,
               "ValueError": ValueError}.get(kind, OSError)
        raise cls(message)


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
    from exporters.files import clean_stale_temps

    from radsynth import __version__

    modality = (modality or info.modality or "DX").upper()
    common = {"software_name": "RadSynth", "software_version": __version__, "overwrite": True,
              "intensity": info.intensity}
    for sub in ("dicom", "nifti"):
        clean_stale_temps(output / sub)  # temporary files of an interrupted run (its process is gone)
    exporters: dict[str, Any] = {}
    if "dicom" in formats:
        exporters["dicom_file"] = DicomExporter(output / "dicom", modality,
                                                images_per_study=images_per_study, **common)
    if "nifti" in formats:
        exporters["nifti_file"] = NiftiExporter(output / "nifti", modality, **common)

    def hook(image, line):
        return {key: exp.add(image, line)[0].relative_to(output).as_posix() for key, exp in exporters.items()}

    return hook
