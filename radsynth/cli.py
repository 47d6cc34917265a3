"""The ``radsynth`` command line: ``radsynth <verb> [options]``.

This is the only place that wires the libraries together (DESIGN.md §2). Each verb lives in
``radsynth.commands.<verb>`` and is imported only when used, so ``radsynth --help`` stays fast.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import json
import sys
import traceback
from typing import NoReturn, Sequence

from radsynth import __version__

#: verb -> module under radsynth.commands
VERBS: dict[str, str] = {
    "prepare": "prepare",
    "train": "train",
    "generate": "generate",
    "index": "index",
    "audit": "audit",
    "export": "export",
    "phantoms": "phantoms",
    "demo": "demo",
    "stress-test": "stress_test",
}

_SUMMARY = {
    "prepare": "prepare a training source once into sharded on-disk arrays (large archives, bounded memory)",
    "train": "train a text-conditioned latent diffusion model on a folder of radiographs with reports",
    "generate": "sample synthetic images from prompts with a trained model",
    "index": "build a memorization reference index from training data",
    "audit": "audit a folder of synthetic images for copies of training images",
    "export": "convert an image folder to DICOM studies or NIfTI volumes with synthetic headers",
    "phantoms": "write procedural chest radiograph phantoms with reports (demo/test data)",
    "demo": "run the whole pipeline on the bundled demo model",
    "stress-test": "test a classifier on synthetic counterfactuals (does it break when X changes?)",
}


class _Parser(argparse.ArgumentParser):
    """``ArgumentParser`` whose usage errors are one line (flag and problem) and exit status 2."""

    def error(self, message: str) -> NoReturn:  # noqa: D102 - argparse API
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _load(verb: str):
    return importlib.import_module(f"radsynth.commands.{VERBS[verb]}")


def build_parser(verb: str | None = None) -> argparse.ArgumentParser:
    """The top-level parser; only ``verb``'s sub-parser is filled in (others stay cheap)."""
    parser = _Parser(
        prog="radsynth",
        description="RadSynth: synthetic radiology data with a privacy audit and DICOM/NIfTI export.",
        epilog="Run 'radsynth <verb> --help' for a verb's options and examples.",
    )
    parser.add_argument("--version", action="version", version=f"radsynth {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the Python traceback of an error")
    sub = parser.add_subparsers(dest="verb", metavar="<verb>")
    for name in VERBS:
        if name == verb:
            module = _load(name)
            p = sub.add_parser(
                name,
                help=_SUMMARY[name],
                description=module.HELP,
                epilog=getattr(module, "EPILOG", None),
                formatter_class=argparse.RawDescriptionHelpFormatter,
            )
            module.add_arguments(p)
            p.set_defaults(_run=module.run)
        else:
            sub.add_parser(name, help=_SUMMARY[name], add_help=False)
    return parser


def _quiet_libraries() -> None:
    """Keep the libraries' own loading bars and advisory warnings out of RadSynth's output
    (their errors still show); RadSynth prints its own progress."""
    import logging

    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    logging.getLogger("accelerate").setLevel(logging.ERROR)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``radsynth`` console script; returns the exit status.

    Exit status: 0 success; 2 a usage error or bad input (a flag, a file, a folder: the message
    names it); 1 a failure at run time (permissions, disk, device, an unexpected error); 130
    interrupted. Errors are one line on stderr; ``--debug`` (anywhere on the line) adds the traceback.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    verb = next((a for a in argv if not a.startswith("-")), None)
    if verb is not None and verb not in VERBS:
        close = difflib.get_close_matches(verb, list(VERBS), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        print(f"radsynth: unknown verb '{verb}'.{hint} Verbs: {', '.join(VERBS)}", file=sys.stderr)
        return 2
    parser = build_parser(verb)
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # usage error (status 2) or --help/--version (status 0)
        return int(stop.code or 0) if not isinstance(stop.code, str) else 2
    if verb is None:
        parser.print_help()
        return 0
    _quiet_libraries()
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        hint = "run it again with --resume" if verb in ("train", "prepare") else "run the same command again"
        print(f"radsynth {verb}: interrupted; finished files are kept: {hint} to continue.", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - every error ends as one line (with --debug: traceback)
        if debug:
            traceback.print_exc()
        status, message = describe_error(exc)
        print(f"radsynth {verb}: error: {message}", file=sys.stderr)
        return status
    finally:
        _end_process_group()


def _end_process_group() -> None:
    """Under torchrun/accelerate launch, shut the process group down before the interpreter exits
    (gloo's threads still running at exit can abort the process: "terminate called without an active
    exception"). A local call: no other process is waited for."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def describe_error(exc: BaseException) -> tuple[int, str]:
    """Exit status and one-line message for an error raised by a verb.

    Bad input (``ValueError`` and its kin, missing or clashing files) is status 2; everything else
    (permissions, disk, devices, library failures) is status 1. The message is the error's own
    text on one line; errors that carry a file name (``OSError``) name it.
    """
    if isinstance(exc, OSError) and exc.filename is not None:
        text = f"{exc.strerror or exc}: {exc.filename}"
    else:
        text = str(exc) or type(exc).__name__
    text = " ".join(text.split())  # one line
    if len(text) > 2000:
        text = text[:2000] + " ..."
    usage = (ValueError, LookupError, FileNotFoundError, FileExistsError, NotADirectoryError,
             IsADirectoryError, json.JSONDecodeError)
    if isinstance(exc, usage):
        return 2, text
    known = (OSError, RuntimeError, MemoryError)
    if isinstance(exc, known):
        return 1, text
    return 1, f"{type(exc).__name__}: {text} (run with --debug for the traceback)"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
